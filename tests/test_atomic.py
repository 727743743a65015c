"""Atomic writes (ktray.storage): a write that fails halfway leaves neither a final file nor a
temporary one, and never clobbers the previous complete file."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ktray import storage


def _half_written(table, where, *args, **kwargs):
    """A pyarrow writer that writes part of the file and then fails (disk full, a kill)."""
    with open(where, "wb") as f:
        f.write(b"PAR1 half a parquet file")
    raise OSError("No space left on device")


@pytest.fixture
def table():
    return pa.table({"image_id": ["a", "b"], "logits": [[0.5, 1.5], [2.5, 3.5]]})


def test_failed_parquet_write_leaves_no_file(tmp_path, table, monkeypatch):
    target = tmp_path / "logits" / "part-00000.parquet"
    monkeypatch.setattr(pq, "write_table", _half_written)
    with pytest.raises(OSError, match="No space left"):
        storage.write_parquet(str(target), table)
    assert not target.exists()
    assert os.listdir(target.parent) == []  # no temporary left behind either


def test_failed_write_keeps_the_previous_complete_file(tmp_path, table, monkeypatch):
    target = tmp_path / "part-00000.parquet"
    storage.write_parquet(str(target), table)
    monkeypatch.setattr(pq, "write_table", _half_written)
    with pytest.raises(OSError):
        storage.write_parquet(str(target), table.slice(0, 1))
    monkeypatch.undo()
    assert pq.read_table(target).equals(table)
    assert os.listdir(tmp_path) == ["part-00000.parquet"]


def test_failed_text_write_leaves_no_file(tmp_path, monkeypatch):
    """The same for json/text through the generic path: a write cut off by an exception."""
    target = tmp_path / "manifest.json"
    storage.write_json(str(target), {"rows": 1})
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and os.path.dirname(str(path)) == str(tmp_path):
            f.write(b'{"rows": 2, "trunc' if "b" in mode else '{"rows": 2, "trunc')
            f.close()
            raise OSError("killed mid-write")
        return f

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(OSError, match="killed"):
        storage.write_json(str(target), {"rows": 2})
    monkeypatch.undo()
    assert storage.read_json(str(target)) == {"rows": 1}
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_readers_ignore_a_killed_writers_temporary(tmp_path, table):
    """A temporary left by a process killed before the rename is never read as data."""
    d = tmp_path / "parts"
    storage.write_parquet(str(d / "part-00000.parquet"), table)
    (d / ".part-00001.parquet.tmp-0000dead").write_bytes(b"PAR1 half")
    assert storage.read_parquet(str(d)).equals(table)


def test_float_columns_are_written_without_a_dictionary(tmp_path):
    """Logits, features and embeddings (floats, lists of floats) are written plain: pyarrow's
    default dictionary-encodes them, and a part of 1,000 float16 logits then read ~4x slower
    (``storage.dictionary_columns``). Other columns keep the dictionary; values round-trip."""
    import numpy as np

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((300, 100)).astype(np.float16)  # few distinct values
    table = pa.table(
        {
            "image_id": [f"i{i % 7}" for i in range(300)],
            "x0": rng.random(300).astype(np.float32),
            "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), 100),
            "features": pa.array(list(logits[:, :5].astype(np.float32)), pa.list_(pa.float32())),
        }
    )
    path = tmp_path / "part.parquet"
    storage.write_parquet(str(path), table, 64)
    meta = pq.ParquetFile(path).metadata
    dictionary = {
        meta.row_group(0).column(c).path_in_schema.split(".")[0]: meta.row_group(0)
        .column(c)
        .has_dictionary_page
        for c in range(meta.num_columns)
    }
    assert dictionary == {"image_id": True, "x0": False, "logits": False, "features": False}
    assert pq.read_table(path).equals(table)
