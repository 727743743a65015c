"""Data: image readers, the image-source resolver, the generic pool, task assembly, views.

Library code: never imports ray. Column names live in :mod:`ktray.data.columns`.
"""

from ktray.lazy import lazy_exports

# Lazy: ``import ktray.data.decode`` (a Ray Data decode worker) must not import torch through
# this package; each name is imported from its module on first use.
_EXPORTS = {
    "FASHION_MNIST_CLASSES": "ktray.data.readers",
    "IMAGENET_MEAN": "ktray.data.views",
    "IMAGENET_STD": "ktray.data.views",
    "IMAGE_EXTENSIONS": "ktray.data.readers",
    "IMAGE_TABLE_SCHEMA": "ktray.data.readers",
    "LabeledImages": "ktray.data.datasets",
    "ViewImages": "ktray.data.datasets",
    "ViewParams": "ktray.data.views",
    "apply_view": "ktray.data.views",
    "build_generic_pool": "ktray.data.generic",
    "class_counts": "ktray.data.task",
    "clear_cache": "ktray.data.sources",
    "collate_skip_none": "ktray.data.datasets",
    "decode_image": "ktray.data.sources",
    "eval_transform": "ktray.data.views",
    "list_column_matrix": "ktray.data.datasets",
    "load_image_strict": "ktray.data.sources",
    "load_images": "ktray.data.sources",
    "make_image_table": "ktray.data.readers",
    "offline_photos": "ktray.data.generic",
    "parse_source": "ktray.data.sources",
    "preload": "ktray.data.datasets",
    "read_gallery": "ktray.data.readers",
    "read_idx": "ktray.data.readers",
    "read_imagefolder": "ktray.data.readers",
    "read_parquet_images": "ktray.data.readers",
    "read_unlabeled_folder": "ktray.data.readers",
    "read_webdataset": "ktray.data.readers",
    "sample_view": "ktray.data.views",
    "split_validation": "ktray.data.task",
    "subsample_per_class": "ktray.data.task",
    "to_tensor": "ktray.data.views",
    "view_from_row": "ktray.data.views",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)

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
