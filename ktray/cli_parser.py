"""The ``ktray`` argument parser: one subcommand per stage, each taking a CONFIG and
``key.sub=value`` overrides (``export`` / ``predict``: a model folder and ``--config``)."""

from __future__ import annotations

import argparse

from ktray.cli_commands import (
    cmd_config,
    cmd_curate,
    cmd_demo,
    cmd_distill,
    cmd_evaluate,
    cmd_export,
    cmd_finetune,
    cmd_logits,
    cmd_predict,
    cmd_report,
    cmd_run,
    cmd_sweep,
    cmd_teacher,
)

EPILOG = """config overrides: any field as key.sub=value, e.g. out=/tmp/run teacher.img_size=128
distill.steps=1000 methods=[teacher,scratch,task@in_domain]. `ktray config demo` prints every
field with its value. Outputs go to OUT (a path or s3:// URI; default ./ktray-out/NAME)."""
CONFIG_ARG = (
    "config",
    "YAML config path or packaged config name (demo, imagefolder, tiny, sweeps/temperature, ...)",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ktray",
        description="Knowledge transfer from vision foundation models to small "
        "task-specific students, on Ray.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, fn, help_, first=CONFIG_ARG, overrides="out=/tmp/run distill.steps=1000"):
        """A subcommand: its ``first`` positional (name, help; None: none), then overrides."""
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if first:
            sp.add_argument(first[0], help=first[1])
        sp.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help=f"config overrides, e.g. {overrides}",
        )
        sp.set_defaults(fn=fn)
        return sp

    add(
        "teacher",
        cmd_teacher,
        "Adapt the VFM: backbone + task head trained on the labeled images (Ray Train).",
    )
    sp = add(
        "logits",
        cmd_logits,
        "Teacher logits + features over a transfer set (Ray Data "
        "actors), written as Parquet with each view's crop box.",
    )
    sp.add_argument(
        "--transfer",
        default="in_domain",
        help="transfer set: in_domain, generic, curated or an image-table URI",
    )
    sp = add(
        "distill",
        cmd_distill,
        "Pretrain the student on a transfer set by matching the teacher (Ray Train DDP).",
    )
    sp.add_argument("--transfer", default="in_domain", help="transfer set (see logits)")
    sp.add_argument(
        "--objective",
        default=None,
        help="task: match predictions (KL); features: task-agnostic baseline "
        "(default: distill.objective)",
    )
    sp = add(
        "finetune",
        cmd_finetune,
        "Finetune the student on the labeled images (no --init: the from-scratch baseline).",
    )
    sp.add_argument(
        "--init",
        default="",
        help="the student method: scratch (default), init@imagenet, init@PATH, a distilled "
        "student task@in_domain (distilled first if needed), task@in_domain+init@imagenet",
    )
    sp = add("evaluate", cmd_evaluate, "Test metrics of a checkpoint folder.")
    sp.add_argument(
        "--checkpoint",
        required=True,
        help="a model folder (model.json + model.safetensors), e.g. OUT/finetune/scratch/model",
    )
    sp.add_argument("--split", default="test", help="test (default), val or train")
    add(
        "run",
        cmd_run,
        "The whole pipeline: every method of `methods`, results table, "
        "report, plot and MLflow run.",
    )
    sp = add(
        "demo",
        cmd_demo,
        "The whole pipeline on the packaged offline default: "
        "Fashion-MNIST, 10 labels/class, EfficientNet-Lite teacher; `ktray demo "
        "segmentation`: the Fashion-MNIST mosaic segmentation task (mIoU).",
        first=None,
    )
    sp.set_defaults(config="demo")
    add(
        "curate",
        cmd_curate,
        "Curate a transfer set from a gallery by query-balanced crop "
        "retrieval (labeled images as queries).",
    )
    add(
        "sweep",
        cmd_sweep,
        "Ray Tune over config fields (the config's sweep section, e.g. "
        "configs/sweeps/temperature.yaml): results table, plots, MLflow runs.",
    )
    sp = sub.add_parser(
        "report",
        help="Compute report of an output folder: every stage "
        "manifest (runs and sweep trials), FLOPs, device-seconds, accuracy "
        "against pretraining compute, under OUT/report/.",
    )
    sp.add_argument("out", help="an output folder (local path or s3:// URI)")
    sp.set_defaults(fn=cmd_report)
    for name, fn, help_ in (
        (
            "export",
            cmd_export,
            "A checkpoint as ONNX (dynamic batch; export.int8=true adds "
            "int8), checked against PyTorch, with its size and CPU speed; --config adds test "
            "accuracy.",
        ),
        (
            "predict",
            cmd_predict,
            "Batch inference (Ray Data: CPU decoding, model actors on the GPUs; infer.* "
            "sizes them) over an image folder, Parquet "
            "or tar shards: OUT/predictions/part-*.parquet, a class per image (pred, prob, "
            "probs), or for a segmentation model a PNG mask per image at its own size (mask, "
            "width, height, classes).",
        ),
    ):
        model_dir = (
            "model_dir",
            "a checkpoint folder (model.json + model.safetensors)"
            + (" or an export folder (model.onnx)" if name == "predict" else ""),
        )
        sp = add(name, fn, help_, first=model_dir, overrides="out=DIR export.int8=true")
        sp.add_argument(
            "--config",
            default=None,
            help="a task config (YAML path or packaged "
            "name)" + (": test accuracy of each model" if name == "export" else ""),
        )
        if name == "predict":
            sp.add_argument(
                "--input",
                required=True,
                help="images: a folder, Parquet or tar shards (local or s3://)",
            )
    add("config", cmd_config, "Print the resolved config as YAML.")
    return p
