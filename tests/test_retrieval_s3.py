"""A faiss index saved to and loaded from a real S3 server (skipped when none can start)."""

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
