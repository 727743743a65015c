"""What each ``ktray`` subcommand does (:mod:`ktray.cli` parses, these run): the config of the
command line, checked as a whole before any work, then the stage and its printed result."""

from __future__ import annotations

import json
import os
import sys
import time

from ktray.errors import KtrayError


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
