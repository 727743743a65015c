"""Output locations that are local paths or ``s3://`` URIs, with atomic writes.

Every file ktray writes goes to a temporary name beside its final name and is renamed when
complete, so a killed run never leaves a half-written file that looks whole.

Object stores get bounded timeouts (:mod:`ktray.s3_settings`, applied on ``import ktray`` in
every process) and :func:`probe` turns the errors of a missing credential,
bucket or endpoint into one line naming the URI and where credentials are looked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ktray.errors import KtrayError


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path within it, for a local path or URI."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def join(base: str, *parts: str) -> str:
    out = str(base).rstrip("/")
    for p in parts:
        out += "/" + str(p).strip("/")
    return out


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = fs_and_path(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


def _tmp_name(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_local_path(uri: str) -> Iterator[str]:
    """Yield a local file path to write; on success it becomes ``uri`` atomically.

    Local: a temporary file in the same folder, then ``os.replace``. Remote: a local temporary
    file, uploaded under a temporary key and moved to its final key (object stores have no
    rename; the final key appears only once the upload is complete).
    """
    fs, path = fs_and_path(uri)
    if not is_remote(uri):
        fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = _tmp_name(path)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, os.path.basename(path))
        yield local
        tmp = _tmp_name(path)
        fs.put_file(local, tmp)
        fs.mv(tmp, path)


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_local_path(uri) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def write_json(uri: str, obj) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_bytes(uri: str) -> bytes:
    fs, path = fs_and_path(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise KtrayError(f"file not found: {uri}")


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns :func:`write_parquet` dictionary-encodes: all but floating-point values and
    lists of them (logits, features, embeddings). Those are as good as unique, and pyarrow's
    default encodes them anyway: a 2,048-row part of 1,000 float16 logits took 36 ms of CPU
    to read dictionary-encoded, 8 ms plain (and 8% fewer bytes), where decoding its 2,048
    views at 64 px takes ~430 ms (this project's 2-core machine, pyarrow 25)."""

    def floats(t: pa.DataType) -> bool:
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return floats(t.value_type)
        return pa.types.is_floating(t)

    return [f.name for f in schema if not floats(f.type)]


def write_parquet(uri: str, table: pa.Table, row_group_rows: int | None = None) -> None:
    """``table`` to ``uri`` atomically (a temporary name, renamed when complete);
    ``row_group_rows``: rows per Parquet row group (pyarrow's default: one group up to 1M).
    Float columns are not dictionary-encoded (:func:`dictionary_columns`)."""
    with atomic_local_path(uri) as tmp:
        pq.write_table(
            table,
            tmp,
            row_group_size=row_group_rows,
            use_dictionary=dictionary_columns(table.schema),
        )


def parquet_parts(uri: str) -> list[str]:
    """The URIs of a Parquet file, or of every ``*.parquet`` under a folder in name order
    (hidden temporaries excluded): what :func:`read_parquet` reads, one part at a time."""
    fs, path = fs_and_path(uri)
    if not fs.exists(path):
        raise KtrayError(f"parquet not found: {uri}")
    if not fs.isdir(path):
        return [uri]
    files = sorted(
        p
        for p in fs.find(path)
        if p.endswith(".parquet") and not os.path.basename(p).startswith(".")
    )
    if not files:
        raise KtrayError(f"no parquet files under {uri}")
    prefix = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return [prefix + p if prefix and not p.startswith(prefix) else p for p in files]


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file, or every ``*.parquet`` under a folder (hidden temporaries excluded)."""
    fs, path = fs_and_path(uri)
    parts = parquet_parts(uri)
    if len(parts) == 1 and not fs.isdir(path):
        return pq.read_table(path, columns=columns, filesystem=fs)
    return pa.concat_tables(
        [pq.read_table(fs_and_path(f)[1], columns=columns, filesystem=fs) for f in parts]
    )


def download_dir(uri: str, local_dir: str) -> str:
    """Local copy of a remote folder (or the folder itself when local)."""
    if not is_remote(uri):
        return uri
    fs, path = fs_and_path(uri)
    fs.get(path.rstrip("/") + "/", local_dir, recursive=True)
    return local_dir


def credentials_hint() -> str:
    """Where S3 credentials and the endpoint come from, as seen in this process."""
    env = "set" if os.environ.get("AWS_ACCESS_KEY_ID") else "not set"
    files = [
        f
        for f in (
            os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
            os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"),
        )
        if os.path.isfile(os.path.expanduser(f))
    ]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return (
        f"credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY ({env}), "
        f"AWS_PROFILE and ~/.aws/credentials, ~/.aws/config ("
        f"{', '.join(files) if files else 'none found'}) or an instance role; the endpoint "
        f"from AWS_ENDPOINT_URL ({endpoint or 'not set: AWS'})"
    )


_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")
_UNREACHABLE = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ProxyConnectionError",
    "ClientConnectorError",
    "ServerTimeoutError",
    "TimeoutError",
)
_DENIED = (
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "Forbidden",
    "403",
    "InvalidToken",
    "ExpiredToken",
)


def storage_error(error: BaseException, uri: str, key: str = "") -> KtrayError | None:
    """A one-line error for an object-store failure on ``uri``, or None for other errors.

    Args:
        error: What the filesystem raised.
        uri: The location being accessed.
        key: The config key that named it (``out``, ``data.root``), for the message.
    """
    names = {c.__name__ for c in type(error).__mro__}
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    where = f"{key}={uri}" if key else uri
    if names & set(_NO_CREDENTIALS):
        return KtrayError(f"{where}: no S3 credentials found; {credentials_hint()}")
    if names & set(_UNREACHABLE):
        return KtrayError(f"{where}: cannot reach the object store ({text}); {credentials_hint()}")
    if isinstance(error, PermissionError) or any(d in text for d in _DENIED):
        return KtrayError(f"{where}: access denied ({text}); {credentials_hint()}")
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        bucket = fs_and_path(uri)[1].split("/")[0]
        return KtrayError(f"{where}: bucket '{bucket}' does not exist; {credentials_hint()}")
    if is_remote(uri) and names & {"BotoCoreError", "ClientError", "ClientResponseError"}:
        return KtrayError(f"{where}: object store error: {type(error).__name__}: {text}")
    return None


def probe(uri: str, key: str = "", must_exist: bool = False) -> None:
    """Check cheaply that ``uri`` can be reached: the bucket of a remote URI is listed (one
    request, bounded timeouts); a local path is left to the stage that reads it.

    Args:
        uri: Local path or URI.
        key: The config key that named it, for the message.
        must_exist: Also require ``uri`` itself to exist.

    Raises:
        KtrayError: No credentials, no bucket, access denied, endpoint unreachable (one line,
            naming the URI and how credentials are found), or a missing ``uri``.
    """
    if not uri or not is_remote(uri):
        if must_exist and uri and not exists(uri):
            raise KtrayError(f"{key or 'path'} not found: {uri}")
        return
    fs, path = fs_and_path(uri)
    bucket = path.split("/")[0]
    try:
        if hasattr(fs, "_call_s3"):  # one HEAD request: the bucket exists and we may use it
            from fsspec.asyn import sync

            sync(fs.loop, fs._call_s3, "head_bucket", Bucket=bucket)
        else:
            fs.ls(bucket, refresh=True)
        found = fs.exists(path) if must_exist else True
    except FileNotFoundError:
        raise KtrayError(f"{key}={uri}: bucket '{bucket}' does not exist; {credentials_hint()}")
    except Exception as e:  # noqa: BLE001 - translated below, else re-raised
        err = storage_error(e, uri, key)
        if err is None:
            raise
        raise err from None
    if not found:
        raise KtrayError(f"{key or 'path'} not found: {uri}")


def stamp(info: dict) -> str:
    """When an fsspec ``info`` entry's file was last written (local mtime, S3 LastModified)."""
    return str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or "")


_LISTINGS: dict[str, str] | None = None
"""Fingerprints taken within :func:`listings_fixed` (None outside it)."""


@contextlib.contextmanager
def listings_fixed() -> Iterator[None]:
    """Within: each :func:`fingerprint` is taken once. A command (``ktray run``, a sweep
    trial) reads its inputs as they were when it started; its stages each key their reuse on
    the inputs' listing, which at 1M files under ``data.root`` is ~8 s a listing here (minutes
    from ``s3://``), and a pipeline asks for it a dozen times or more."""
    global _LISTINGS
    outer = _LISTINGS
    _LISTINGS = {} if outer is None else outer
    try:
        yield
    finally:
        _LISTINGS = outer


def fingerprint(uri: str) -> str:
    """A short hash of the file listing under ``uri`` (a file, folder or glob): relative
    names, sizes and modification times, so that a file added, removed or replaced changes it.
    Reads no file contents. A webdataset brace pattern (``DIR/unl-{000..009}.tar``) is the
    listing of every file it names."""
    return _once(uri, lambda: _fingerprint(uri))


def _once(key: str, take) -> str:
    """``take()``, or within :func:`listings_fixed` the value it gave for ``key`` before."""
    if _LISTINGS is None:
        return take()
    if key not in _LISTINGS:
        _LISTINGS[key] = take()
    return _LISTINGS[key]


FILE_STAT_THREADS = 32
"""Files stat-ed at once by :func:`files_fingerprint` (on s3 each is a HEAD, ~30-50 ms)."""


def files_fingerprint(uris: Iterable[str]) -> str:
    """A short hash of the sizes and modification times of the files ``uris`` name (one stat
    each, no listing; missing files count as such): the labeled images a stage trained on,
    so one replaced under the same name retrains it. Taken once a command within
    :func:`listings_fixed`."""
    names = sorted(set(uris))
    key = "files:" + hashlib.sha256("\0".join(names).encode()).hexdigest()
    return _once(key, lambda: _files_fingerprint(names))


def _files_fingerprint(names: list[str]) -> str:
    def stat(uri: str) -> str:
        fs, path = fs_and_path(uri)
        fs.invalidate_cache(path)  # s3fs answers info from a listing it cached before
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return f"{uri}\tmissing"
        return f"{uri}\t{info.get('size')}\t{stamp(info)}"

    if len(names) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(FILE_STAT_THREADS, len(names))) as pool:
            lines = list(pool.map(stat, names))
    else:
        lines = [stat(n) for n in names]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _fingerprint(uri: str) -> str:
    """The listing fingerprint, taken now."""
    if "{" in uri:
        from ktray.data.listing import expand_braces

        names = expand_braces(uri)
        if len(names) > 1:
            listings = "\t".join(fingerprint(n) for n in names)
            return hashlib.sha256(listings.encode()).hexdigest()[:16]
    fs, path = fs_and_path(uri)
    fs.invalidate_cache(path)  # s3fs answers info / isdir from listings it cached before
    if any(c in path for c in "*?["):
        entries = {p: fs.info(p) for p in fs.glob(path)}
    elif fs.isdir(path):
        entries = fs.find(path, detail=True)
    elif fs.exists(path):
        entries = {path: fs.info(path)}
    else:
        entries = {}
    h = hashlib.sha256()
    for name in sorted(entries):
        info = entries[name]
        h.update(f"{name[len(path) :]}\t{info.get('size')}\t{stamp(info)}\n".encode())
    return h.hexdigest()[:16]
