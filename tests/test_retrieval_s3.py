"""On a real S3 server (skipped when none can start): a faiss index saved and loaded, and a
listing fingerprint that sees an object replaced."""

import faiss
import numpy as np

from ktray.retrieval import build_index, load_index, save_index, search
from ktray.retrieval.index import l2_normalize


def test_index_roundtrip_on_s3(s3_server):
    rng = np.random.default_rng(0)
    gallery = l2_normalize(rng.standard_normal((5000, 32)))
    queries = l2_normalize(rng.standard_normal((20, 32)))
    index = build_index("IVF64,Flat", 32, gallery, [gallery[:2500], gallery[2500:]], nprobe=7)
    uri = s3_server.url("retrieval", "gallery.faiss")
    save_index(index, uri)
    save_index(index, uri)  # overwrite: the final key is replaced, no temporary keys remain
    assert s3_server.fs.ls(s3_server.url("retrieval")) == [uri.removeprefix("s3://")]
    loaded = load_index(uri)
    assert faiss.extract_index_ivf(loaded).nprobe == 7
    for a, b in zip(search(index, queries, 5), search(loaded, queries, 5)):
        np.testing.assert_array_equal(a, b)


def test_an_s3_listing_fingerprint_sees_a_replaced_object(s3_server):
    """s3fs answers ``info`` from a listing it cached: a fingerprint must not (a model or a
    targets table rewritten on S3 between two runs in one process would be served stale)."""
    import time

    from ktray import storage

    uri = s3_server.url("fp", "t.parquet")
    s3_server.fs.pipe(uri, b"1234")
    fs, _ = storage.fs_and_path(uri)
    before = storage.fingerprint(uri)
    fs.ls(s3_server.url("fp"), detail=True)  # the parent's listing cached
    time.sleep(1.1)  # S3 modification times are whole seconds
    other = type(fs)(skip_instance_cache=True, **fs.storage_options)  # another process's
    other.pipe(uri, b"1234")  # same size, new object
    assert storage.fingerprint(uri) != before


def test_an_s3_files_fingerprint_sees_a_replaced_object(s3_server):
    """``files_fingerprint`` (the labeled images a teacher trained on) stats each file; s3fs
    would answer from a listing it cached before: it must not."""
    import time

    from ktray import storage

    uri = s3_server.url("ffp", "a.png")
    s3_server.fs.pipe(uri, b"1234")
    fs, _ = storage.fs_and_path(uri)
    before = storage.files_fingerprint([uri])
    fs.ls(s3_server.url("ffp"), detail=True)  # the parent's listing cached
    time.sleep(1.1)  # S3 modification times are whole seconds
    other = type(fs)(skip_instance_cache=True, **fs.storage_options)  # another process's
    other.pipe(uri, b"1234")  # same size, new object
    assert storage.files_fingerprint([uri]) != before
