"""The ``ktray`` command line. ``main(argv)`` takes an argument list, so tests call it in-process.

Every subcommand takes a CONFIG (a YAML path, or the name of a packaged config such as
``demo``) followed by ``key.sub=value`` overrides, e.g.
``ktray run configs/imagefolder.yaml data.root=DIR out=OUT``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from ktray.errors import KtrayError

EPILOG = """config overrides: any field as key.sub=value, e.g. out=/tmp/run teacher.img_size=128
distill.steps=1000 methods=[teacher,scratch,task@in_domain]. `ktray config demo` prints every
field with its value. Outputs go to OUT (a path or s3:// URI; default ./ktray-out/NAME)."""


def _setup_logging(verbose: bool) -> None:
    log = logging.getLogger("ktray")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s ktray %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def _config(args):
    from ktray.config import load_config

    cfg = load_config(args.config, args.overrides)
    if not cfg.out:
        cfg.out = os.path.abspath(os.path.join("ktray-out", cfg.name))
    elif "://" not in cfg.out:
        cfg.out = os.path.abspath(cfg.out)
    return cfg


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _checked(args, transfers=(), will_curate=False):
    """The config of ``args``, checked as a whole (storage, data, transfer sets, models)
    before the command does any work."""
    from ktray.pipeline.validate import check_config

    cfg = _config(args)
    check_config(cfg, transfers, will_curate)
    return cfg


def cmd_teacher(args):
    from ktray.stages import teacher

    _print(teacher.run(_checked(args)))


def cmd_logits(args):
    from ktray.stages import logits

    _print(logits.run(_checked(args, [args.transfer]), args.transfer))


def cmd_distill(args):
    from ktray.settings import resolve_choices
    from ktray.stages import distill

    allowed = resolve_choices("ktray.distill:OBJECTIVES")
    if args.objective is not None and args.objective not in allowed:
        raise KtrayError(f"--objective must be one of {', '.join(allowed)}, got {args.objective!r}")
    from ktray.config.methods import check_student_init

    cfg = _checked(args, [args.transfer])
    check_student_init(cfg)  # a pretrained start is a method: finetune --init ...+init@WEIGHTS
    _print(distill.run(cfg, args.transfer, args.objective))


def cmd_finetune(args):
    from ktray.config import parse_method
    from ktray.stages import finetune

    transfer = parse_method(args.init)[1] if args.init else ""
    _print(finetune.run(_checked(args, [transfer] if transfer else []), args.init))


def cmd_evaluate(args):
    from ktray import storage
    from ktray.models import read_spec
    from ktray.stages import evaluate

    cfg = _config(args)
    storage.probe(args.checkpoint, "--checkpoint")
    read_spec(args.checkpoint)
    r = evaluate.run(cfg, args.checkpoint, args.split)
    r.pop("confusion", None)
    _print(r)


def cmd_run(args):
    from ktray.pipeline.validate import check_config, method_transfers
    from ktray.stages import run as run_stage

    cfg = _config(args)
    check_config(cfg, method_transfers(cfg), will_curate=True)
    print(f"ktray: writing to {cfg.out}", file=sys.stderr)
    start = time.perf_counter()
    run_stage.run(cfg)
    print(f"done in {time.perf_counter() - start:.0f}s; outputs in {cfg.out}")


DEMOS = {"classification": "demo", "segmentation": "demo_segmentation"}


def cmd_demo(args):
    """``ktray demo [classification|segmentation] [key=value ...]``."""
    if args.overrides and "=" not in args.overrides[0]:
        which = args.overrides.pop(0)
        if which not in DEMOS:
            raise KtrayError(f"unknown demo {which!r}; choose one of {', '.join(DEMOS)}")
        args.config = DEMOS[which]
    cmd_run(args)


def cmd_curate(args):
    from ktray.stages import curate

    _print(curate.run(_checked(args, ["curated"], will_curate=True)))


def cmd_sweep(args):
    from ktray.config import parse_method
    from ktray.pipeline.validate import check_config
    from ktray.stages import sweep

    cfg = _config(args)
    transfer = parse_method(cfg.sweep.method)[1]
    check_config(cfg, [transfer] if transfer else [], will_curate=True)
    print(f"ktray: sweep writing to {sweep.sweep_dir(cfg)}", file=sys.stderr)
    r = sweep.run(cfg)
    from ktray import storage

    print(storage.read_bytes(r["outputs"]["md"]).decode(), end="")
    print(f"\ndone in {r['seconds']:.0f}s; table: {r['outputs']['md']}")


def cmd_report(args):
    from ktray.pipeline import accounting

    out = args.out if "://" in args.out else os.path.abspath(args.out)
    r = accounting.write_report(out)
    t = r["totals"]
    print(
        f"{accounting.describe_totals(t)}; {t['flops']:.3g} FLOPs, {t['device_seconds']:.1f} "
        f"device-seconds spent\nreport: {r['outputs']['md']}  table: "
        f"{r['outputs']['parquet']}  plot: {r['outputs']['png']}"
    )


def _model_config(args):
    """Config for export / predict: ``--config`` (optional) + overrides; ``out`` as given."""
    from ktray.config import load_config

    cfg = load_config(args.config, args.overrides)
    if cfg.out and "://" not in cfg.out:
        cfg.out = os.path.abspath(cfg.out)
    return cfg


def cmd_export(args):
    from ktray.stages import export

    r = export.run(_model_config(args), args.model_dir, with_task=bool(args.config))
    print(export.summary(r))
    print(f"manifest: {r['outputs']['dir']}/manifest.json")


def cmd_predict(args):
    from ktray.stages import predict

    cfg = _model_config(args)
    if not cfg.out:
        cfg.out = os.path.abspath(os.path.join("ktray-out", "predict"))
    _print(predict.run(cfg, args.model_dir, args.input))


def cmd_config(args):
    from ktray.config import to_yaml

    print(to_yaml(_config(args)), end="")


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

    def add(name, fn, help_, config_required=True):
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if config_required:
            sp.add_argument(
                "config",
                help="YAML config path or packaged config name (demo, "
                "imagefolder, tiny, sweeps/temperature, ...)",
            )
        sp.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="config overrides, e.g. out=/tmp/run distill.steps=1000",
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
        config_required=False,
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
            "Batch inference (Ray Data) over an image folder, Parquet "
            "or tar shards: OUT/predictions/part-*.parquet.",
        ),
    ):
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.add_argument(
            "model_dir",
            help="a checkpoint folder (model.json + model.safetensors)"
            + (" or an export folder (model.onnx)" if name == "predict" else ""),
        )
        sp.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="config overrides, e.g. out=DIR export.int8=true",
        )
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
        sp.set_defaults(fn=fn)
    add("config", cmd_config, "Print the resolved config as YAML.")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; a subcommand's flags and ``key=value`` overrides may come in
    any order (``ktray logits CONFIG --transfer in_domain out=OUT``)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if (
        at is None
        or argv[at] not in sub.choices
        or any(a not in ("-v", "--verbose") for a in argv[:at])
    ):
        return parser.parse_args(argv)  # help, a usage error or an unknown command
    args = sub.choices[argv[at]].parse_intermixed_args(argv[at + 1 :])
    args.command, args.verbose = argv[at], bool(argv[:at])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(args.verbose)
    try:
        args.fn(args)
    except KtrayError as e:
        print(f"ktray: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from ktray.storage import storage_error

        err = storage_error(e, "")  # an object-store failure past the up-front probes
        if err is None:
            raise
        print(f"ktray: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ktray: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
