"""Row ranges of Parquet view tables (``ktray.data.row_ranges``): the distillation input's
unit of work."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datafiles import encode, image

from ktray.data import row_ranges as rr


def _file(path, ids, group_rows):
    pq.write_table(
        pa.table({"image_id": ids, "v": list(range(len(ids)))}), path, row_group_size=group_rows
    )
    return str(path)


def test_ranges_merge_small_row_groups_cut_large_ones_and_cover_every_row_once(tmp_path):
    a = _file(tmp_path / "a.parquet", [f"a{i}" for i in range(20)], 5)  # 4 groups of 5
    b = _file(tmp_path / "b.parquet", [f"b{i}" for i in range(36)], 36)  # 1 group of 36
    c = _file(tmp_path / "c.parquet", [f"c{i}" for i in range(7)], 7)
    ranges = rr.row_ranges([a, b, c], 12)
    shape = [(r["path"], r["first_group"], r["last_group"], r["offset"], r["rows"]) for r in ranges]
    assert shape == [
        (a, 0, 1, 0, 10),  # two groups of 5 merged (a third would pass 12)
        (a, 2, 3, 0, 10),
        (b, 0, 0, 0, 12),  # one group of 36 cut into 3 pieces of 12
        (b, 0, 0, 12, 12),
        (b, 0, 0, 24, 12),
        (c, 0, 0, 0, 7),  # ranges never span files
    ]
    read = [rr.read_range(r, ["image_id"]) for r in ranges]
    assert [t.column_names for t in read] == [["image_id"]] * len(ranges)
    ids = [i for t in read for i in t["image_id"].to_pylist()]
    assert ids == [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(36)] + [
        "c0",
        "c1",
        "c2",
        "c3",
        "c4",
        "c5",
        "c6",
    ]


def test_a_large_row_group_is_cut_no_finer_than_its_reread_allows(tmp_path, monkeypatch):
    path = _file(tmp_path / "big.parquet", [f"x{i:04d}" for i in range(1000)], 1000)
    group_bytes = pq.ParquetFile(path).metadata.row_group(0).total_byte_size
    assert len(rr.row_ranges([path], 100)) == 10
    # each piece re-reads the whole group: at most group bytes / READ_BYTES_PER_ROW pieces'
    # worth of rows... here a piece must hold >= 250 rows, so 4 pieces, not 10
    monkeypatch.setattr(rr, "READ_BYTES_PER_ROW", group_bytes / 250)
    ranges = rr.row_ranges([path], 100)
    assert [r["rows"] for r in ranges] == [250] * 4
    assert [r["offset"] for r in ranges] == [0, 250, 500, 750]


def test_reading_and_decoding_a_range_yields_batches_of_the_asked_rows(tmp_path):
    path = _file(tmp_path / "p.parquet", [f"p{i}" for i in range(30)], 30)
    ranges = rr.row_ranges([path], 15)
    seen = []
    read = rr.ReadDecodeRanges(["v"], lambda t: {"v": t["v"].to_pylist()}, batch_rows=4)
    calls = [{"parts": [ranges[1]], "seed": 0}]  # the second range: rows 15..29
    outs = list(read(pa.Table.from_pylist(calls)))
    assert [len(o["v"]) for o in outs] == [4, 4, 4, 3]
    seen = [v for o in outs for v in o["v"]]
    assert seen == list(range(15, 30))


def test_a_call_of_stripes_reads_them_all_and_shuffles_their_rows_together(tmp_path):
    """A decode call of several stripes (places of the table) decodes each, then yields every
    row once, shuffled across the stripes by the call's seed, ``batch_rows`` a batch."""
    path = _file(tmp_path / "p.parquet", [f"p{i}" for i in range(40)], 10)  # groups of 10
    stripes = rr.row_ranges([path], 10)
    assert [r["rows"] for r in stripes] == [10] * 4
    read = rr.ReadDecodeRanges(["v"], lambda t: {"v": t["v"].to_numpy()}, batch_rows=8)
    call = pa.Table.from_pylist([{"parts": [stripes[3], stripes[0]], "seed": 5}])
    outs = list(read(call))
    assert [len(o["v"]) for o in outs] == [8, 8, 4]
    got = [int(v) for o in outs for v in o["v"]]
    assert sorted(got) == list(range(0, 10)) + list(range(30, 40))  # the two stripes, once
    # mixed: every batch of 8 holds rows of both stripes (in stripe order, the first batch
    # would be rows 30..37 alone); the same seed gives the same order
    assert all({v // 10 for v in o["v"].tolist()} == {0, 3} for o in outs[:2]), got
    assert [int(v) for o in read(call) for v in o["v"]] == got


def test_calls_take_every_stripe_once_a_pass_in_a_seeded_order_of_their_own():
    stripes = [{"i": i} for i in range(10)]
    calls = rr.call_items(stripes, 4, 2, seed=7)
    assert [len(c["parts"]) for c in calls] == [4, 4, 2] * 2  # 10 stripes, 4 a call
    passes = [[p["i"] for c in calls[k : k + 3] for p in c["parts"]] for k in (0, 3)]
    assert all(sorted(p) == list(range(10)) for p in passes)  # every stripe once a pass
    assert passes[0] != passes[1] and passes[0] != list(range(10))  # a new order each pass
    assert rr.call_items(stripes, 4, 2, seed=7) == calls  # seeded
    assert rr.call_items(stripes, 4, 2, seed=8) != calls
    assert len({c["seed"] for c in calls}) == len(calls)  # each call shuffles its own way


def test_a_stripe_never_cuts_a_unit_read_whole():
    assert rr.stripe_rows(4096, 8) == 512
    assert rr.stripe_rows(4096, 8, [256, 0]) == 512  # groups shorter than a stripe
    assert rr.stripe_rows(4096, 8, [2048]) == 2048  # a 2,048-row group is not cut
    assert rr.stripe_rows(4096, 8, [10_000]) == 4096  # at most one call
    assert rr.stripe_rows(445, 8) == 55  # large views: short stripes
    assert rr.stripe_rows(256, 64) == rr.MIN_STRIPE_ROWS == 32  # never tiny reads
    assert rr.stripe_rows(16, 8) == 16  # at most a call
    assert rr.stripe_rows(4096, 1) == 4096


def test_rows_per_range_must_be_positive(tmp_path):
    path = _file(tmp_path / "p.parquet", ["a"], 1)
    with pytest.raises(ValueError, match="rows per range"):
        rr.row_ranges([path], 0)
    assert rr.row_ranges([_file(tmp_path / "e.parquet", [], 1)], 4) == []


def test_footers_are_read_in_file_order_by_a_thread_pool(tmp_path, monkeypatch):
    files = [_file(tmp_path / f"f{i:02d}.parquet", ["x"] * (i % 7 + 1), 4) for i in range(40)]
    monkeypatch.setattr(rr, "FOOTER_THREADS", 8)
    metas = rr.footers(files)
    assert [m.num_rows for m in metas] == [i % 7 + 1 for i in range(40)]
    assert [m.num_row_groups for m in metas] == [-(-(i % 7 + 1) // 4) for i in range(40)]
    # kept as arrays of rows and bytes per group, not pyarrow's parsed footers (107 MiB for
    # the 15,640 groups of a 1M-row table in 64-row groups)
    assert metas[6].rows.tolist() == [4, 3] and (metas[6].bytes > 0).all()


def test_a_piece_of_a_large_row_group_is_streamed_out_of_it(tmp_path, monkeypatch):
    """Pieces of one group read through record batches (never the whole group at once): cut
    across batch boundaries, they still give every row once, in order."""
    path = _file(tmp_path / "g.parquet", [f"g{i:03d}" for i in range(100)], 100)
    monkeypatch.setattr(rr, "READ_BATCH_ROWS", 7)
    ranges = rr.row_ranges([path], 30)
    assert [(r["offset"], r["rows"]) for r in ranges] == [(0, 33), (33, 33), (66, 34)]
    ids = [i for r in ranges for i in rr.read_range(r, ["image_id"])["image_id"].to_pylist()]
    assert ids == [f"g{i:03d}" for i in range(100)]
    read = rr.read_range(ranges[1], ["v", "image_id"])
    assert read.column_names == ["v", "image_id"] and read["v"].to_pylist() == list(range(33, 66))


def test_footers_read_once_serve_the_ranges_without_reading_the_files_again(tmp_path):
    """``describe_targets`` reads the footers of a view table; ``view_dataset`` cuts the
    ranges from those, not from a second read (thousands of s3 round trips at 10M rows)."""
    a = _file(tmp_path / "a.parquet", [f"a{i}" for i in range(20)], 5)
    b = _file(tmp_path / "b.parquet", [f"b{i}" for i in range(8)], 8)
    metas = rr.footers([a, b])
    expected = rr.row_ranges([a, b], 12)
    (tmp_path / "a.parquet").unlink()  # a second read of the footers would fail now
    (tmp_path / "b.parquet").unlink()
    assert rr.row_ranges([a, b], 12, metas) == expected
    with pytest.raises(FileNotFoundError):
        rr.row_ranges([a, b], 12)
    with pytest.raises(ValueError, match="1 footers for 2 files"):
        rr.row_ranges([a, b], 12, metas[:1])


def test_the_row_groups_of_parquet_image_files_are_measured_from_their_footers(tmp_path):
    """``parquet_group_rows``: the largest row group of the Parquet image files behind some
    sources (a reader of one of their images reads its whole group); 0 for files."""
    blobs = [encode(image(i), "PNG") for i in range(12)]
    small, big = tmp_path / "small.parquet", tmp_path / "big.parquet"
    pq.write_table(pa.table({"png": blobs}), small, row_group_size=5)  # groups 5, 5, 2
    pq.write_table(pa.table({"png": blobs}), big, row_group_size=12)
    assert rr.parquet_group_rows([f"{small}#0", f"{small}#11"]) == 5
    assert rr.parquet_group_rows([f"{small}#0", f"{big}#3"]) == 12
    assert rr.parquet_group_rows([f"{big}#3"], files=0) == 0  # none sampled
    png = tmp_path / "a.png"
    png.write_bytes(blobs[0])
    assert rr.parquet_group_rows([str(png), f"{tmp_path}/missing.parquet#1"]) == 0


def test_a_calls_stripes_read_their_image_groups_side_by_side_before_decoding(
    tmp_path, monkeypatch
):
    """Each stripe's reading thread opens its images' Parquet files and reads the groups the
    stripe needs (a round trip or more each on s3) before the call decodes, so a call's
    stripes wait about one read, not one after another: at 50 ms round trips over 200 image
    files, 1,248 -> 3,490 img/s (Parquet) and 1,382 -> 3,854 (tar) in s3_input_bench. Files
    of huge groups are left to the decoding (read ahead, they would evict each other)."""
    import threading
    import time

    from ktray.data import load_images, parquet_images
    from ktray.data import source_cache as sc

    blobs = [encode(image(i), "PNG") for i in range(4)]
    srcs = []
    for f in range(6):
        pq.write_table(pa.table({"png": blobs}), tmp_path / f"img{f}.parquet", row_group_size=2)
        srcs += [f"{tmp_path}/img{f}.parquet#{i}" for i in range(4)]
    view = tmp_path / "views.parquet"
    pq.write_table(pa.table({"source": srcs, "v": list(range(24))}), view, row_group_size=4)
    stripes = rr.row_ranges([str(view)], 4)  # one image file a stripe
    read = parquet_images.row_group_bytes
    reads, active, peak, lock = [], 0, 0, threading.Lock()

    def slow(h, g):  # a group read that takes a round trip
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.1)
        with lock:
            active -= 1
        reads.append(g)
        return read(h, g)

    monkeypatch.setattr(parquet_images, "row_group_bytes", slow)
    sc.clear_cache()
    seen = []

    def decode(t):  # (the groups read when the call's first batch decodes) as DecodeViews
        seen.append(len(reads))
        assert all(img is not None for img in load_images(t["source"].to_pylist()))
        return {"v": t["v"].to_numpy()}

    call = pa.Table.from_pylist([{"parts": stripes, "seed": 1}])
    outs = list(rr.ReadDecodeRanges(["source", "v"], decode, batch_rows=8)(call))
    assert sorted(int(v) for o in outs for v in o["v"]) == list(range(24))
    assert seen[0] == 12 and len(reads) == 12  # every group read ahead, none read again
    assert peak >= 4  # side by side (one after another: 1)
    # a call of more stripes than the default keeps open (train.stripes raised) keeps them
    monkeypatch.setattr(sc.handle_cache, "max_items", sc.handle_cache.max_items)  # (restored)
    monkeypatch.setattr(sc.data_cache, "max_items", sc.data_cache.max_items)
    wide = pa.Table.from_pylist([{"parts": [stripes[0]] * 40, "seed": 1}])
    list(rr.ReadDecodeRanges(["source", "v"], decode, batch_rows=64)(wide))
    assert sc.handle_cache.max_items >= 120 and sc.data_cache.max_items >= 480

    sc.clear_cache()
    reads.clear()
    monkeypatch.setattr(parquet_images, "READ_AHEAD_BYTES", 10)  # groups too big to read ahead
    seen.clear()
    list(rr.ReadDecodeRanges(["source", "v"], decode, batch_rows=8)(call))
    assert seen[0] == 0 and len(reads) == 12  # read as the decoding asked for them
    sc.clear_cache()


def test_a_file_being_opened_holds_up_no_reader_of_other_files(tmp_path, monkeypatch):
    """Opening an image file (its footer or tar index: round trips on s3) happens outside the
    cache's lock: other threads go on reading the files already open."""
    import threading
    import time

    from ktray.data import load_images, parquet_images
    from ktray.data import source_cache as sc

    for name in ("a", "b"):
        pq.write_table(pa.table({"png": [encode(image(1), "PNG")]}), tmp_path / f"{name}.parquet")
    sc.clear_cache()
    assert load_images([f"{tmp_path}/b.parquet#0"])[0] is not None  # b open and cached
    init = parquet_images.ParquetHandle.__init__

    def slow_open(self, uri):
        if uri.endswith("a.parquet"):
            time.sleep(0.5)
        init(self, uri)

    monkeypatch.setattr(parquet_images.ParquetHandle, "__init__", slow_open)
    opener = threading.Thread(target=load_images, args=([f"{tmp_path}/a.parquet#0"],))
    opener.start()
    time.sleep(0.1)
    start = time.perf_counter()
    sc.data_cache.clear()  # b's group is read again through its open handle
    assert load_images([f"{tmp_path}/b.parquet#0"])[0] is not None
    assert time.perf_counter() - start < 0.3  # under the cache's lock: after a's 0.5 s
    opener.join()
    sc.clear_cache()
