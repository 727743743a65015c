"""The distillation input's Ray Data dataset (``ktray.stages.train_data.view_dataset``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ktray.config import load_config
from ktray.data import columns as C
from ktray.data.datasets import DecodeViews
from ktray.stages.train_data import DecodeBlocks, view_dataset
from ktray.train.specs import DistillSpec

FILES, PER_FILE = 24, 4


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


def test_decode_blocks_decodes_a_whole_block_a_few_rows_at_a_time(tmp_path):
    _, table = _parts(tmp_path)
    decode = DecodeViews({"x": 8}, [C.LOGITS])
    chunks = list(DecodeBlocks(decode, 5)(table.slice(0, 13)))
    assert [len(c["x"]) for c in chunks] == [5, 5, 3]
    whole = decode(table.slice(0, 13))
    assert np.array_equal(np.concatenate([c["x"] for c in chunks]), whole["x"])
    assert np.array_equal(np.concatenate([c[C.LOGITS] for c in chunks]), whole[C.LOGITS])


def test_parquet_views_stream_in_a_new_file_order_each_epoch_read_and_decoded_in_one_task(
    tmp_path, ray_local
):
    uri, _ = _parts(tmp_path)
    cfg = load_config(
        None, [f"out={tmp_path}/out", "train.decode_concurrency=1", "train.decode_batch=4"]
    )
    spec = DistillSpec.from_config(cfg, "task")
    ds = view_dataset(uri, [C.SOURCE, C.LOGITS], {"x": 8}, spec, seed=3)
    orders = []
    for _ in range(2):
        rows = np.concatenate(
            [b[C.LOGITS][:, 0] for b in ds.iter_batches(batch_size=8, batch_format="numpy")]
        ).astype(int)
        assert sorted(rows.tolist()) == list(range(FILES * PER_FILE))  # every row once
        files = list(dict.fromkeys((rows // PER_FILE).tolist()))  # order of first appearance
        assert sorted(files) == list(range(FILES))
        orders.append(files)
    # the files come in a random order: the order a plain read gives (name order, permuted
    # only locally by the reader's threads) keeps its rank correlation with the name order
    # near 1; a shuffle's is near 0 (|rho| > 0.7 has probability ~1e-4 for 24 files)
    for files in orders:
        rho = np.corrcoef(np.arange(FILES), files)[0, 1]
        assert abs(rho) < 0.7, (rho, files)
    assert orders[0] != orders[1]  # and reshuffled for the next epoch
    stats = ds.stats()
    # one fused stage reads and decodes; no block-order barrier (it would read the whole
    # table into the object store before the first batch)
    assert "ReadFilesParquetV2->MapBatches(DecodeBlocks)" in stats
    assert "RandomizeBlockOrder" not in stats
