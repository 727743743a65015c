"""Offline checks of cluster/: Ray cluster-launcher YAMLs and KubeRay manifests.

The launcher YAMLs go through what `ray up` does before it talks to a cloud:
`prepare_config` (fillout_defaults with the provider's defaults.yaml, merge_setup_commands,
validate_docker_config, fill_node_type_min_max_workers) and then `validate_config`
(ray-schema.json + cross-field checks). Only the provider's `bootstrap_config` (IAM, key
pairs, subnets, AMI lookup) and AWS's resource auto-detection need the cloud and are skipped.

The KubeRay manifests go through `_derive_autoscaling_config_from_ray_cr`, the function the
KubeRay autoscaler sidecar uses to turn a RayCluster CR into an autoscaler config (it ends
with validate_config).
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
pytest.importorskip("jsonschema")

from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
KUBERAY = {
    "raycluster": CLUSTER / "kuberay" / "raycluster.yaml",
    "rayjob": CLUSTER / "kuberay" / "rayjob.yaml",
}
IMAGE_RE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-(?P<py>py\d+)-gpu$")


def _load(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    return docs[0]


def test_all_cluster_yamls_parse():
    paths = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
    assert {p.name for p in paths} >= {"aws.yaml", "gcp.yaml", "raycluster.yaml", "rayjob.yaml"}
    for p in paths:
        for doc in yaml.safe_load_all(p.read_text()):
            assert doc is None or isinstance(doc, dict), p


# ------------------------------------------------------------------ Ray cluster launcher


@pytest.fixture(params=sorted(LAUNCHER), ids=sorted(LAUNCHER))
def launcher(request):
    raw = _load(LAUNCHER[request.param])
    prepared = prepare_config(copy.deepcopy(raw))
    return request.param, raw, prepared


def test_launcher_validates_like_ray_up(launcher):
    provider, raw, prepared = launcher
    assert raw["provider"]["type"] == provider
    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError
    # no field was left for the provider's defaults.yaml to fill silently
    for key in (
        "head_setup_commands",
        "worker_setup_commands",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
        "file_mounts",
        "available_node_types",
        "head_node_type",
        "docker",
    ):
        assert key in raw, (
            f"{provider}: {key} must be set explicitly (else defaults.yaml supplies it)"
        )


def test_launcher_validator_rejects_typos(launcher):
    """The validator really bites: an unknown key and a fractional resource are errors."""
    import jsonschema

    provider, raw, _ = launcher
    bad = copy.deepcopy(raw)
    bad["setup_comands"] = ["true"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    worker = next(k for k in bad["available_node_types"] if k != bad["head_node_type"])
    bad["available_node_types"][worker]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_launcher_node_types(launcher):
    provider, raw, prepared = launcher
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != prepared["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0, "the head is CPU-only"
    assert head["max_workers"] == 0
    gpu_workers = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, f"{provider}: no GPU worker type"
    for name, w in gpu_workers.items():
        assert 0 <= w["min_workers"] <= w["max_workers"] <= prepared["max_workers"], name
        assert w["max_workers"] >= 1, name
    if provider == "aws":
        for w in gpu_workers.values():
            itype = w["node_config"]["InstanceType"]
            assert itype.split(".")[0] in {"g4dn", "g5", "g6", "g6e"}, itype
            assert "deeplearning" in w["node_config"]["ImageId"], "expected a Deep Learning AMI"
    else:
        for w in gpu_workers.values():
            nc = w["node_config"]
            accels = nc.get("guestAccelerators", [])
            assert nc["machineType"].startswith("g2-") or any(
                a["acceleratorType"] in {"nvidia-tesla-t4", "nvidia-l4"}
                and a["acceleratorCount"] >= 1
                for a in accels
            ), nc
            assert nc.get("scheduling", {}).get("onHostMaintenance") == "TERMINATE"


def test_launcher_installs_the_working_tree(launcher):
    provider, raw, prepared = launcher
    assert raw["file_mounts"] == {"~/ktray": "."}
    for key in ("head_setup_commands", "worker_setup_commands"):  # after merge_setup_commands
        assert any(
            shlex.split(c)[:3] == ["pip", "install", "-e"] and c.rstrip().endswith("~/ktray")
            for c in prepared[key]
        ), (provider, key, prepared[key])
    excluded = " ".join(raw.get("rsync_exclude", []))
    assert ".venv" in excluded and ".git" in excluded, "the 6 GB venv and .git must not be rsynced"
    assert any("ray start --head" in c for c in raw["head_start_ray_commands"])
    assert any(
        "--autoscaling-config=~/ray_bootstrap_config.yaml" in c
        for c in raw["head_start_ray_commands"]
    )
    assert any("$RAY_HEAD_IP:6379" in c for c in raw["worker_start_ray_commands"])


def test_launcher_image_matches_installed_ray(launcher):
    provider, raw, _ = launcher
    m = IMAGE_RE.match(raw["docker"]["image"])
    assert m, raw["docker"]["image"]
    assert m["ray"] == ray.__version__


# ------------------------------------------------------------------------------ KubeRay


def _containers(pod_template):
    return pod_template["spec"]["containers"]


def _cluster_spec(name):
    doc = _load(KUBERAY[name])
    return doc, (doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"])


@pytest.mark.parametrize("name,kind", [("raycluster", "RayCluster"), ("rayjob", "RayJob")])
def test_kuberay_kind_and_operator_comment(name, kind):
    text = KUBERAY[name].read_text()
    doc = _load(KUBERAY[name])
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert doc["metadata"]["name"]
    assert re.search(r"^# KubeRay operator: v?\d+\.\d+(\.\d+|\.x)\b", text, re.M), (
        "operator version comment"
    )


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_cluster_spec(name):
    doc, spec = _cluster_spec(name)
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    images = [c["image"] for c in _containers(spec["headGroupSpec"]["template"])]
    for g in spec["workerGroupSpecs"]:
        images += [c["image"] for c in _containers(g["template"])]
    for image in images:
        m = IMAGE_RE.match(image)
        assert m and m["ray"] == ray.__version__, image
    # the head asks for no GPU; some worker group asks for one per pod
    for c in _containers(spec["headGroupSpec"]["template"]):
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    gpu_groups = []
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        assert g["maxReplicas"] >= 1
        for c in _containers(g["template"]):
            limits = c.get("resources", {}).get("limits", {})
            if int(limits.get("nvidia.com/gpu", 0)) >= 1:
                assert int(c["resources"]["requests"]["nvidia.com/gpu"]) == int(
                    limits["nvidia.com/gpu"]
                )
                gpu_groups.append(g["groupName"])
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_autoscaler_reads_the_cluster(name):
    """What the KubeRay autoscaler sidecar derives from the CR: validated, GPU workers seen."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    doc, spec = _cluster_spec(name)
    cr = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": doc["metadata"]["name"], "namespace": "default"},
        "spec": copy.deepcopy(spec),
    }
    config = _derive_autoscaling_config_from_ray_cr(cr)  # ends with validate_config
    types = config["available_node_types"]
    assert types["headgroup"]["resources"].get("GPU", 0) == 0
    assert any(
        t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1
        for k, t in types.items()
        if k != "headgroup"
    )


def test_rayjob_entrypoint_and_runtime_env():
    from ray.runtime_env import RuntimeEnv

    doc = _load(KUBERAY["rayjob"])
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/pipeline.py"]
    assert argv[2].endswith((".yaml", ".yml"))
    assert any(a.startswith("out=s3://") for a in argv[3:])
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own runtime_env validation
    assert env["working_dir"].startswith(("s3://", "gs://", "https://"))
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_all_configs_use_one_image():
    images = set()
    for p in LAUNCHER.values():
        images.add(_load(p)["docker"]["image"])
    for name in KUBERAY:
        _, spec = _cluster_spec(name)
        for c in _containers(spec["headGroupSpec"]["template"]):
            images.add(c["image"])
        for g in spec["workerGroupSpecs"]:
            images |= {c["image"] for c in _containers(g["template"])}
    assert len(images) == 1, images


# ---------------------------------------------------------------- commands vs. the Ray CLI


def _ray_start_options() -> set[str]:
    from ray.scripts.scripts import start

    return {opt for p in start.params for opt in (*p.opts, *p.secondary_opts)}


def _ray_start_flags(command: str) -> list[str]:
    """The --options of every `ray start` in a shell command line."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    flags, argv = [], []
    for token in [*lexer, ";"]:
        if token and set(token) <= set(";&|"):
            if argv[:2] == ["ray", "start"]:
                flags += [a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")]
            argv = []
        else:
            argv.append(token)
    return flags


def test_launcher_commands_are_shell_and_ray_start_options_exist(launcher):
    import subprocess

    provider, raw, _ = launcher
    known = _ray_start_options()
    seen = []
    for key in (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        for cmd in raw.get(key, []):
            r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert r.returncode == 0, (provider, key, cmd, r.stderr)
            seen += _ray_start_flags(cmd)
    assert "--head" in seen
    unknown = sorted(set(seen) - known)
    assert not unknown, f"{provider}: `ray start` has no option(s) {unknown}"


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_ray_start_params_exist(name):
    _, spec = _cluster_spec(name)
    known = _ray_start_options()
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for g in groups:
        for key in g.get("rayStartParams", {}):
            assert f"--{key}" in known, (
                f"{name}: rayStartParams {key!r} is not a `ray start` option"
            )
