"""Models: teacher backbones (timm, open_clip, offline EfficientNet-Lite) with a task head,
timm students, safetensors checkpoints with a JSON spec, FLOP counting.

This package is plain PyTorch and never imports ray.
"""

from ktray.models.backbones import Backbone, create_backbone, imagenet_logits
from ktray.models.checkpoint import build_from_spec, load_model, model_spec, read_spec, save_model
from ktray.models.flops import count_flops
from ktray.models.heads import TRAINABLE_MODES, TaskModel
from ktray.models.student import (
    create_student,
    student_feature_dim,
    student_features,
    student_forward_all,
)

__all__ = [
    "TRAINABLE_MODES",
    "Backbone",
    "TaskModel",
    "build_from_spec",
    "count_flops",
    "create_backbone",
    "create_student",
    "imagenet_logits",
    "load_model",
    "model_spec",
    "read_spec",
    "save_model",
    "student_feature_dim",
    "student_features",
    "student_forward_all",
]
