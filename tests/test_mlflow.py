"""The tiny pipeline logged to a real MLflow tracking server (sqlite backend, proxied artifacts):
params, per-report training curves, artifacts and a registered model version."""

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
