"""botocore settings of every ``s3://`` filesystem a ktray process opens, set through fsspec's
config (unless it already has some) when ``ktray`` is imported, whichever module a process
imports first. (They lived in :mod:`ktray.storage`; a process importing only the readers,
:mod:`ktray.data.sources`, got botocore's defaults. Ray's decode workers import
``ktray.storage`` through other modules and had them.)

- bounded timeouts: connect 10 s, read 60 s, 3 attempts;
- ``max_pool_connections`` 64: requests one process has in flight at once. botocore's default,
  10, held a decode process's reads of a batch's image files to 10 round trips at a time
  (``benchmarks/s3_input_bench.py --files``).
"""

from __future__ import annotations

import fsspec

S3_SETTINGS = {
    "connect_timeout": 10,
    "read_timeout": 60,
    "retries": {"max_attempts": 3, "mode": "standard"},
    "max_pool_connections": 64,
}

fsspec.config.conf.setdefault("s3", {}).setdefault("config_kwargs", dict(S3_SETTINGS))
