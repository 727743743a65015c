"""Balanced selection with memory bounded by the candidates: the vector -> image map as an
int32 ``np.memmap`` (never copied to int64), exclusion as sorted ids, no per-image masks for
an ascending map. Results must be those of the in-memory int64 map and of brute force."""

import logging

import numpy as np
import pytest
from test_retrieval import exact_search_fn, reference_select

from ktray.data.columns import IMAGE_ID, QUERY_ID, RANK, SCORE
from ktray.retrieval import balanced_select, l2_normalize
from ktray.retrieval import select as select_mod


def _gallery(seed: int, ascending: bool):
    rng = np.random.default_rng(seed)
    # 120 image ids with gaps (ids never used), 1-4 crops each
    ids = np.sort(rng.choice(200, 120, replace=False))
    image_of = np.repeat(ids, rng.integers(1, 5, len(ids)))
    if not ascending:
        image_of = rng.permutation(image_of)
    gallery = l2_normalize(rng.standard_normal((len(image_of), 8)))
    queries = l2_normalize(rng.standard_normal((14, 8)))
    query_ids = [f"q{i // 2}" for i in range(14)]
    # present, absent (gaps) and out-of-range ids; the largest id is excluded
    exclude = set(rng.choice(ids, 15, replace=False).tolist()) | {int(ids[-1]), 199, 10**6, -3}
    exclude |= set(np.setdiff1d(np.arange(200), ids)[:5].tolist())
    return gallery, image_of, queries, query_ids, exclude, ids


@pytest.mark.parametrize("ascending", [True, False])
@pytest.mark.parametrize("quota", [5, 16])  # 16: more than the images left (shortfall)
def test_memmap_int32_map_selects_like_int64(tmp_path, monkeypatch, ascending, quota):
    monkeypatch.setattr(select_mod, "_CHUNK", 64)  # the chunked map checks cross chunks
    gallery, image_of, queries, query_ids, exclude, ids = _gallery(4, ascending)
    path = tmp_path / "image_of_vector.i32"
    image_of.astype(np.int32).tofile(path)
    mm = np.memmap(path, dtype=np.int32, mode="r")
    fn = exact_search_fn(gallery)
    out = {}
    log = logging.getLogger("ktray.retrieval.select")
    for name, iov in (("int64", image_of.astype(np.int64)), ("memmap", mm)):
        records = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append
        log.addHandler(handler)
        try:
            report = {}
            table, shortfall = balanced_select(
                fn,
                queries,
                query_ids,
                iov,
                quota,
                k0=3,
                max_k=10**6,
                seed=7,
                exclude_images=exclude,
                report=report,
            )
        finally:
            log.removeHandler(handler)
        out[name] = (table, shortfall, report, [r.getMessage() for r in records])
    table, shortfall, report, logs = out["memmap"]
    ref_table, ref_shortfall, ref_report, ref_logs = out["int64"]
    for col in (QUERY_ID, IMAGE_ID, RANK, SCORE):
        assert table[col].tolist() == ref_table[col].tolist()
    assert table[IMAGE_ID].dtype == np.int64
    assert shortfall == ref_shortfall and report == ref_report and logs == ref_logs
    # and both are brute force's answer
    ref = reference_select(gallery, image_of, queries, query_ids, quota, 7, exclude)
    got = {}
    for q, img in zip(table[QUERY_ID], table[IMAGE_ID]):
        got.setdefault(q, []).append(int(img))
    assert got == {q: [i for i, _ in v] for q, v in ref.items() if v}
    available = len(set(ids.tolist()) - exclude)
    assert available == 104
    if quota * 7 > available:  # the shortfall warning counts the selectable images exactly
        assert logs and logs[0].startswith(f"{available} selectable gallery images")
        assert sum(shortfall.values()) == quota * 7 - available
    else:
        assert not logs and not shortfall


def test_memmap_map_is_not_copied(tmp_path, monkeypatch):
    """No array the size of the map is made: every read of the map is a chunk or the hits."""
    n = 5000
    image_of = np.arange(n, dtype=np.int32) // 2
    path = tmp_path / "iov.i32"
    image_of.tofile(path)
    mm = np.memmap(path, dtype=np.int32, mode="r")
    gallery = l2_normalize(np.random.default_rng(0).standard_normal((n, 8)))
    queries = l2_normalize(np.random.default_rng(1).standard_normal((4, 8)))
    monkeypatch.setattr(select_mod, "_CHUNK", 512)
    real = np.asarray
    big = []

    def watch(a, *args, **kw):
        out = real(a, *args, **kw)
        if isinstance(a, np.memmap) and out.size >= n:
            big.append(out.dtype)
        return out

    monkeypatch.setattr(select_mod.np, "asarray", watch)
    table, shortfall = balanced_select(
        exact_search_fn(gallery), queries, list("aabb"), mm, 10, k0=8, exclude_images={0, 7}
    )
    monkeypatch.setattr(select_mod.np, "asarray", real)
    assert not big and not shortfall and len(table[IMAGE_ID]) == 20
    assert not {0, 7} & set(table[IMAGE_ID].tolist())


def test_curate_stage_reads_its_map_as_int32(tmp_path):
    """The stage's vector -> image map is int32 (half of int64 at 100M crops), the ids intact,
    and the selection's helpers keep it so (no int64 copy)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ktray.data import columns as C
    from ktray.pipeline.curation_index import leak_summary
    from ktray.retrieval.dedup import first_vectors
    from ktray.retrieval.select import id_map, map_dtype
    from ktray.stages.curate_embed import read_embeddings

    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(3 * 4, np.float32)), 4)
    (tmp_path / "q").mkdir()
    (tmp_path / "g").mkdir()
    box = {b: [0.0, 0.0, 0.0] for b in C.BOX}
    pq.write_table(
        pa.table({C.IMAGE_ID: ["a", "b", "c"], **box, C.EMBEDDING: emb}),
        tmp_path / "q" / "part-00000.parquet",
    )
    iov = [[0, 0, 1], [1, 2, 2]]
    for i, ids in enumerate(iov):
        pq.write_table(
            pa.table({"gallery_index": pa.array(ids, pa.int64()), C.EMBEDDING: emb}),
            tmp_path / "g" / f"part-{i:05d}.parquet",
        )
    sets = {"queries": (["a", "b", "c"], None), "protected": ([], None), "gallery": ([0] * 3, None)}
    dirs = {"queries": str(tmp_path / "q"), "gallery": str(tmp_path / "g")}
    _, _, parts, image_of_vector, crops, skipped = read_embeddings(dirs, sets)
    assert image_of_vector.dtype == np.int32 and len(parts) == 2
    assert image_of_vector.tolist() == [0, 0, 1, 1, 2, 2]
    assert crops["gallery"] == 6 and skipped["gallery"] == 0
    assert id_map(image_of_vector) is image_of_vector
    assert id_map([3, 4]).dtype == np.int64
    assert map_dtype(2**31 - 1) == np.int32 and map_dtype(2**31) == np.int64
    assert first_vectors(image_of_vector).tolist() == [0, 2, 4]
    cfg = type("C", (), {"curate": type("K", (), {"dedup_threshold": 0.9})()})()
    excluded, leak = leak_summary(cfg, np.array([[0, 3]]), np.array([0.95]), image_of_vector, 6)
    assert excluded == {1} and leak["images"] == 1
