"""Fault tolerance with real process kills.

1. A Ray Train worker process (ray.num_workers=1, not local mode) is SIGKILLed after its first
   epoch checkpoint; FailureConfig(max_failures) restarts the worker group, which restores the
   checkpoint and continues the step count.
2. A `ktray logits` process is SIGKILLed after its first part file; the rerun computes only the
   missing shards and writes no duplicate rows.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

from ktray import io
from ktray.config import load_config
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


def registered_checkpoint(root: str) -> bool:
    """True once the Train controller has registered a checkpoint (its snapshot names one): a
    checkpoint folder alone may not be registered yet, and a worker killed then would restart
    from scratch."""
    for d, _, files in os.walk(root):
        if "checkpoint_manager_snapshot.json" in files:
            try:
                if "checkpoint_" in open(os.path.join(d, "checkpoint_manager_snapshot.json")).read():
                    return True
            except OSError:
                pass
    return False


def test_killed_train_worker_resumes_from_its_checkpoint(tiny_task, tmp_path, ray_local):
    out = str(tmp_path / "out")
    steps = 200
    cfg = load_config("tiny", [f"data.root={tiny_task}", f"out={out}", "ray.num_workers=1",
                               "ray.max_failures=2", f"finetune.scratch_steps={steps}"])
    storage = os.path.join(out, "ray")
    killed: dict = {}

    def kill_worker_after_first_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if os.path.isdir(storage) and registered_checkpoint(storage):
                workers = [p for p in descendants(os.getpid())
                           if "RayTrainWorker" in cmdline(p)]
                if workers:
                    for pid in workers:
                        os.kill(pid, signal.SIGKILL)
                    killed.update(pids=workers, after=time.perf_counter() - start)
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_worker_after_first_checkpoint, daemon=True)
    start = time.perf_counter()
    watcher.start()
    m = finetune_stage.run(cfg, "")
    watcher.join(timeout=5)
    print(f"\nfault tolerance (train): {time.perf_counter() - start:.1f}s, killed {killed}")
    assert killed.get("pids"), "no Ray Train worker was found to kill"
    assert m["steps"] == steps
    resumed = m["metrics"]["resumed_from"]
    assert 0 < resumed < steps, m["metrics"]
    history = [h["step"] for h in m["history"]]
    # reports before the kill come from the checkpoint, those after it continue its count
    assert history == sorted(set(history)) and history[-1] == steps, history
    assert resumed in history and history.index(resumed) < len(history) - 1, history
    assert m["images_seen"] >= steps * 16 * 0.5


def _logits_child(cfg_args: list[str], shard_rows: int) -> str:
    return ("import sys, logging\n"
            "from ktray.config import load_config\n"
            "from ktray.stages import logits\n"
            f"cfg = load_config('tiny', {cfg_args!r})\n"
            f"logits.run(cfg, 'in_domain', shard_rows={shard_rows})\n")


def test_sigkilled_logits_run_resumes_without_duplicates(tiny_task, tmp_path, ray_local):
    from imagegen import make_imagefolder

    make_imagefolder(tiny_task, unlabeled=120, seed=1)  # more unlabeled images: u0..u119
    out = str(tmp_path / "out")
    args = [f"data.root={tiny_task}", f"out={out}", "logits.views=2"]
    cfg = load_config("tiny", args)
    d = logits_stage.logits_dir(cfg, "in_domain")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=REPO)
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _logits_child(args, 8)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    parts_at_kill = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.isdir(d) and any(f.startswith("part-") for f in os.listdir(d)):
                tree = descendants(proc.pid)
                os.killpg(proc.pid, signal.SIGKILL)
                for pid in tree:  # Ray workers start process groups of their own
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                parts_at_kill = len([f for f in os.listdir(d) if f.startswith("part-")])
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        err = proc.communicate(timeout=30)[1].decode(errors="replace")
    assert parts_at_kill, f"the logits run ended before a part was written:\n{err[-3000:]}"
    assert not os.path.exists(os.path.join(d, "manifest.json"))
    n_rows = 2 * 120
    shards = -(-n_rows // 8)
    m = logits_stage.run(cfg, "in_domain", shard_rows=8)
    print(f"\nfault tolerance (logits): {time.perf_counter() - start:.1f}s, "
          f"{parts_at_kill}/{shards} parts at the kill, {m['computed_shards']} recomputed")
    assert m["shards"] == shards and m["rows"] == n_rows
    assert m["computed_shards"] <= shards - parts_at_kill
    table = io.read_parquet(d)
    keys = list(zip(table["image_id"].to_pylist(), table["view"].to_pylist()))
    assert len(keys) == len(set(keys)) == n_rows
    assert json.load(open(os.path.join(d, "manifest.json")))["rows"] == n_rows
