"""The distillation input's Ray Data dataset (``ktray.stages.train_data.view_dataset``)."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

from ktray.config import load_config
from ktray.data import columns as C
from ktray.stages.train_data import view_dataset
from ktray.train.specs import DistillSpec

FILES, PER_FILE = 64, 2


def _parts(tmp_path):
    """FILES Parquet parts of PER_FILE view rows each; row r's first logit is r (exact in
    float16), so a delivered batch names its rows."""
    rng = np.random.default_rng(0)
    n = FILES * PER_FILE
    srcs = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (6, 7, 3), dtype=np.uint8)).save(p)
        srcs.append(str(p))
    logits = np.zeros((n, 3), np.float16)
    logits[:, 0] = np.arange(n)
    table = pa.table(
        {
            C.IMAGE_ID: [f"i{i}" for i in range(n)],
            C.SOURCE: srcs,
            C.LOGITS: pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), 3),
        }
    )
    d = tmp_path / "parts"
    d.mkdir()
    for k in range(FILES):
        pq.write_table(table.slice(k * PER_FILE, PER_FILE), d / f"part-{k:05d}.parquet")
    return str(d), table


def test_parquet_views_stream_their_passes_in_new_file_orders_without_a_barrier(
    tmp_path, ray_local
):
    """The passes a run needs (``steps`` x ``distill.batch_size`` rows) come in one execution
    (one decode actor pool), each pass every row once in its own random file order."""
    uri, _ = _parts(tmp_path)
    cfg = load_config(
        None,
        [
            f"out={tmp_path}/out",
            "train.decode_concurrency=1",
            "train.decode_batch=4",
            "distill.batch_size=64",
            "train.stripes=1",  # a call a file: the order of the files
        ],
    )
    spec = DistillSpec.from_config(cfg, "task")
    rows = FILES * PER_FILE
    ds = view_dataset(uri, [C.SOURCE, C.LOGITS], {"x": 8}, spec, seed=3, steps=3)
    assert ds.passes == 2  # 3 steps x 64 rows of a 128-row table
    got = np.concatenate(
        [b[C.LOGITS][:, 0] for b in ds.iter_batches(batch_size=8, batch_format="numpy")]
    ).astype(int)
    assert len(got) == 2 * rows
    orders = []
    for one in (got[:rows], got[rows:]):  # in order (seeded): the passes one after the other
        assert sorted(one.tolist()) == list(range(rows))  # every row once a pass
        files = list(dict.fromkeys((one // PER_FILE).tolist()))  # order of first appearance
        assert sorted(files) == list(range(FILES))
        orders.append(files)
    # the files come in a random order: without the shuffle the reader's threads permute the
    # name order only locally (rank correlation 0.9-0.98 from the second epoch on, 0.48 at
    # worst in a first epoch); a shuffle's is ~N(0, 0.13) (|rho| > 0.5: p ~ 1e-4 for 64 files)
    for files in orders:
        rho = np.corrcoef(np.arange(FILES), files)[0, 1]
        assert abs(rho) < 0.5, (rho, files)
    assert orders[0] != orders[1]  # and reshuffled for the next pass
    stats = ds.stats()
    # each decode task reads its own rows: no read stage before it whose blocks a shuffle
    # would hold (a block-order barrier after a read holds the whole table in the object
    # store before the first batch); the order is shuffled on the range list alone
    assert "MapBatches(ReadDecodeRanges)" in stats
    assert "ReadParquet" not in stats and "ReadFiles" not in stats
    assert _tasks(stats, "MapBatches(ReadDecodeRanges)") == 2 * FILES  # a range per file a pass
    # without steps: one pass an execution
    one = view_dataset(uri, [C.SOURCE, C.LOGITS], {"x": 8}, spec, seed=3)
    assert one.passes == 1 and one.count() == rows


def test_an_in_memory_table_streams_its_passes_in_one_execution(tmp_path, ray_local, monkeypatch):
    """An online run's views (an in-memory table) take the Parquet path's route: ranges of
    the table (one copy in the object store) in a new order each pass, all the passes a run
    needs in one execution of one decode actor pool."""
    from ktray.stages import train_data

    _, table = _parts(tmp_path)
    monkeypatch.setattr(train_data, "task_rows", lambda sizes: 16)  # 8 ranges of 16 rows
    cfg = load_config(
        None,
        [
            f"out={tmp_path}/out",
            "train.decode_concurrency=1",
            "distill.batch_size=64",
            "train.stripes=1",
        ],
    )
    spec = DistillSpec.from_config(cfg, "task")
    rows = table.num_rows
    ds = view_dataset(table, [C.SOURCE, C.LOGITS], {"x": 8}, spec, seed=3, steps=3)
    assert ds.passes == 2
    got = np.concatenate(
        [b[C.LOGITS][:, 0] for b in ds.iter_batches(batch_size=8, batch_format="numpy")]
    ).astype(int)
    assert len(got) == 2 * rows
    orders = []
    for one in (got[:rows], got[rows:]):
        assert sorted(one.tolist()) == list(range(rows))  # every row once a pass
        orders.append(list(dict.fromkeys((one // 16).tolist())))
    assert orders[0] != orders[1] and sorted(orders[0]) == list(range(8))
    stats = ds.stats()
    assert _tasks(stats, "MapBatches(DecodeSlices)") == 2 * 8  # each range once a pass


def _order(ds) -> list[int]:
    """The rows (by their first logit) one execution of ``ds`` delivers, in order."""
    batches = ds.iter_batches(batch_size=8, batch_format="numpy")
    return np.concatenate([b[C.LOGITS][:, 0] for b in batches]).astype(int).tolist()


def test_executions_beyond_the_first_take_a_new_seeded_order(tmp_path, ray_local, monkeypatch):
    """A run whose passes do not fit one execution's range list (a web-scale set: 10M rows
    are ~5,000 ranges a pass) gets a new order every execution: not the first one again
    (a seeded order fixed in the driver gave every epoch the same batches), and the same
    orders again from the same seed."""
    from ktray.stages import train_data

    uri, _ = _parts(tmp_path)  # 64 ranges, one a file
    rows = FILES * PER_FILE
    over = ["train.decode_concurrency=1", "distill.batch_size=64", "train.stripes=1"]
    cfg = load_config(None, [f"out={tmp_path}/out", *over])
    spec = DistillSpec.from_config(cfg, "task")
    for cap, passes in ((100, 1), (130, 2)):  # 1 pass an execution fits, then 2
        monkeypatch.setattr(train_data, "MAX_PASS_RANGES", cap)
        ds = view_dataset(uri, [C.SOURCE, C.LOGITS], {"x": 8}, spec, seed=3, steps=20)
        assert ds.passes == passes  # of the 10 the 20 steps need
        first, second = _order(ds), _order(ds)
        for one in (first, second):  # every row once a pass
            assert sorted(one) == sorted(list(range(rows)) * passes)
        assert first != second
        again = view_dataset(uri, [C.SOURCE, C.LOGITS], {"x": 8}, spec, seed=3, steps=20)
        assert _order(again) == first and _order(again) == second


def test_passes_cover_the_steps_and_keep_the_range_list_bounded():
    from ktray.stages.train_data import MAX_PASS_RANGES, passes_for

    assert passes_for(10, 64, 640) == (1, True)
    assert passes_for(11, 64, 640) == (2, True)  # 704 rows: a second pass
    assert passes_for(0, 64, 640) == (1, True)
    assert passes_for(10**6, 256, 1000, ranges=1) == (MAX_PASS_RANGES, False)  # capped
    assert passes_for(10**6, 256, 1000, ranges=MAX_PASS_RANGES * 2) == (1, False)
    assert passes_for(4, 256, 1000, ranges=MAX_PASS_RANGES // 2 + 1) == (1, False)  # 2 needed


def _tasks(stats: str, op: str) -> int:
    """Tasks an operator ran in the stats text of a dataset (its last execution)."""
    found = re.findall(re.escape(op) + r": (\d+) tasks executed", stats)
    assert found, stats
    return sum(int(n) for n in found)


def test_a_few_class_table_is_decoded_by_many_tasks_not_one_per_8_mib(
    tmp_path, ray_local, monkeypatch
):
    """A 10-class table is ~100 bytes a row: a reader cutting 8 MiB blocks gives ~80k rows
    one task on one core. The input cuts row ranges instead (``task_rows`` rows each: fewer
    for larger views, so that a task's decoded views stay ~64 MiB)."""
    import ktray.stages.decode_actors as td

    assert td.task_rows({"x": 32}) == 4096  # the most rows a task takes
    assert td.task_rows({"x": 224}) == 445  # 64 MiB of 224 px views
    assert td.task_rows({"x": 224, "xt": 224}) == 256  # the fewest (online: two sizes)
    import ktray.stages.train_data

    monkeypatch.setattr(ktray.stages.train_data, "task_rows", lambda sizes: 16)
    _, table = _parts(tmp_path)
    one = tmp_path / "one.parquet"
    pq.write_table(table, one)  # 128 rows in one file, one row group
    spec = DistillSpec.from_config(load_config(None, [f"out={tmp_path}/out"]), "task")
    ds = view_dataset(str(one), [C.SOURCE, C.LOGITS], {"x": 8}, spec, seed=1)
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    rows = np.concatenate([b[C.LOGITS][:, 0] for b in batches]).astype(int)
    assert sorted(rows.tolist()) == list(range(FILES * PER_FILE))
    assert _tasks(ds.stats(), "MapBatches(ReadDecodeRanges)") == FILES * PER_FILE // 16


def test_a_seeded_reproducible_dataset_keeps_its_order_through_ray_train(tmp_path, ray_local):
    """Ray Train workers read a dataset under Train's ingest options, which drop the
    dataset's ``preserve_order``: ``fit`` passes a DataConfig that keeps it (verified end to
    end with ``ray.num_workers=1``: without it two seeded runs train different weights)."""
    from ktray.stages.common import dataset_config

    uri, _ = _parts(tmp_path)
    cfg = load_config(None, [f"out={tmp_path}/out"])
    spec = DistillSpec.from_config(cfg, "task")
    seeded = view_dataset(uri, [C.SOURCE, C.LOGITS], {"x": 8}, spec, seed=3)
    free = view_dataset(uri, [C.SOURCE, C.LOGITS], {"x": 8}, spec, seed=None)
    assert seeded.context.execution_options.preserve_order
    assert not free.context.execution_options.preserve_order
    conf = dataset_config({"train": seeded, "val": free})
    # what Train applies to each dataset before splitting it over the workers
    assert conf._resolve_execution_options("train").preserve_order
    assert not conf._resolve_execution_options("val").preserve_order
    assert dataset_config({"train": free}) is None
    off = DistillSpec.from_config(
        load_config(None, [f"out={tmp_path}/o", "train.reproducible=false"]), "task"
    )
    unordered = view_dataset(uri, [C.SOURCE, C.LOGITS], {"x": 8}, off, seed=3)
    assert not unordered.context.execution_options.preserve_order
    # the process's own context is left as it was
    assert not ray.data.DataContext.get_current().execution_options.preserve_order


def _class_sorted(tmp_path, images: str) -> str:
    """10 classes x 64 view rows, sorted by class (an in-domain set written class by class),
    in parts of 64 rows with row groups of 8; row r's logits: class one-hot, r in column 10.
    ``images``: "files" (a PNG each row) or "parquet" (rows of one Parquet image file whose
    row groups hold 256 images)."""
    rng = np.random.default_rng(0)
    n = 640
    blobs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (6, 7, 3), dtype=np.uint8)).save(buf, "PNG")
        blobs.append(buf.getvalue())
    if images == "files":
        srcs = []
        for i, b in enumerate(blobs):
            (tmp_path / f"img{i}.png").write_bytes(b)
            srcs.append(str(tmp_path / f"img{i}.png"))
    else:
        pq.write_table(pa.table({"png": blobs}), tmp_path / "images.parquet", row_group_size=256)
        srcs = [f"{tmp_path}/images.parquet#{i}" for i in range(n)]
    logits = np.zeros((n, 11), np.float16)
    logits[np.arange(n), np.arange(n) // 64] = 1
    logits[:, 10] = np.arange(n)
    table = pa.table(
        {
            C.IMAGE_ID: [f"i{i}" for i in range(n)],
            C.SOURCE: srcs,
            C.LOGITS: pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), 11),
        }
    )
    d = tmp_path / "parts"
    d.mkdir()
    for k in range(0, n, 64):
        pq.write_table(table.slice(k, 64), d / f"part-{k // 64:03d}.parquet", row_group_size=8)
    return str(d)


def test_a_class_sorted_table_gives_batches_of_many_classes(tmp_path, ray_local, monkeypatch):
    """Each decode call reads ``train.stripes`` stripes from places of the table drawn anew
    each pass and shuffles their rows together, so a table sorted by class still gives mixed
    batches; a stripe never cuts a row group of the images' own Parquet file (a reader of one
    of its images reads the whole group), so images in 256-row groups get one place a call."""
    from ktray.stages import train_data

    monkeypatch.setattr(train_data, "task_rows", lambda sizes: 256)  # a call: 256 rows
    mean_classes = {}
    made = {}
    for images in ("parquet", "files", "in memory"):
        if images == "in memory":  # an online run's views: the files' table, in memory
            uri = pq.read_table(made["files"])
        else:
            (tmp_path / images).mkdir()
            uri = made[images] = _class_sorted(tmp_path / images, images)
        for stripes in (1, 8):
            over = [f"out={tmp_path}/out", "train.decode_concurrency=1", "distill.batch_size=64"]
            over.append(f"train.stripes={stripes}")
            spec = DistillSpec.from_config(load_config(None, over), "task")
            ds = view_dataset(uri, [C.SOURCE, C.LOGITS], {"x": 8}, spec, seed=3, steps=20)
            assert ds.passes == 2  # 20 steps of 64 rows: two passes of 640
            batches = list(ds.iter_batches(batch_size=16, batch_format="numpy"))
            got = np.concatenate([b[C.LOGITS][:, 10] for b in batches]).astype(int)
            assert sorted(got.tolist()) == sorted(list(range(640)) * 2)  # each row once a pass
            classes = [len(set(b[C.LOGITS][:, :10].argmax(1).tolist())) for b in batches]
            mean_classes[images, stripes] = float(np.mean(classes))
    # a call of one place is one class (a file of 64 rows: ranges never span files); 8 stripes
    # of 32 rows from 8 places hold ~5.8 of the 10 classes, a batch of 16 of them ~5
    assert mean_classes["files", 1] == 1.0, mean_classes
    assert mean_classes["files", 8] > 3.5, mean_classes
    assert mean_classes["parquet", 1] == mean_classes["parquet", 8] == 1.0, mean_classes
    assert mean_classes["in memory", 1] == 1.0 and mean_classes["in memory", 8] > 3.5
