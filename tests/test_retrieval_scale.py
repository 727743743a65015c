"""Curation at scale: one-pass index builds with measured recall, exact leak protection under
a lossy index, gallery self-dedup, and no silent ``max_k`` cap. Vectors are synthetic
(clustered unit vectors), so each test runs in about a second (img2dataset galleries:
tests/test_gallery_listing.py)."""

import json
import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from curate_helpers import clustered

from ktray.config import load_config
from ktray.pipeline import curation_index
from ktray.retrieval import balanced_select, build_index, l2_normalize, search
from ktray.retrieval.dedup import gallery_duplicates
from ktray.retrieval.near_duplicates import remove_near_duplicates
from ktray.retrieval.store import PartStore
from ktray.retrieval.tune import ExactTopK, build_measured


# ----------------------------------------------------------------------------- vectors
def _clustered(n: int, dim: int, seed: int, sigma: float = 0.08):
    return clustered(n, dim, seed, sigma=sigma)


def _parts(tmp_path, vecs: np.ndarray, rows: int, dtype=pa.float16()) -> list[str]:
    """Vectors as embedding part files (float16 lists, like the stored contract)."""
    d = tmp_path / "parts"
    d.mkdir(exist_ok=True)
    out = []
    for i, start in enumerate(range(0, len(vecs), rows)):
        v = vecs[start : start + rows]
        col = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel(), dtype), v.shape[1])
        path = str(d / f"part-{i:05d}.parquet")
        pq.write_table(pa.table({"embedding": col}), path)
        out.append(path)
    return out


def test_part_store_take_and_sample_read_few_parts(tmp_path):
    vecs = _clustered(5000, 32, seed=1)
    store = PartStore(_parts(tmp_path, vecs, 500))
    assert len(store) == 5000
    ids = np.array([4999, 0, 1234, 0, 2500])
    np.testing.assert_allclose(store.take(ids), vecs[ids], atol=2e-3)  # float16 storage
    store.reads = 0
    sample = store.sample(200, seed=3)
    assert sample.shape == (200, 32) and store.reads == 2  # 4 x 200 rows: two parts of ten
    assert len({tuple(r) for r in np.round(sample, 3)}) == 200


def test_build_measured_one_pass_exact_truth_and_tuned_nprobe(tmp_path):
    vecs = _clustered(40_000, 32, seed=2, sigma=0.25)
    store = PartStore(_parts(tmp_path, vecs, 2000))
    probes = _clustered(300, 32, seed=5, sigma=0.25)
    index, rep = build_measured("IVF64,Flat", store, probes, seed=0, target_recall=0.95)
    # one pass over the parts for the adds, plus the sample's parts (16k of 40k rows)
    assert store.reads == 20 + rep.parts_read_for_sample and rep.parts_read_for_sample <= 9
    assert index.ntotal == 40_000 and rep.vectors == 40_000
    every = store.take(np.arange(40_000))
    exact = ExactTopK(probes, 10)
    exact.add(every)
    np.testing.assert_allclose(
        exact.scores, -np.sort(-(probes @ every.T), axis=1)[:, :10], atol=1e-5
    )
    # tuned: the smallest power-of-two nprobe reaching the target, measured recall reported
    assert rep.reached and rep.recall >= 0.95 and rep.nprobe > 1
    smaller = [r for p, r in rep.tried.items() if p < rep.nprobe]
    assert smaller and all(r < 0.95 for r in smaller) and rep.tried[rep.nprobe] == rep.recall
    _, ids = search(index, probes, 10)
    hits = np.mean([len(np.intersect1d(a, b)) for a, b in zip(ids, exact.ids)]) / 10
    assert abs(hits - rep.recall) < 1e-3


# ----------------------------------------------------------------------------- leaks
LOSSY = "IVF16,PQ16x4"


def _leak_setup(tmp_path, n=5000, dim=64, copies=60):
    """A gallery with near copies of test images planted in it (cosine 0.975-0.99)."""
    rng = np.random.default_rng(0)
    gallery = _clustered(n, dim, seed=11)
    test = _clustered(copies, dim, seed=12)
    noise = rng.standard_normal((copies, dim)).astype(np.float32)
    noise -= (noise * test).sum(1, keepdims=True) * test
    noise = l2_normalize(noise)
    cos = rng.uniform(0.975, 0.99, copies).astype(np.float32)
    planted_rows = np.sort(rng.choice(n, copies, replace=False))
    gallery[planted_rows] = l2_normalize(
        cos[:, None] * test + np.sqrt(1 - cos[:, None] ** 2) * noise
    )
    return gallery, test, planted_rows


def test_leak_protection_exact_recheck_under_pq(tmp_path):
    gallery, test, planted = _leak_setup(tmp_path)
    parts = _parts(tmp_path, gallery, 1000)
    store = PartStore(parts)
    iov = np.arange(len(gallery))
    # a coarse 4-bit PQ: scores ~0.3 below the true cosine (measured at build time)
    index, rep = build_measured(LOSSY, store, test, seed=0, target_recall=0.5)
    assert rep.score_error > 0.2
    # PQ's quantised scores fall below the threshold: the approximate check alone leaks
    approx = remove_near_duplicates(index, test, iov, 0.97)
    assert len(set(planted) - approx) > 50
    # a fixed margin below the index's error still leaks ...
    fixed = remove_near_duplicates(index, test, iov, 0.97, margin=0.1, vectors_of=store.take)
    assert set(planted) - fixed
    # ... the measured error plus that margin (as the stage does), re-checked exactly,
    # catches every copy and no other
    exact = remove_near_duplicates(
        index, test, iov, 0.97, margin=0.1 + rep.score_error, vectors_of=store.take
    )
    assert exact == set(planted.tolist())


@pytest.mark.slow
def test_index_and_select_keeps_test_copies_out_of_the_transfer_set(tmp_path, monkeypatch):
    gallery, test, planted = _leak_setup(tmp_path)
    parts = _parts(tmp_path, gallery, 1000)
    # queries: the test images' own cluster neighbours, so the planted copies rank high
    queries = l2_normalize(
        test + 0.02 * np.random.default_rng(3).standard_normal(test.shape).astype(np.float32)
    )
    cfg = load_config(
        "tiny",
        [
            f"out={tmp_path}/out",
            f"curate.index={LOSSY}",
            "curate.images_per_query=20",
            "curate.dedup_threshold=0.97",
            "curate.target_recall=0.5",
            "curate.dedup_gallery=true",
        ],
    )
    out = str(tmp_path / "curate")
    res = curation_index.index_and_select(
        cfg,
        out,
        queries,
        [f"q{i}" for i in range(len(queries))],
        test,
        parts,
        np.arange(len(gallery)),
    )
    assert res["index"]["score_error"] > 0.2
    chosen = set(np.asarray(res["selected"]["image_id"]).tolist())
    assert len(chosen) == 20 * len(queries)
    assert not chosen & set(planted.tolist())
    assert res["excluded"] == set(planted.tolist())
    assert res["index"]["factory"] == LOSSY
    assert res["dedup_margin"] == pytest.approx(0.1 + res["index"]["score_error"])
    assert os.path.exists(os.path.join(out, "index.faiss"))
    # the same call again reuses the index (and its report): nothing is built ...
    built = []
    real_build = curation_index.build_measured
    monkeypatch.setattr(
        curation_index, "build_measured", lambda *a, **k: built.append(1) or real_build(*a, **k)
    )
    again = curation_index.index_and_select(
        cfg, out, queries, [f"q{i}" for i in range(60)], test, parts, np.arange(len(gallery))
    )
    assert not built
    assert again["index"]["tried"] == json.loads(json.dumps(res["index"]["tried"]))
    assert again["index"]["recall"] == res["index"]["recall"]
    # ... unless the build recipe changed since (an index built by an older ktray)
    from ktray.retrieval import index as index_mod

    monkeypatch.setattr(index_mod, "INDEX_RECIPE", index_mod.INDEX_RECIPE + 1)
    curation_index.index_and_select(
        cfg, out, queries, [f"q{i}" for i in range(60)], test, parts, np.arange(len(gallery))
    )
    assert built == [1]
    # leak protection is an exact scan: it reports what it found, with exact cosines
    leak = res["leak_check"]
    assert leak["method"] == "exact scan" and leak["images"] == len(planted)
    assert leak["pairs_above_threshold"] == len(planted) and leak["gallery_vectors"] == 5000
    assert all(0.97 < c <= 0.991 for _, _, c, _ in leak["pairs"])


# ----------------------------------------------------------------------------- self-dedup
def test_gallery_self_duplicates_keep_the_lowest_image(tmp_path):
    vecs = _clustered(3000, 32, seed=4, sigma=0.3)
    # image ids: 2 vectors per image (full image first), 1500 images
    iov = np.repeat(np.arange(1500), 2)
    full = np.arange(0, 3000, 2)
    # group {10, 700, 1400} and pair {5, 6}: near-identical full images
    for src, dst in ((10, 700), (10, 1400), (5, 6)):
        vecs[full[dst]] = l2_normalize(
            vecs[full[src]][None]
            + 0.01 * np.random.default_rng(dst).standard_normal((1, 32)).astype(np.float32)
        )[0]
    store = PartStore(_parts(tmp_path, vecs, 500))
    index = build_index("Flat", 32, None, iter(store))
    batches = ((full[i : i + 400], store.take(full[i : i + 400])) for i in range(0, len(full), 400))
    dropped, groups = gallery_duplicates(index, batches, store.take, iov, 0.97)
    assert dropped == {700, 1400, 6} and groups == 2


# ----------------------------------------------------------------------------- max_k
def test_max_k_cap_is_reported_not_silent():
    rng = np.random.default_rng(0)
    gallery = l2_normalize(rng.standard_normal((400, 16)).astype(np.float32))
    queries = l2_normalize(gallery[:2] + 0.01)  # both queries want the same neighbourhood
    index = build_index("Flat", 16, None, [gallery])

    def select(images_per_query: int, max_k: int):
        report: dict = {}
        table, short = balanced_select(
            lambda v, k: search(index, v, k),
            queries,
            ["a", "b"],
            np.arange(400),
            images_per_query=images_per_query,
            k0=8,
            max_k=max_k,
            report=report,
        )
        return table, short, report

    table, short, report = select(30, max_k=32)
    assert report["capped"] == ["a", "b"] and report["max_depth"] == 32
    assert all(report["reasons"][q] == "max_k" for q in short)
    assert short and sum(short.values()) == 60 - len(table["image_id"]) == 4
    # no cap: exhausting the gallery is not "max_k"
    _, short2, report2 = select(250, max_k=4096)
    assert report2["capped"] == [] and set(report2["reasons"].values()) == {"gallery exhausted"}
    assert sum(short2.values()) == 100


def test_leak_check_scans_more_lists_than_the_selection():
    """A near copy in an IVF list the tuned nprobe skips is still found by the leak check."""
    import faiss

    from ktray.retrieval.tune import dedup_nprobe

    gallery, test, planted = _leak_setup(None, n=5000, copies=200)
    index = build_index("IVF256,Flat", 64, gallery, [gallery], nprobe=1)
    iov = np.arange(len(gallery))
    assert set(planted) - remove_near_duplicates(index, test, iov, 0.97)  # nprobe 1 misses
    assert dedup_nprobe(index) == 32  # default_nprobe(256) > 8 x 1
    found = remove_near_duplicates(index, test, iov, 0.97, nprobe=dedup_nprobe(index))
    assert found == set(planted.tolist())
    assert faiss.extract_index_ivf(index).nprobe == 1  # restored for the selection


def test_two_level_coarse_training_for_large_nlist(monkeypatch, request):
    """Beyond TWO_LEVEL_MIN_NLIST lists the coarse centroids come from two-level k-means
    (flat k-means over 16k+ lists is too slow); the index still answers like exact search."""
    from ktray.retrieval import index as index_mod

    calls = []
    real = index_mod.two_level_centroids
    monkeypatch.setattr(index_mod, "TWO_LEVEL_MIN_NLIST", 128)
    monkeypatch.setattr(
        index_mod, "two_level_centroids", lambda s, n: calls.append(n) or real(s, n)
    )
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # small indexes: OpenMP spinning dominates on a busy machine
    request.addfinalizer(lambda: faiss.omp_set_num_threads(threads))
    vecs = _clustered(30_000, 32, seed=6, sigma=0.25)
    queries = _clustered(200, 32, seed=7, sigma=0.25)
    index = build_index("IVF256_HNSW32,PQ16,Refine(SQ8)", 32, vecs[:20_000], [vecs], nprobe=32)
    assert calls == [256]
    ivf = faiss.extract_index_ivf(index)
    assert ivf.quantizer.ntotal == 256 and index.ntotal == 30_000
    cent = ivf.quantizer.reconstruct_n(0, 256)
    np.testing.assert_allclose(np.linalg.norm(cent, axis=1), 1.0, atol=1e-4)
    flat = build_index("Flat", 32, None, [vecs])
    _, exact = search(flat, queries, 10)
    _, approx = search(index, queries, 10)
    assert np.mean([len(np.intersect1d(a, e)) for a, e in zip(approx, exact)]) / 10 >= 0.9
    # sizes: every centroid set from a coarse cluster with enough points
    sample = _clustered(5000, 16, seed=8)
    assert real(sample, 300).shape == (300, 16)


def test_hnsw_quantizer_puts_vectors_in_their_nearest_list(monkeypatch, request):
    """An HNSW coarse quantizer searched at faiss's defaults (efConstruction 40, efSearch 16)
    sends 7.5% of these vectors (17% at 10M x 256 with 16k lists) to a list other than their
    nearest: out of reach of nprobe, PQ-coded against the wrong centroid. The build must
    assign (nearly) all of them right."""
    from ktray.retrieval import index as index_mod

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    request.addfinalizer(lambda: faiss.omp_set_num_threads(threads))
    rng = np.random.default_rng(0)
    # 4,096 lists: 16 sub-centroids around each of 256 cluster centres, as two-level k-means
    # leaves them on clustered data
    centres = l2_normalize(rng.standard_normal((256, 128)).astype(np.float32))
    cent = l2_normalize(
        np.repeat(centres, 16, 0) + 0.012 * rng.standard_normal((4096, 128)).astype(np.float32)
    )
    monkeypatch.setattr(index_mod, "TWO_LEVEL_MIN_NLIST", 1)
    monkeypatch.setattr(index_mod, "two_level_centroids", lambda s, n: cent)
    vecs = l2_normalize(
        centres[rng.integers(0, 256, 20_000)]
        + 0.06 * rng.standard_normal((20_000, 128)).astype(np.float32)
    )
    index = build_index("IVF4096_HNSW32,Flat", 128, vecs[:4096], [vecs])
    ivf = faiss.extract_index_ivf(index)
    list_of = np.full(len(vecs), -1)
    for lst in range(ivf.nlist):
        n = ivf.invlists.list_size(lst)
        if n:
            list_of[faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), n).copy()] = lst
    nearest = np.argmax(vecs @ cent.T, axis=1)
    assert np.mean(list_of == nearest) >= 0.995


def test_scan_near_duplicates_is_exact_over_parts(tmp_path):
    """The stage's leak check: every stored gallery vector against every protected one, part
    by part; ids are global, cosines are exact (of the float16 stored vectors)."""
    from ktray.retrieval.near_duplicates import scan_near_duplicates

    gallery, test, planted = _leak_setup(tmp_path)
    store = PartStore(_parts(tmp_path, gallery, 700))
    parts = ((int(store.offsets[p]), v) for p, v in enumerate(store))
    pairs, cos = scan_near_duplicates(parts, test, 0.97, batch_size=300)
    assert sorted(pairs[:, 1].tolist()) == planted.tolist()
    assert sorted(pairs[:, 0].tolist()) == list(range(len(test)))
    exact = np.einsum("nd,nd->n", store.take(pairs[:, 1]), test[pairs[:, 0]])
    np.testing.assert_allclose(cos, exact, atol=1e-5)
    assert scan_near_duplicates(iter([]), test, 0.97)[0].shape == (0, 2)
