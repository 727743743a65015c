"""The tiny pipeline logged to a real MLflow tracking server (sqlite backend, proxied artifacts):
params, per-report training curves, artifacts and a registered model version."""

import os
import time
import uuid

from ktray import cli


def test_pipeline_logs_to_mlflow_server(mlflow_server, tiny_task, tmp_path, ray_local, capsys):
    from mlflow import MlflowClient

    experiment = f"ktray-test-{uuid.uuid4().hex[:6]}"
    model_name = f"ktray-student-{uuid.uuid4().hex[:6]}"
    start = time.perf_counter()
    code = cli.main(
        [
            "run",
            "tiny",
            f"data.root={tiny_task}",
            f"out={tmp_path}/out",
            "tracking.mlflow=true",
            f"tracking.tracking_uri={mlflow_server}",
            f"tracking.experiment={experiment}",
            f"tracking.registered_model={model_name}",
            "train.report_every=2",
        ]
    )
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\nmlflow pipeline: {seconds:.1f}s")
    assert code == 0, err[-3000:]
    assert "MLflow logging failed" not in err, err[-3000:]

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    params = parent.data.params
    assert params["distill.steps"] == "4" and params["student.arch"] == "test_resnet"
    assert params["methods"] == "teacher,scratch,task@in_domain"
    assert parent.data.tags["best_student"] in ("scratch", "task@in_domain")
    assert 0.0 <= parent.data.metrics["best_student_test_accuracy"] <= 1.0

    children = {
        r.data.tags["mlflow.runName"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"teacher", "scratch", "task@in_domain"}
    distilled = children["task@in_domain"]
    assert "test_accuracy" in distilled.data.metrics
    # the training curve: one point per report, at its optimizer step
    curve = client.get_metric_history(distilled.info.run_id, "distill/loss")
    assert sorted(m.step for m in curve) == [2, 4]  # every train.report_every steps
    assert client.get_metric_history(distilled.info.run_id, "finetune/loss")[-1].step == 4

    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "results.md", "results.png", "student"} <= names
    student = {a.path for a in client.list_artifacts(parent.info.run_id, "student")}
    assert {"student/model.safetensors", "student/model.json"} <= student

    versions = client.search_model_versions(f"name='{model_name}'")
    assert len(versions) == 1
    v = versions[0]
    assert v.run_id == parent.info.run_id and v.source.endswith("/student")
    assert v.tags["method"] == parent.data.tags["best_student"]
    assert parent.data.tags["registered_version"] == v.version


def test_two_runs_in_one_process_log_into_their_own_outs(tmp_path, monkeypatch):
    """`mlflow.set_tracking_uri` writes $MLFLOW_TRACKING_URI; ktray reads that variable as the
    user's store, so without care a second run in the same process logs into the first
    run's OUT (database and artifacts)."""
    from ktray.config import load_config
    from ktray.pipeline import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uris = []
    for name in ("first", "second"):
        cfg = load_config(None, [f"out={tmp_path}/{name}", "tracking.experiment=two-runs"])
        (tmp_path / name).mkdir()
        mlflow_ = tracking._mlflow(cfg)
        with mlflow_.start_run() as run:
            mlflow_.log_metric("x", 1.0)
        uris.append((mlflow_.get_tracking_uri(), run.info.artifact_uri))
    for name, (db, artifacts) in zip(("first", "second"), uris):
        assert db == "sqlite:///" + str(tmp_path / name / "mlflow.db")
        assert artifacts.startswith((tmp_path / name / "mlartifacts").as_uri())
    assert (tmp_path / "second" / "mlflow.db").exists()
    # and the user's environment is as it was
    assert not {"MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"} & set(os.environ)
