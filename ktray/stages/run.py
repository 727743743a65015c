"""``ktray run`` / ``ktray demo``: the whole pipeline and the comparison of methods.

For each method of ``cfg.methods``: ``teacher`` (the adapted VFM), ``scratch`` (student
finetuned from random init), ``init@imagenet`` / ``init@PATH`` (finetuned from those weights)
or ``OBJECTIVE@TRANSFER[+init@WEIGHTS]`` (distill on a transfer set, then finetune). Every
student is finetuned under one policy (``finetune_policy``, stated in the results). Stages
share their outputs (one teacher, one logits pass per transfer set), and a rerun reuses every
finished stage.
"""

from __future__ import annotations

import logging
import time

from ktray import storage
from ktray.config import Config, apply_overrides
from ktray.pipeline import accounting, manifest, replicates
from ktray.pipeline.reporting import format_table, write_results
from ktray.pipeline.tasks import prepare_task
from ktray.pipeline.tracking import log_pipeline, tracking_uri
from ktray.pipeline.validate import check_config, method_transfers, parse_method
from ktray.stages import finetune as finetune_stage
from ktray.stages import teacher as teacher_stage

log = logging.getLogger("ktray")


def _student_entry(cfg: Config, method: str) -> tuple[dict, str]:
    ft = finetune_stage.run(cfg, method)
    m = finetune_stage.student_method(method)
    entry = {
        "init": m.init or "random",
        "finetune_steps": ft.get("steps"),
        "finetune_lr": cfg.finetune.scratch_lr if m.objective == "scratch" else cfg.finetune.lr,
        "finetune_selected_step": ft.get("selected_step", ft.get("steps")),
        "val_accuracy": ft.get("val_accuracy"),
        **_scores(ft),
        "finetune_seconds": ft["train_seconds"],
        "train_seconds": ft["train_seconds"],
        "finetune_flops": ft.get("flops") or 0.0,
        "pretrain_flops": 0.0,
        "student_flops_per_image": ft.get("flops_per_image"),
    }
    if m.distills:
        transfer = m.transfer
        pre = storage.read_json(
            storage.join(manifest.stage_dir(cfg.out, "distill", _name(cfg, m)), manifest.MANIFEST)
        )
        # online / distill.targets runs read no logits pass (uses_logits false): none counted
        logits = (
            storage.read_json(
                storage.join(manifest.stage_dir(cfg.out, "logits", transfer), manifest.MANIFEST)
            )
            if pre.get("uses_logits", True)
            else {}
        )
        entry.update(
            distill_seconds=pre["train_seconds"],
            train_seconds=pre["train_seconds"] + ft["train_seconds"],
            **_scores(pre, "distill_"),
            # Pretraining compute: student distillation + the teacher's passes over the
            # transfer set (precomputed once and shared by the methods on that set).
            pretrain_flops=(pre.get("flops") or 0.0)
            + (logits.get("flops") or logits.get("attributed_flops") or 0.0),
            transfer_images=logits.get("images"),
            transfer_rows=logits.get("rows", pre.get("transfer_rows")),
            logits_seconds=logits.get("seconds", 0.0),
        )
    return entry, ft["outputs"]["model"]


def _name(cfg: Config, m) -> str:
    """The distill output of method ``m`` at this config's ``train.seed``."""
    return replicates.stage_name(m.distill_name, cfg.train.seed)


def _replicated_entry(cfg: Config, method: str) -> tuple[dict, str]:
    """A student method over ``cfg.seeds`` replicates (``train.seed``, ``+1``, ...): the
    entry aggregated by :func:`replicates.aggregate`; the model of the first replicate."""
    runs = []
    for seed in replicates.train_seeds(cfg.train.seed, cfg.seeds):
        rcfg = cfg if seed == cfg.train.seed else apply_overrides(cfg, {"train.seed": seed})
        entry, model = _student_entry(rcfg, method)
        runs.append((seed, entry, model))
        if cfg.seeds > 1:
            log.info("%-22s seed %d: %s", method, seed, replicates.cell(entry, _metric(entry)))
    return replicates.aggregate(runs), runs[0][2]


def _metric(entry: dict) -> str:
    return "test_miou" if "test_miou" in entry else "test_accuracy"


def finetune_policy(cfg: Config) -> dict:
    """The finetuning every student method gets (stated in the results)."""
    f = cfg.finetune
    return {
        "steps": f.steps,
        "scratch_steps": f.scratch_steps or f.steps,
        "lr": f.lr,
        "scratch_lr": f.scratch_lr,
        "batch_size": f.batch_size,
        "warmup_steps": f.warmup_steps,
        "weight_decay": f.weight_decay,
        "select": selection_rule(cfg),
    }


def selection_rule(cfg: Config) -> str:
    """Which step's weights every student keeps (``finetune.select``), in words."""
    from ktray.data.segmentation import is_segmentation

    f = cfg.finetune
    if cfg.data.val_per_class <= 0 or f.select == "last" or is_segmentation(cfg.data.kind):
        return "last step"  # (segmentation tasks have no validation split yet)
    when = f"every {f.val_every or cfg.train.report_every} steps"
    stop = f", stopping after {f.patience} evaluations without gain" if f.patience else ""
    return (
        f"best validation accuracy of evaluations {when}, step 0 and the last step included "
        f"(a tie keeps the earlier step){stop}"
    )


def labeled_budget(cfg: Config) -> dict:
    """Labeled images per class the run used: for training and for validation, and where the
    validation images came from (``data.val_from``); ``None`` per class = all of them."""
    d = cfg.data
    per, val = d.labels_per_class or None, d.val_per_class
    train = per - val if per and d.val_from == "labels" else per
    total = per + val if per and d.val_from == "extra" else per
    return {
        "train_per_class": train,
        "val_per_class": val,
        "val_from": d.val_from,
        "total_per_class": total,
    }


def _scores(manifest_: dict, prefix: str = "") -> dict:
    """A stage manifest's test metrics: ``test_accuracy`` (classification) or ``test_miou``,
    ``test_pixel_accuracy``, ``per_class_iou`` (segmentation), keys prefixed by ``prefix``."""
    if "test_miou" in manifest_:
        keys = ("test_miou", "test_pixel_accuracy", "per_class_iou")
        if prefix:
            keys = ("test_miou",)
        return {prefix + k: manifest_[k] for k in keys}
    return {prefix + "test_accuracy": manifest_.get("test_accuracy")}


def speed_table(cfg: Config, models: dict) -> dict:
    """Per method: params, GFLOPs, MB and CPU latency / throughput of PyTorch, onnxruntime
    fp32 and int8, measured in this process (``export.speed_iters`` timed calls each), and a
    student's speed-up over the teacher. One measurement per distinct architecture (students
    of one arch share it); the exports stay in ``OUT/export/<method>/`` when OUT is local."""
    import tempfile

    from ktray import export
    from ktray.errors import KtrayError
    from ktray.models import load_model, read_spec

    ec, measured, rows = cfg.export, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, model_dir in models.items():
            spec = read_spec(model_dir)
            key = (spec["kind"], spec["arch"], spec["img_size"], spec["num_classes"])
            if key not in measured:
                out = (
                    storage.join(cfg.out, "export", method)
                    if not storage.is_remote(cfg.out)
                    else storage.join(tmp, method)
                )
                try:
                    r = export.export_model(
                        model_dir,
                        out,
                        int8=True,
                        int8_mode=ec.int8_mode,
                        exporter=ec.exporter,
                        atol=ec.atol,
                        check_images=ec.check_images,
                        speed_iters=ec.speed_iters,
                    )
                except KtrayError as e:  # e.g. an architecture the exporter cannot handle
                    log.warning("speed table: %s: no ONNX numbers (%s)", method, e)
                    model = load_model(model_dir)[0]
                    speed = export.measure_speed(model, spec["img_size"], {}, ec.speed_iters)
                    r = dict(export.model_stats(model, spec["img_size"]), speed=speed)
                measured[key] = {
                    k: r.get(k) for k in ("params", "gflops", "mb", "file_mb", "speed")
                } | {"measured_with": method}
                if r.get("parity"):
                    measured[key]["int8_top1_agreement"] = r["parity"]["int8"]["top1_agreement"]
            rows[method] = dict(measured[key], arch=spec["arch"], img_size=spec["img_size"])
    teacher = rows.get("teacher")
    for method, row in rows.items():
        if teacher and method != "teacher":
            # same backend, same process: latency ratio at batch 1, throughput at batch 32
            row["speedup"] = {
                b: {
                    "latency": teacher["speed"][b]["latency_ms"] / s["latency_ms"],
                    "throughput": s["throughput"] / teacher["speed"][b]["throughput"],
                }
                for b, s in row["speed"].items()
                if isinstance(s, dict) and b in teacher["speed"]
            }
    return rows


def run(cfg: Config) -> dict:
    """Run every method of ``cfg.methods``; write results.{json,md,png} under ``cfg.out``."""
    check_config(cfg, method_transfers(cfg), will_curate=True)
    finetune_stage.check_inits(cfg, cfg.methods)  # every init@ weights file, before any work
    started = time.perf_counter()
    info = prepare_task(cfg)
    if cfg.estimate:
        from ktray.pipeline.estimate import describe

        seg = info.get("task_type") == "segmentation"
        log.info(describe(cfg, info["rows"], info["num_classes"], segmentation=seg))
    if any(parse_method(m)[1] == "curated" for m in cfg.methods):
        from ktray.stages import curate as curate_stage

        curate_stage.run(cfg)
    methods, models = {}, {}
    seg = info.get("task_type") == "segmentation"
    for method in cfg.methods:
        t0 = time.perf_counter()
        if method == "teacher":
            r = teacher_stage.run(cfg)
            methods[method] = {
                **_scores(r),
                "train_seconds": r["train_seconds"],
                "flops_per_image": r.get("flops_per_image"),
                "n_seeds": 1,  # one teacher, shared by every replicate of the students
            }
            models[method] = r["outputs"]["model"]
        else:
            methods[method], models[method] = _replicated_entry(cfg, method)
        methods[method]["wall_seconds"] = time.perf_counter() - t0
        m = methods[method]
        if seg:
            log.info("%-22s test mIoU %.4f", method, m["test_miou"])
        else:
            log.info("%-22s test accuracy %.4f", method, m["test_accuracy"])
    results = {
        "task": cfg.task,
        "labels_per_class": cfg.data.labels_per_class,
        "data_kind": cfg.data.kind,
        "num_classes": info["num_classes"],
        "train_images": info["rows"]["train"],
        "val_images": info["rows"].get("val", 0),
        "test_images": info["rows"]["test"],
        "teacher": cfg.teacher.backbone,
        "student": cfg.student.arch,
        "student_img_size": cfg.student.img_size,
        "finetune_policy": finetune_policy(cfg),
        "labeled_budget": labeled_budget(cfg),
        "methods": methods,
        "models": models,
        "train_seeds": replicates.train_seeds(cfg.train.seed, cfg.seeds),
        "total_seconds": time.perf_counter() - started,
    }
    results["comparisons"] = replicates.compare(results)  # wins and ties (seeds > 1)
    if seg:  # dense models export as logits [N, C, S, S] (ktray.dense_export)
        from ktray.pipeline import seg_report

        results.update(
            task_type="segmentation",
            class_names=info["class_names"],
            train_images=info["rows"]["train"],
        )
        if cfg.export.speed:
            results["speed"] = speed_table(cfg, models)
        results["masks_png"] = seg_report.write_picture(cfg, info, models)
        artifacts = seg_report.write_results(cfg.out, results)
        table = seg_report.format_table(results)
    else:
        if cfg.export.speed:
            results["speed"] = speed_table(cfg, models)
        artifacts = write_results(cfg.out, results)
        table = format_table(results)
    spent = accounting.totals([r for r in accounting.gather(cfg.out) if r["run"] == "."])
    manifest.write(
        manifest.stage_dir(cfg.out, "pipeline"),
        {
            "stage": "pipeline",
            "config_hash": "",
            "outputs": artifacts,
            "seconds": results["total_seconds"],
            "flops": spent["flops"],
            "device_seconds": spent["device_seconds"],
        },
        cfg,
    )
    try:
        results["mlflow_run_id"] = log_pipeline(cfg, results, artifacts, models)
        results["mlflow_tracking_uri"] = tracking_uri(cfg) if cfg.tracking.mlflow else None
    except Exception as e:  # tracking must not lose a finished run's results
        log.warning("MLflow logging failed: %s", e)
    print(table)
    print(f"\nresults: {artifacts['json']}  report: {artifacts['md']}  plot: {artifacts['png']}")
    return results
