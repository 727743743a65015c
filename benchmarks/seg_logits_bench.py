"""Dense (segmentation) against classification teacher targets: the logits pass's model side.

The same EfficientNet-Lite0 backbone, the same decoded uint8 views (Fashion-MNIST mosaics),
the same process: ktray's Predictor with a classification head (pooled features -> [C]
logits) and the DensePredictor with a linear segmentation head (stride-8/16/32 feature maps
-> per-pixel logits resized to ``--dense-size``), plus each one's bytes per stored row.
Usage:

    python benchmarks/seg_logits_bench.py [--images 1024] [--size 96] [--dense-size 12]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dense-size", type=int, default=12)
    ap.add_argument("--feature-size", type=int, default=6)
    ap.add_argument("--fmnist", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()

    from PIL import Image

    from ktray.data import segmentation as seg
    from ktray.dense_predict import DensePredictor
    from ktray.models import TaskModel, create_backbone, save_model
    from ktray.models.dense import DenseTeacher
    from ktray.predict import Predictor

    images, labels = seg.fashion_arrays(args.fmnist, "train")
    rng = np.random.default_rng(0)
    pixels = np.stack(
        [
            np.asarray(
                Image.fromarray(seg.make_mosaic(rng, images, labels)[0]).resize(
                    (args.size, args.size), Image.Resampling.BILINEAR
                )
            )
            for _ in range(args.images)
        ]
    )
    print(f"torch threads {torch.get_num_threads()}, {args.images} views at {args.size} px")
    with tempfile.TemporaryDirectory() as tmp:
        b = create_backbone("efficientnet_lite0", pretrained=True, img_size=args.size)
        save_model(TaskModel(b, 10), f"{tmp}/cls", {"img_size": args.size})
        dense = DenseTeacher(create_backbone("efficientnet_lite0", True, img_size=args.size), 11)
        spec = {
            "kind": "seg_teacher",
            "arch": "efficientnet_lite0",
            "backbone": "efficientnet_lite0",
            "head": "linear",
            "num_classes": 11,
            "img_size": args.size,
            "build_img_size": args.size,
            "mean": list(dense.backbone.mean),
            "std": list(dense.backbone.std),
        }
        save_model(dense, f"{tmp}/seg", spec)
        runs = {
            "classification (pooled, [C])": Predictor(
                f"{tmp}/cls", batch_size=args.batch, features=False
            ),
            f"segmentation ([C,{args.dense_size},{args.dense_size}])": DensePredictor(
                f"{tmp}/seg",
                args.dense_size,
                args.feature_size,
                batch_size=args.batch,
                features=False,
            ),
            f"segmentation + features ([D,{args.feature_size},{args.feature_size}])": (
                DensePredictor(
                    f"{tmp}/seg",
                    args.dense_size,
                    args.feature_size,
                    batch_size=args.batch,
                    features=True,
                )
            ),
        }
        print(f"{'targets':48s} {'img/s':>8s} {'bytes/row':>10s}")
        for name, p in runs.items():
            p.predict_pixels(pixels[: args.batch])  # warm-up
            t0 = time.perf_counter()
            logits, feats = p.predict_pixels(pixels)
            dt = time.perf_counter() - t0
            row = logits[0].nbytes + (feats[0].nbytes if feats is not None else 0)
            print(f"{name:48s} {len(pixels) / dt:8.1f} {row:10d}")


if __name__ == "__main__":
    main()
