"""The end of a training run, classification and segmentation alike: its FLOPs in the
metrics and, on rank 0, the model saved with what trained it."""

from __future__ import annotations

from ktray.models import save_model
from ktray.models.flops import count_flops
from ktray.train.loop import unwrap
from ktray.train.specs import TeacherSpec


def finish_run(model, model_spec: dict, spec, metrics: dict, out_dir: str, rank: int) -> dict:
    """The end of a training run (classification and segmentation): its FLOPs in ``metrics``
    and, on rank 0, the model saved under ``out_dir`` with what trained it."""
    fwd = count_flops(unwrap(model), model_spec["img_size"])
    # Training costs ~3x the forward FLOPs (forward + backward); a frozen backbone ~1x.
    linear = isinstance(spec, TeacherSpec) and spec.mode == "linear"
    metrics["flops_per_image"] = fwd
    metrics["flops"] = fwd * (1.0 if linear else 3.0) * metrics.get("images", 0)
    metrics["flops"] += metrics.pop("teacher_flops_per_image", 0.0) * metrics.get("images", 0)
    if rank == 0:
        model_spec["train"] = {
            "kind": spec.kind,
            "steps": spec.steps,
            "lr": spec.lr,
            "seed": spec.seed,
        }
        save_model(unwrap(model).cpu(), out_dir, model_spec)
    return metrics
