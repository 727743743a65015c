"""Fault tolerance with real process kills.

1. A Ray Train worker process (ray.num_workers=1, not local mode; Ray Train storage on S3) is
   SIGKILLed after its first epoch checkpoint; FailureConfig(max_failures) restarts the worker
   group, which restores the checkpoint from S3 and continues the step count.
2. A `ktray logits` process is SIGKILLed after its first part file; the rerun computes only the
   missing shards and writes no duplicate rows.
3. A distillation decode actor (Ray Data; Ray does not restart it) is SIGKILLed after the first
   checkpoint: the epoch's input fails, and the run resumes from its checkpoint.
"""

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from raycluster import session_pids

from ktray import storage
from ktray.config import load_config
from ktray.stages import distill as distill_stage
from ktray.stages import finetune as finetune_stage
from ktray.stages import logits as logits_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (this test's own process tree only)."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_killed_train_worker_resumes_from_its_s3_checkpoint(tiny_task, tmp_path, s3_server, ray_s3):
    """ray.num_workers=1, Ray Train storage on S3 (what a multi-node cluster needs)."""
    out = str(tmp_path / "out")
    steps = 200
    prefix = f"ray-ft-{uuid.uuid4().hex[:6]}"
    cfg = load_config(
        "tiny",
        [
            f"data.root={tiny_task}",
            f"out={out}",
            "ray.num_workers=1",
            "ray.max_failures=2",
            f"finetune.scratch_steps={steps}",
            f"ray.storage_path={s3_server.url(prefix)}",
        ],
    )
    # the Ray Train run is named after the spec's hash: finetune-scratch-<hash>
    snapshots = f"{s3_server.bucket}/{prefix}/finetune-scratch-*/checkpoint_manager_snapshot.json"
    fs = s3_server.make_fs()
    killed: dict = {}

    def registered_checkpoint() -> bool:
        """The Train controller has registered a checkpoint (its snapshot names one). A
        checkpoint folder alone may not be registered yet: killed then, the worker would
        restart from scratch."""
        try:
            fs.invalidate_cache()
            return any("checkpoint_" in fs.cat(p).decode() for p in fs.glob(snapshots))
        except (FileNotFoundError, OSError):
            return False

    def kill_worker_after_first_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if registered_checkpoint():
                workers = [p for p in descendants(os.getpid()) if "RayTrainWorker" in cmdline(p)]
                if workers:
                    for pid in workers:
                        os.kill(pid, signal.SIGKILL)
                    killed.update(pids=workers, after=time.perf_counter() - start)
                    return
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_worker_after_first_checkpoint, daemon=True)
    start = time.perf_counter()
    watcher.start()
    m = finetune_stage.run(cfg, "")
    watcher.join(timeout=5)
    print(f"\nfault tolerance (train): {time.perf_counter() - start:.1f}s, killed {killed}")
    assert killed.get("pids"), "no Ray Train worker was found to kill"
    assert m["steps"] == steps and m["flops"] > 0
    resumed = m["metrics"]["resumed_from"]
    assert 0 < resumed < steps, m["metrics"]
    history = [h["step"] for h in m["history"]]
    # reports before the kill come from the checkpoint, those after it continue its count
    assert history == sorted(set(history)) and history[-1] == steps, history
    assert resumed in history and history.index(resumed) < len(history) - 1, history
    fs.invalidate_cache()
    assert fs.glob(f"{s3_server.bucket}/{prefix}/finetune-scratch-*/checkpoint_*/state.pt")


def _logits_child(cfg_args: list[str], shard_rows: int) -> str:
    return (
        "from ktray.config import load_config\n"
        "from ktray.stages import logits\n"
        f"cfg = load_config('tiny', {cfg_args!r})\n"
        f"logits.run(cfg, 'in_domain', shard_rows={shard_rows})\n"
    )


def test_sigkilled_logits_run_resumes_without_duplicates(tiny_task, tmp_path, ray_local):
    from imagegen import make_imagefolder

    make_imagefolder(tiny_task, unlabeled=48, seed=1)  # more unlabeled images: u0..u47
    out = str(tmp_path / "out")
    args = [f"data.root={tiny_task}", f"out={out}", "logits.views=1"]
    cfg = load_config("tiny", args)
    d = logits_stage.logits_dir(cfg, "in_domain")
    token = tmp_path / "auth_token"  # the child's Ray keeps token authentication on
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PYTHONPATH=REPO)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", _logits_child(args, 4)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    parts_at_kill = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.isdir(d) and any(f.startswith("part-") for f in os.listdir(d)):
                # the whole session: Ray workers start process groups of their own
                for _ in range(3):
                    for pid in session_pids(proc.pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    time.sleep(0.2)
                parts_at_kill = len([f for f in os.listdir(d) if f.startswith("part-")])
                break
            time.sleep(0.02)
    finally:
        for pid in session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        err = proc.communicate(timeout=30)[1].decode(errors="replace")
    assert parts_at_kill, f"the logits run ended before a part was written:\n{err[-3000:]}"
    assert not os.path.exists(os.path.join(d, "manifest.json"))
    n_rows, shards = 48, 12
    m = logits_stage.run(cfg, "in_domain", shard_rows=4)
    print(
        f"\nfault tolerance (logits): {time.perf_counter() - start:.1f}s, "
        f"{parts_at_kill}/{shards} parts at the kill, {m['computed_shards']} recomputed"
    )
    assert m["shards"] == shards and m["rows"] == n_rows
    assert m["computed_shards"] <= shards - parts_at_kill
    table = storage.read_parquet(d)
    keys = list(zip(table["image_id"].to_pylist(), table["view"].to_pylist()))
    assert len(keys) == len(set(keys)) == n_rows
    assert json.load(open(os.path.join(d, "manifest.json")))["rows"] == n_rows


def test_a_killed_decode_actor_fails_the_epoch_and_the_run_resumes(tiny_task, tmp_path, ray_local):
    """The distillation input's decode actors are not restarted by Ray (see
    ``ktray.stages.shards.map_without_restarts``): one killed while it decodes fails the
    epoch's input, and with ``ray.max_failures`` the worker group restarts from its last
    checkpoint. The images are large, so decoding the run's passes (one execution, one actor pool)
    outlasts the first checkpoint's registration, and every decode actor alive after it is
    killed until the worker group restarts, so one dies mid-range."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for i in range(8):
        path = tmp_path / f"big{i}.png"
        Image.fromarray(rng.integers(0, 255, (960, 960, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    parts = tmp_path / "targets"
    parts.mkdir()
    for k in range(8):  # 8 parts of 30 rows: 20 steps a pass, 2 passes in one execution
        pq.write_table(
            pa.table(
                {
                    "image_id": [f"v{k}-{i}" for i in range(30)],
                    "source": [images[(k + i) % len(images)] for i in range(30)],
                    "logits": pa.array(
                        rng.normal(0, 3, (30, 3)).astype(np.float16).tolist(),
                        pa.list_(pa.float16()),
                    ),
                }
            ),
            parts / f"part-{k:05d}.parquet",
        )
    out = tmp_path / "out"
    steps = 40
    cfg = load_config(
        "tiny",
        [
            f"data.root={tiny_task}",
            f"out={out}",
            f"distill.targets={parts}",
            f"distill.steps={steps}",
            "distill.batch_size=12",
            "train.decode_batch=2",
            "train.stripes=1",  # a call a part: 16 calls keep the pool busy past a checkpoint
            "train.cache_decoded_mb=0",  # streamed: the passes decode in one actor pool
            "train.shuffle_buffer=24",  # the first batch waits for 24 rows, not the whole input
            "train.checkpoint_every=5",
            "train.report_every=5",
            "ray.num_workers=1",
            "ray.max_failures=1",
        ],
    )
    killed: list[int] = []

    def registered_checkpoint() -> bool:
        for snap in out.glob("ray/distill-*/checkpoint_manager_snapshot.json"):
            with contextlib.suppress(OSError):
                if "checkpoint_" in snap.read_text():
                    return True
        return False

    done = threading.Event()  # the test is over: kill nothing more (later tests' processes)

    def kill_decode_actors_until_the_workers_restart():
        deadline, first_worker, seen = time.monotonic() + 240, None, {}
        while time.monotonic() < deadline and not done.is_set():
            procs = {p: cmdline(p) for p in descendants(os.getpid())}
            workers = sorted(p for p, c in procs.items() if "RayTrainWorker" in c)
            if workers and first_worker is None:
                first_worker = workers[0]
            if workers and workers[0] != first_worker:
                return  # the worker group restarted
            if registered_checkpoint():
                now = time.monotonic()
                for pid in (p for p, c in procs.items() if "ReadDecodeRanges" in c):
                    if now - seen.setdefault(pid, now) > 0.3:  # started, decoding
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                            killed.append(pid)
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_decode_actors_until_the_workers_restart, daemon=True)
    start = time.perf_counter()
    watcher.start()
    try:
        m = distill_stage.run(cfg, "in_domain", "task")
    finally:
        done.set()
        watcher.join(timeout=5)
    print(f"\nfault tolerance (decode actors): {time.perf_counter() - start:.1f}s, killed {killed}")
    assert killed, "no decode actor was found to kill after the first checkpoint"
    assert m["steps"] == steps
    resumed = m["metrics"]["resumed_from"]
    assert 0 < resumed < steps, m["metrics"]
    history = [h["step"] for h in m["history"]]
    assert history == sorted(set(history)) and history[-1] == steps, history
