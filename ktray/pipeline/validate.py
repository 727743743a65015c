"""Checks of a whole config before any stage work: each failure is one line.

The value of every single setting is checked where it is defined (the ``__post_init__`` of its
section in :mod:`ktray.config`). What needs several sections, the file system, an object
store or the model registries is checked here, by :func:`check_config`, which every command
runs before it starts Ray or writes anything expensive:

- ``out=``, ``data.root``, ``ray.storage_path``, ``curate.gallery`` and checkpoints on an
  object store: credentials, bucket, endpoint (one bounded request each);
- the task data: ``data.root`` exists and has the layout ``data.kind`` reads;
- transfer sets: the methods' (or ``--transfer``'s) sets are available (``in_domain`` needs
  unlabeled images, ``generic`` a pool, ``curated`` a curation run, a URI some files);
- models: teacher, student and curation encoder names, their pretrained weights in the local
  caches (no download), and local checkpoints whose keys and shapes fit the model.
"""

from __future__ import annotations

from collections.abc import Iterable

from ktray import storage
from ktray.config import Config, config_hash, parse_method, to_dict
from ktray.data import readers
from ktray.errors import KtrayError
from ktray.pipeline import tasks

__all__ = ["check_config", "method_transfers", "parse_method"]

_passed: set = set()  # configs (and transfer sets) already checked in this process


def method_transfers(cfg: Config) -> list[str]:
    """The transfer sets that ``cfg.methods`` distill on, in order, without repeats."""
    out: list[str] = []
    for m in cfg.methods:
        t = parse_method(m)[1]
        if t and t not in out:
            out.append(t)
    return out


def _keyed(key: str, check, *args) -> None:
    """Run ``check(*args)``, prefixing a KtrayError with the config key it concerns."""
    try:
        check(*args)
    except KtrayError as e:
        msg = str(e)
        raise KtrayError(msg if msg.startswith(key) else f"{key}: {msg}") from None


def _check_storage(cfg: Config) -> None:
    storage.probe(cfg.out, "out")
    storage.probe(cfg.data.root, "data.root", must_exist=True)
    for key, uri in (
        ("ray.storage_path", cfg.ray.storage_path),
        ("curate.gallery", cfg.curate.gallery),
        ("teacher.checkpoint", cfg.teacher.checkpoint),
        ("student.checkpoint", cfg.student.checkpoint),
    ):
        if storage.is_remote(uri):
            storage.probe(uri, key)


def _check_data(cfg: Config) -> None:
    d = cfg.data
    if not d.root:
        raise KtrayError(f"data.root is empty: give data.root=DIR (the {d.kind} data)")
    if not storage.exists(d.root):
        raise KtrayError(f"data.root not found: {d.root}")
    tasks.check_layout(cfg)


def _check_models(cfg: Config, curate: bool) -> None:
    from ktray.models import available

    t, s = cfg.teacher, cfg.student
    key = "teacher.checkpoint" if t.checkpoint else "teacher.backbone"
    _keyed(key, available.check_teacher, t.backbone, t.pretrained, t.checkpoint, t.img_size)
    key = "student.checkpoint" if s.checkpoint else "student.arch"
    _keyed(key, available.check_student, s.arch, s.pretrained, s.checkpoint, s.img_size)
    if curate and cfg.curate.encoder:
        _keyed("curate.encoder", available.check_encoder, cfg.curate.encoder, cfg.curate.pretrained)
    if curate and cfg.curate.gallery:
        _keyed(
            "curate.gallery",
            readers.expand_files,
            cfg.curate.gallery,
            tasks.TRANSFER_SUFFIXES,
            "gallery files",
        )


def _check_transfer(cfg: Config, name: str, will_curate: bool) -> None:
    d = cfg.data
    if name == "in_domain":
        if not tasks.has_unlabeled(cfg):
            where = {
                "imagefolder": f"{d.root} has no unlabeled/ folder",
                "parquet": f"{d.root} has no unlabeled*.parquet files",
                "segfolder": f"{d.root} has no unlabeled/ folder",
            }.get(d.kind, f"data.kind={d.kind} has no unlabeled split")
            raise KtrayError(
                f"transfer set 'in_domain' needs unlabeled images: {where} and "
                "data.labels_per_class=0 keeps no train images back; add them, "
                "or leave in_domain out (e.g. methods=[teacher,scratch,task@generic])"
            )
    elif name == "generic":
        if d.generic_images < 1:
            raise KtrayError(
                f"transfer set 'generic' needs data.generic_images > 0, got {d.generic_images}"
            )
    elif name == "curated":
        if not will_curate and not storage.exists(tasks.curated_uri(cfg)):
            raise KtrayError(
                "transfer set 'curated' needs a finished 'ktray curate' run with "
                f"this out= ({tasks.curated_uri(cfg)} is missing)"
            )
    else:
        tasks.check_transfer_uri(name)


def check_config(cfg: Config, transfers: Iterable[str] = (), will_curate: bool = False) -> None:
    """Raise a one-line KtrayError on the first problem of ``cfg``.

    Args:
        cfg: The config (every single value already checked when it was built).
        transfers: Transfer sets the command will use (``method_transfers(cfg)`` for ``run``,
            ``--transfer`` for ``logits`` / ``distill``).
        will_curate: The command curates the ``curated`` set itself (``run``, ``curate``,
            ``sweep``), so it need not exist yet.
    """
    transfers = list(transfers)
    base = config_hash(to_dict(cfg))
    curate = will_curate or "curated" in transfers
    if (base, curate) not in _passed:
        _check_storage(cfg)
        _check_data(cfg)
        _check_models(cfg, curate)
        _passed.add((base, curate))
    for name in transfers:
        key = (base, name, will_curate)
        if key not in _passed:
            _check_transfer(cfg, name, will_curate)
            _passed.add(key)
