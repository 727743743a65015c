"""MLflow logging of a pipeline run (no ray here).

Default store: ``sqlite:///OUT/mlflow.db`` (MLflow 3.17's file store needs an opt-in); any
tracking URI by config. One parent run per pipeline, one nested run per method; one parent
run per sweep, one nested run per trial.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

from ktray import storage
from ktray.config import Config, to_dict

log = logging.getLogger("ktray")


def tracking_uri(cfg: Config) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI`` (a job's runtime_env sets it),
    else a sqlite file in OUT (in the working directory when OUT is remote)."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if storage.is_remote(cfg.out):
        return "sqlite:///" + os.path.abspath("mlruns.db")
    return "sqlite:///" + os.path.abspath(storage.join(cfg.out, "mlflow.db"))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if not isinstance(v, list) else ",".join(map(str, v))
    return out


def _mlflow(cfg: Config):
    warnings.filterwarnings("ignore", module="mlflow")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    import mlflow

    uri = tracking_uri(cfg)
    with _environment_kept(MLFLOW_ENV):
        mlflow.set_tracking_uri(uri)
        if (
            uri.startswith("sqlite:///")
            and mlflow.get_experiment_by_name(cfg.tracking.experiment) is None
        ):
            # Artifacts beside the database (OUT/mlartifacts), not in ./mlruns of whatever
            # folder the command ran from; a tracking server keeps its own artifact store.
            root = os.path.join(os.path.dirname(uri[len("sqlite:///") :]), "mlartifacts")
            mlflow.create_experiment(
                cfg.tracking.experiment, artifact_location=Path(os.path.abspath(root)).as_uri()
            )
        mlflow.set_experiment(cfg.tracking.experiment)
    return mlflow


# MLflow 3's set_tracking_uri / set_experiment also write these into os.environ. ktray reads
# $MLFLOW_TRACKING_URI as the user's choice (tracking_uri above), so a second run in the same
# process (tests, a notebook, two configs in one script) would log into the first run's store,
# artifacts included. The user's own values (or their absence) are put back.
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@contextlib.contextmanager
def _environment_kept(names):
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _numeric(d: dict) -> dict:
    return {
        k: float(v)
        for k, v in d.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    }


HISTORY = ("loss", "kd", "agree", "feat", "train_acc", "val_accuracy", "lr")


def log_sweep(
    cfg: Config, rows: list[dict], keys: list[str], artifacts: dict, histories: dict | None = None
) -> str | None:
    """One parent run for the sweep (its config, table, plots), one child run per trial (its
    swept values, results and the training curves of ``histories[trial]``: a list of report
    dicts with ``pipeline_step``). Returns the parent run id (None when tracking is off)."""
    if not cfg.tracking.mlflow:
        return None
    mlflow = _mlflow(cfg)
    with mlflow.start_run(run_name=f"sweep-{cfg.name}") as parent:
        mlflow.set_tag("ktray.kind", "sweep")
        mlflow.log_params(_flatten(to_dict(cfg)))
        for row in rows:
            with mlflow.start_run(run_name=row["trial"], nested=True):
                mlflow.set_tag("ktray.kind", "sweep-trial")
                mlflow.log_params(
                    {
                        **{k: str(row.get(k)) for k in keys},
                        "status": row.get("status"),
                        "method": cfg.sweep.method,
                        "trial_dir": row.get("trial_dir"),
                    }
                )
                mlflow.log_metrics(_numeric(row))
                for report in (histories or {}).get(row["trial"], []):
                    values = _numeric({k: report.get(k) for k in HISTORY})
                    if values and report.get("pipeline_step") is not None:
                        mlflow.log_metrics(values, step=int(report["pipeline_step"]))
        done = [r for r in rows if r.get(cfg.sweep.metric) is not None]
        if done:
            pick = max if cfg.sweep.mode == "max" else min
            best = pick(done, key=lambda r: r[cfg.sweep.metric])
            mlflow.log_metric(f"best_{cfg.sweep.metric}", best[cfg.sweep.metric])
            mlflow.set_tag("best_trial", best["trial"])
        for path in artifacts.values():
            if not storage.is_remote(path):
                mlflow.log_artifact(path)
        return parent.info.run_id


def _stage_runs(cfg: Config, method: str) -> list[tuple[str, str]]:
    """(stage label, stage folder) of the training stages behind a method's result (its first
    replicate's, ``train.seed``, when ``seeds > 1``)."""
    from ktray.pipeline.manifest import stage_dir
    from ktray.pipeline.replicates import stage_name

    if method == "teacher":
        return [("teacher", stage_dir(cfg.out, "teacher"))]
    name = stage_name(method, cfg.train.seed)
    if method == "scratch":
        return [("finetune", stage_dir(cfg.out, "finetune", name))]
    return [
        ("distill", stage_dir(cfg.out, "distill", name)),
        ("finetune", stage_dir(cfg.out, "finetune", name)),
    ]


def _histories(cfg: Config, method: str) -> dict[str, list[dict]]:
    """The per-report training metrics the stage manifests keep (``history``)."""
    from ktray.pipeline.manifest import MANIFEST

    out = {}
    for label, folder in _stage_runs(cfg, method):
        uri = storage.join(folder, MANIFEST)
        if storage.exists(uri):
            out[label] = storage.read_json(uri).get("history") or []
    return out


def _log_history(client, run_id: str, histories: dict[str, list[dict]]) -> None:
    """Every report as metrics ``STAGE/KEY`` at its optimizer step, in batches."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(f"{stage}/{k}", v, now, int(report["step"]))
        for stage, reports in histories.items()
        for report in reports
        if "step" in report
        for k, v in _numeric(report).items()
        if k not in ("step", "epoch")
    ]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000])


def _local_copy(uri: str, tmp: str) -> str:
    """``uri`` itself when local, else a copy of the file / folder under ``tmp``."""
    if not storage.is_remote(uri):
        return uri
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if storage.exists(storage.join(uri, "model.json")):
        return storage.download_dir(uri, os.path.join(tmp, name))
    local = os.path.join(tmp, name)
    with open(local, "wb") as f:
        f.write(storage.read_bytes(uri))
    return local


def log_student_model(mlflow, cfg: Config, model_dir: str, tmp: str, export_dir: str = "") -> str:
    """Log a checkpoint as the run's ``student/`` artifacts: an MLflow pyfunc model
    (:mod:`ktray.serving`) over its ONNX export (``export_dir/model.onnx`` when that exists,
    else exported now; the PyTorch checkpoint when export fails), with the checkpoint files
    beside it. Returns the backend, ``onnx`` or ``pytorch``."""
    import io

    from PIL import Image

    from ktray import export
    from ktray.errors import KtrayError
    from ktray.serving import log_pyfunc_model

    spec_path = os.path.join(model_dir, "model.json")
    onnx_path = storage.join(export_dir, export.ONNX_FILE) if export_dir else ""
    if not (onnx_path and not storage.is_remote(onnx_path) and os.path.exists(onnx_path)):
        try:
            ec = cfg.export
            onnx_path = export.export_model(
                model_dir,
                os.path.join(tmp, "onnx"),
                exporter=ec.exporter,
                atol=ec.atol,
                check_images=ec.check_images,
            )["files"]["onnx"]
        except KtrayError as e:
            log.warning("MLflow: the student is logged as PyTorch (%s)", e)
            onnx_path = ""
    artifacts = {"spec": spec_path}
    artifacts.update({"onnx": onnx_path} if onnx_path else {"checkpoint": model_dir})
    size = int(storage.read_json(spec_path)["img_size"])
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buf, format="PNG")
    files = {name: os.path.join(model_dir, name) for name in ("model.safetensors", "model.json")}
    log_pyfunc_model(mlflow, "student", artifacts, buf.getvalue(), extra_files=files)
    return "onnx" if onnx_path else "pytorch"


def _register(
    client, name: str, run, method: str, accuracy: float, metric: str = "test_accuracy"
) -> str | None:
    """A new version of registered model ``name`` from the run's ``student/`` artifacts; None
    (and a log line) when the tracking store has no model registry."""
    from mlflow.exceptions import MlflowException

    try:
        try:
            client.create_registered_model(name, description="ktray distilled student")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/student",
            run_id=run.info.run_id,
            tags={"method": method, metric: f"{accuracy:.4f}"},
            description=f"best student of pipeline run {run.info.run_id}: {method}",
        )
    except Exception as e:  # e.g. a store without a model registry
        log.info(
            "MLflow: the best student is not registered (%s)",
            str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__,
        )
        return None
    log.info("MLflow: registered model %s version %s (%s)", name, version.version, method)
    return str(version.version)


def log_pipeline(cfg: Config, results: dict, artifacts: dict, models: dict) -> str | None:
    """Log params, per-method metrics and training curves (``STAGE/KEY`` per optimizer step),
    the results and the best student's checkpoint as artifacts; register that student as a
    version of ``tracking.registered_model``. Returns the parent run id (None when off)."""
    if not cfg.tracking.mlflow:
        return None
    import tempfile

    mlflow = _mlflow(cfg)
    client = mlflow.MlflowClient()
    with mlflow.start_run(run_name=cfg.name) as parent, tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tag("ktray.kind", "pipeline")
        mlflow.log_params(_flatten(to_dict(cfg)))
        for name, m in results["methods"].items():
            with mlflow.start_run(run_name=name, nested=True) as child:
                mlflow.set_tag("ktray.kind", "method")
                mlflow.log_params({"method": name, "model": models.get(name, "")})
                mlflow.log_metrics(_numeric(m))  # the mean over seeds (+ KEY_std, n_seeds)
                for i, rep in enumerate(m.get("seeds") or []):  # each replicate, step = index
                    for k, v in _numeric(rep).items():
                        if k != "seed":
                            mlflow.log_metric(f"seed/{k}", v, step=i)
                _log_history(client, child.info.run_id, _histories(cfg, name))
        for path in artifacts.values():
            mlflow.log_artifact(_local_copy(path, tmp))
        # the task's metric: test mIoU for segmentation (its student logs as a segmenter)
        key = "test_miou" if results.get("task_type") == "segmentation" else "test_accuracy"
        students = {
            k: v for k, v in results["methods"].items() if k != "teacher" and v.get(key) is not None
        }
        if students:
            best, m = max(students.items(), key=lambda kv: kv[1][key])
            mlflow.log_metric(f"best_student_{key}", m[key])
            mlflow.set_tag("best_student", best)
            if models.get(best):
                log_student_model(
                    mlflow,
                    cfg,
                    _local_copy(models[best], tmp),
                    tmp,
                    storage.join(cfg.out, "export", best),
                )
                name = cfg.tracking.registered_model
                version = _register(client, name, parent, best, m[key], key) if name else None
                if version is not None:
                    mlflow.set_tags({"registered_model": name, "registered_version": version})
        return parent.info.run_id
