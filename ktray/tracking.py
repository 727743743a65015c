"""MLflow logging of a pipeline run (no ray here).

Default store: ``sqlite:///OUT/mlflow.db`` (MLflow 3.17's file store needs an opt-in); any
tracking URI by config. One parent run per pipeline, one nested run per method.
"""

from __future__ import annotations

import logging
import os
import warnings

from ktray import io
from ktray.config import Config, to_dict

log = logging.getLogger("ktray")


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if io.is_remote(cfg.out):
        return "sqlite:///" + os.path.abspath("mlruns.db")
    return "sqlite:///" + os.path.abspath(io.join(cfg.out, "mlflow.db"))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if not isinstance(v, list) else ",".join(map(str, v))
    return out


def log_pipeline(cfg: Config, results: dict, artifacts: dict, models: dict) -> str | None:
    """Log params, per-method metrics and artifacts; register the best student. Returns the
    parent run id (None when tracking is off)."""
    if not cfg.tracking.mlflow:
        return None
    warnings.filterwarnings("ignore", module="mlflow")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.tracking.experiment)
    with mlflow.start_run(run_name=cfg.name) as parent:
        mlflow.log_params(_flatten(to_dict(cfg)))
        for name, m in results["methods"].items():
            with mlflow.start_run(run_name=name, nested=True):
                mlflow.log_param("method", name)
                mlflow.log_metrics({k: float(v) for k, v in m.items()
                                    if isinstance(v, (int, float)) and v is not None})
                for step, value in enumerate(m.get("history", [])):
                    mlflow.log_metric("train_loss", value, step=step)
        best = max(results["methods"].items(), key=lambda kv: kv[1]["test_accuracy"]
                   if kv[0] != "teacher" else -1)
        mlflow.log_metric("best_student_test_accuracy", best[1]["test_accuracy"])
        for path in artifacts.values():
            if not io.is_remote(path):
                mlflow.log_artifact(path)
        model_dir = models.get(best[0])
        if model_dir and not io.is_remote(model_dir):
            mlflow.log_artifacts(model_dir, artifact_path="student")
        return parent.info.run_id
