"""The logits stage's outputs: the teacher's predictions on exactly the stored views, a resumed
job that leaves finished shards alone, and changed settings that force a recomputation."""

import os

import numpy as np
import pytest
import torch
from imagegen import make_imagefolder

from ktray import storage
from ktray.config import load_config
from ktray.data.sources import load_images
from ktray.data.views import ViewParams, apply_view
from ktray.models import load_model
from ktray.stages import logits as logits_stage

# a module fixture trains several stages: minutes on a loaded 2-core machine
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

SHARD_ROWS = 16  # 24 images x 3 views = 72 rows -> 5 shards


@pytest.fixture(scope="module")
def shapes_logits(tmp_path_factory, ray_local):
    """A trained tiny teacher and its logits over 24 shape images x 3 views (2 random crops)."""
    base = tmp_path_factory.mktemp("shapes")
    root = make_imagefolder(str(base / "task"))
    overrides = [f"data.root={root}", f"out={base / 'out'}", "data.generic_images=0"]
    cfg = load_config("tiny", overrides + ["logits.views=3"])
    m = logits_stage.run(cfg, "in_domain", shard_rows=SHARD_ROWS)
    return {
        "cfg": cfg,
        "overrides": overrides,
        "manifest": m,
        "dir": logits_stage.logits_dir(cfg, "in_domain"),
    }


def _as_array(column) -> np.ndarray:
    return np.asarray(column.to_pylist(), dtype=np.float32)


def test_stored_logits_are_the_teacher_on_the_stored_view(shapes_logits):
    cfg = shapes_logits["cfg"]
    table = storage.read_parquet(shapes_logits["dir"])
    assert table.num_rows == 72 and sorted(set(table["view"].to_pylist())) == [0, 1, 2]
    teacher, spec = load_model(os.path.join(cfg.out, "teacher", "model"))
    teacher.eval()
    rows = table.to_pylist()
    sources = sorted({r["source"] for r in rows})
    images = dict(zip(sources, load_images(sources)))
    size, mean, std = spec["img_size"], spec["mean"], spec["std"]

    def view(r):
        return ViewParams(r["x0"], r["y0"], r["x1"], r["y1"], bool(r["flip"]))

    with torch.no_grad():
        want = teacher(
            torch.stack([apply_view(images[r["source"]], view(r), size, mean, std) for r in rows])
        ).numpy()
        full = teacher(
            torch.stack(
                [apply_view(images[r["source"]], ViewParams.full(), size, mean, std) for r in rows]
            )
        ).numpy()
    got = _as_array(table["logits"])
    scale = float(np.abs(want).max())
    tol = 2e-3 * scale  # float16 storage: ~1e-3 relative
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=tol)
    # The crops matter: the teacher on the full image is far from the stored crop logits, so
    # logits computed on any other box than the stored one cannot pass the check above.
    crops = np.asarray([r["view"] > 0 for r in rows])
    assert np.abs(full[crops] - got[crops]).max() > 20 * tol


def test_resumed_job_leaves_finished_shards_untouched(shapes_logits):
    cfg, d = shapes_logits["cfg"], shapes_logits["dir"]
    parts = sorted(f for f in os.listdir(d) if f.startswith("part-"))
    assert len(parts) == 5
    before = {f: os.stat(os.path.join(d, f)) for f in parts}
    logits_before = _as_array(storage.read_parquet(d)["logits"])
    # a killed job: one shard's part file and the manifest never written
    os.remove(os.path.join(d, parts[2]))
    os.remove(os.path.join(d, "manifest.json"))
    m = logits_stage.run(cfg, "in_domain", shard_rows=SHARD_ROWS)
    assert m["rows"] == 72 and m["computed_shards"] == 1
    for f in parts:
        if f != parts[2]:
            st = os.stat(os.path.join(d, f))
            assert (st.st_ino, st.st_mtime_ns) == (before[f].st_ino, before[f].st_mtime_ns), f
    assert os.path.exists(os.path.join(d, parts[2]))
    np.testing.assert_allclose(
        _as_array(storage.read_parquet(d)["logits"]), logits_before, rtol=1e-3, atol=1e-4
    )
    assert not [f for f in os.listdir(d) if ".tmp" in f]


def test_changed_logits_settings_recompute_and_unchanged_reuse(shapes_logits):
    d = shapes_logits["dir"]
    cfg = load_config("tiny", shapes_logits["overrides"] + ["logits.views=3"])
    stamp = os.stat(os.path.join(d, "manifest.json")).st_mtime_ns
    m = logits_stage.run(cfg, "in_domain", shard_rows=SHARD_ROWS)
    assert os.stat(os.path.join(d, "manifest.json")).st_mtime_ns == stamp  # reused
    assert m["rows"] == 72
    cfg2 = load_config("tiny", shapes_logits["overrides"] + ["logits.views=2"])
    m2 = logits_stage.run(cfg2, "in_domain", shard_rows=SHARD_ROWS)
    assert m2["rows"] == 48 and m2["config_hash"] != m["config_hash"]
    table = storage.read_parquet(d)
    assert table.num_rows == 48 and sorted(set(table["view"].to_pylist())) == [0, 1]


def test_images_replaced_under_the_same_path_are_recomputed(shapes_logits, tmp_path):
    """A transfer set's reuse key covers its files (names, sizes, modification times), not
    only its path: a rerun over unchanged files reuses, an image replaced in place recomputes."""
    import shutil

    cfg = shapes_logits["cfg"]
    folder = tmp_path / "more"
    unl = os.path.join(cfg.data.root, "unlabeled")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(unl) for f in fs)[:4]
    names = [f"img{i}.png" for i in range(len(files))]
    folder.mkdir()
    for f, n in zip(files, names):
        shutil.copy(f, folder / n)
    uri = str(folder)
    m = logits_stage.run(cfg, uri, shard_rows=SHARD_ROWS)
    d = logits_stage.logits_dir(cfg, uri)
    stamp = os.stat(os.path.join(d, "manifest.json")).st_mtime_ns
    assert logits_stage.run(cfg, uri, shard_rows=SHARD_ROWS)["config_hash"] == m["config_hash"]
    assert os.stat(os.path.join(d, "manifest.json")).st_mtime_ns == stamp  # reused

    def logits_of(name):
        t = storage.read_parquet(d)
        rows = [r for r in t.to_pylist() if r["source"].endswith(name) and r["view"] == 0]
        return np.asarray(rows[0]["logits"], np.float32)

    before = logits_of(names[0])
    shutil.copy(files[-1], folder / names[0])  # another image under the same name
    m2 = logits_stage.run(cfg, uri, shard_rows=SHARD_ROWS)
    assert m2["config_hash"] != m["config_hash"] and m2["computed_shards"] == m2["shards"]
    np.testing.assert_allclose(logits_of(names[0]), logits_of(names[-1]), rtol=1e-3, atol=1e-3)
    assert np.abs(logits_of(names[0]) - before).max() > 1e-2
