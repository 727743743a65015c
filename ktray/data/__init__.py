"""Data: image readers, the image-source resolver, the generic pool, task assembly, views.

Library code: never imports ray. Column names live in :mod:`ktray.data.columns`.
"""

from ktray.data.datasets import (
    LabeledImages,
    ViewImages,
    collate_skip_none,
    list_column_matrix,
    preload,
)
from ktray.data.generic import build_generic_pool, offline_photos
from ktray.data.readers import (
    FASHION_MNIST_CLASSES,
    IMAGE_EXTENSIONS,
    IMAGE_TABLE_SCHEMA,
    make_image_table,
    read_gallery,
    read_idx,
    read_imagefolder,
    read_parquet_images,
    read_unlabeled_folder,
    read_webdataset,
)
from ktray.data.sources import (
    clear_cache,
    decode_image,
    load_image_strict,
    load_images,
    parse_source,
)
from ktray.data.task import class_counts, split_validation, subsample_per_class
from ktray.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewParams,
    apply_view,
    eval_transform,
    sample_view,
    to_tensor,
    view_from_row,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "IMAGE_TABLE_SCHEMA",
    "LabeledImages",
    "ViewImages",
    "ViewParams",
    "apply_view",
    "build_generic_pool",
    "class_counts",
    "clear_cache",
    "collate_skip_none",
    "decode_image",
    "eval_transform",
    "list_column_matrix",
    "load_image_strict",
    "load_images",
    "make_image_table",
    "offline_photos",
    "parse_source",
    "preload",
    "read_gallery",
    "read_idx",
    "read_imagefolder",
    "read_parquet_images",
    "read_unlabeled_folder",
    "read_webdataset",
    "sample_view",
    "split_validation",
    "subsample_per_class",
    "to_tensor",
    "view_from_row",
]
