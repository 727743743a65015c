"""A finished sweep's trials as table rows: each trial's values, results and own compute.

A trial the ASHA scheduler stopped gets a ``stopped`` manifest for the stage it was in (steps,
images, seconds and FLOPs up to its last report), so the sweep totals and ``ktray report``
include what it spent. Used by ``ktray sweep`` (``ktray.stages.sweep``) after ``Tuner.fit``.
"""

from __future__ import annotations

import logging
import os
import re

from ktray import storage
from ktray.config import Config, apply_overrides
from ktray.pipeline import accounting, manifest, sweeps

log = logging.getLogger("ktray")
RESULT_KEYS = (
    "test_accuracy",
    "distill_test_accuracy",
    "test_miou",
    "distill_test_miou",
    "test_pixel_accuracy",
    "pretrain_flops",
    "finetune_flops",
    "transfer_images",
    "train_seconds",
    "wall_seconds",
)


def sweep_dir(cfg: Config) -> str:
    return storage.join(cfg.out, "sweep")


def trial_rows(cfg: Config, grid, params: list[sweeps.Param], out_dir: str) -> tuple[list, dict]:
    rows, histories = [], {}
    for r in grid:
        values = {p.key: r.config.get(p.key) for p in params}
        name = sweeps.trial_name(values)
        row = {"trial": name, "status": "done", **values}
        try:
            df = r.metrics_dataframe
            histories[name] = df.to_dict("records") if df is not None else []
        except Exception:
            histories[name] = []
        tj = storage.join(out_dir, name, "trial.json")
        if r.error is None and (r.metrics or {}).get("ktray_done") and storage.exists(tj):
            done = storage.read_json(tj)
            row.update({k: done.get(k) for k in RESULT_KEYS})
        elif r.error is not None:
            row["status"] = "error"
            row["error"] = (str(r.error).strip().splitlines() or ["?"])[-1][:300]
        else:
            row["status"] = "stopped"  # by the ASHA scheduler
            row["stopped_in"] = record_stopped(
                cfg, values, storage.join(out_dir, name), histories[name]
            )
        row["trial_dir"] = storage.join(out_dir, name)
        rows.append(row)
    add_trial_compute(rows, out_dir)
    return rows, histories


def record_stopped(cfg: Config, values: dict, trial_dir: str, history: list[dict]) -> str:
    """Write ``TRIAL/stopped/manifest.json`` for the stage a stopped trial was in, from its
    last report (steps, images, seconds) with FLOPs estimated as 3x the student's forward
    FLOPs per trained image (the teacher stage's: not estimated); returns ``stage[name] at
    step S``. The stages it finished have their own manifests already."""
    reports = [h for h in history if h.get("stage") and h.get("images") is not None]
    if not reports:
        return ""
    last = reports[-1]
    label = str(last["stage"])  # the Ray Train run's name: STAGE-NAME[-HASH8]
    kind, _, name = label.partition("-")
    name = "" if re.fullmatch(r"[0-9a-f]{8}", name) else re.sub(r"-[0-9a-f]{8}$", "", name)
    done = manifest.stage_dir(trial_dir, kind, name)
    if storage.exists(storage.join(done, manifest.MANIFEST)):
        return ""  # it finished that stage: its own manifest counts it
    images, seconds = float(last["images"]), float(last.get("seconds") or 0.0)
    flops, fpi = None, None
    trial_cfg = apply_overrides(apply_overrides(cfg, values), {"out": trial_dir})
    if kind in ("distill", "finetune"):
        try:
            fpi = _student_forward_flops(trial_cfg, name, trial_dir)
            flops = 3.0 * fpi * images
        except Exception as e:  # an estimate: never lose the sweep's results over it
            log.warning("sweep: no FLOPs estimate for stopped %s: %s", label, e)
    step = int(last.get("step") or 0)
    stage_name = f"{kind}[{name}]" if name else kind
    manifest.write(
        storage.join(trial_dir, accounting.STOPPED),
        {
            "stage": accounting.STOPPED,
            "name": f"{stage_name} at step {step}",
            "config_hash": "",
            "stopped_stage": kind,
            "stopped_name": name,
            "steps": step,
            "images_seen": images,
            "seconds": seconds,
            "device_seconds": seconds * max(1, cfg.ray.num_workers),
            "flops": flops,
            "flops_per_image": fpi,
            "flops_estimated": flops is not None,
        },
        trial_cfg,
    )
    return f"{stage_name} at step {step}"


def _student_forward_flops(cfg: Config, method: str, trial_dir: str) -> float:
    """The forward FLOPs per image of the trial's student (as the training stages count)."""
    from ktray.models import create_student
    from ktray.models.flops import count_flops

    data = storage.join(trial_dir, "data", manifest.MANIFEST)
    num_classes = int(storage.read_json(data)["num_classes"]) if storage.exists(data) else 10
    s = cfg.student
    model = create_student(s.arch, num_classes, img_size=s.img_size)
    return float(count_flops(model, s.img_size))


def add_trial_compute(rows: list[dict], out_dir: str) -> None:
    """Each row's own ``flops`` / ``device_seconds``: the manifests in its trial folder that
    are not views of ``sweep/shared`` (finished stages + a stopped one)."""
    gathered = accounting.gather(out_dir)
    for row in rows:
        run = os.path.basename(row["trial_dir"].rstrip("/"))
        own = [
            g
            for g in gathered
            if g["run"] == run and not g["shared"] and g["stage"] not in accounting.AGGREGATES
        ]
        row["flops"] = sum(g["flops"] or 0.0 for g in own)
        row["device_seconds"] = sum(g["device_seconds"] or 0.0 for g in own)
