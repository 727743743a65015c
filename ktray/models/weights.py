"""Weights on disk and on the Hugging Face Hub: reading state dicts, loading them with clear
errors, and refusing fast when pretrained weights cannot be fetched.

Without this guard a hub model asked for on a machine without internet retries for 20-50 s
before failing with a multi-line traceback; here it fails at once with one line that says what
to do (``HF_HUB_OFFLINE``, a local ``checkpoint``, or ``pretrained=False``).
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from collections.abc import Iterable

import torch
from torch import nn

from ktray.errors import KtrayError

# Prefixes that training wrappers add in front of a model's own parameter names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.model.", "visual.")

HUB_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a local ``.safetensors`` or ``.pth`` / ``.pt`` / ``.bin`` file.

    A torch file may hold the state dict itself or wrap it under ``state_dict``, ``model`` or
    ``state_dict_ema`` (timm and common training scripts).

    Args:
        path: Local file path.

    Returns:
        Mapping of parameter / buffer names to CPU tensors.

    Raises:
        KtrayError: The file is missing or holds no state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise KtrayError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise KtrayError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KtrayError(f"checkpoint {path} holds no state dict of tensors")
    return obj


def strip_wrapper_prefix(
    state: dict[str, torch.Tensor], expected: set[str]
) -> dict[str, torch.Tensor]:
    """Drop one wrapper prefix (``module.``, ``model.``, ...) when that makes the keys fit."""
    if set(state) & expected:
        return state
    for prefix in _WRAPPER_PREFIXES:
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if set(stripped) & expected:
            return stripped
    return state


def load_state_dict_into(
    module: nn.Module, state: dict[str, torch.Tensor], what: str, assign: bool = False
) -> None:
    """Load ``state`` into ``module`` strictly, with a one-line error on a mismatch.

    A module built on the meta device (shapes only) is checked and left as it is: that is how
    :mod:`ktray.models.available` checks a checkpoint before any work starts. With ``assign``
    the module takes ``state``'s tensors as its own (cast to its dtypes), meta or not: how
    :func:`ktray.models.checkpoint.load_model` fills a model built without initialising it.

    Args:
        module: Target module.
        state: State dict, possibly with a wrapper prefix (``module.``, ``model.``, ...).
        what: Words naming the source in error messages (e.g. the checkpoint path).

    Raises:
        KtrayError: Missing / unexpected keys or shape mismatches.
    """
    expected = module.state_dict()
    state = strip_wrapper_prefix(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

        raise KtrayError(
            f"{what} does not fit the model: {len(missing)} missing ({few(missing)}), "
            f"{len(unexpected)} unexpected ({few(unexpected)}), "
            f"{len(wrong)} with another shape ({few(wrong)})"
        )
    if assign:
        state = {
            k: v.to(expected[k].dtype)
            if v.is_floating_point() and v.dtype != expected[k].dtype
            else v
            for k, v in state.items()
        }
        module.load_state_dict(state, strict=True, assign=True)
        return
    if any(p.is_meta for p in module.parameters()):
        return  # a shape-only model (built on the meta device): the check was the point
    module.load_state_dict(state, strict=True)


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off (``HF_HUB_OFFLINE`` and the like)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001 - an old or missing huggingface_hub: not offline
        return False


def hub_cached(repo_id: str, filenames: Iterable[str] = HUB_WEIGHT_FILES) -> bool:
    """Whether any of ``filenames`` of hub repo ``repo_id`` is in the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        try:
            found = try_to_load_from_cache(repo_id, name)
        except Exception:  # noqa: BLE001 - a malformed repo id is simply "not cached"
            return False
        if isinstance(found, str):
            return True
    return False


def _endpoint_reachable(url: str, timeout: float = 3.0) -> bool:
    """A TCP connect to the hub's host; True when a proxy is configured (we cannot tell)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parsed = urllib.parse.urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if not host:
        return True
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(repo_id: str, what: str, filenames: Iterable[str] = HUB_WEIGHT_FILES) -> None:
    """Fail fast, in one line, when hub weights are needed but cannot be had.

    Passes when a weight file of ``repo_id`` is cached. Otherwise raises when the hub is off
    (``HF_HUB_OFFLINE=1``) or its host does not answer a TCP connect within 3 s.

    Args:
        repo_id: Hub repository (``timm/resnet18.a1_in1k``).
        what: The model name as the user wrote it, for the message.
        filenames: Weight files any one of which suffices.

    Raises:
        KtrayError: The weights are neither cached nor downloadable.
    """
    if hub_cached(repo_id, filenames):
        return
    hint = "give a local checkpoint=PATH or use pretrained=False"
    if hub_offline():
        raise KtrayError(
            f"{what} needs hub repo {repo_id}, which is not in the local cache, and "
            f"HF_HUB_OFFLINE is set; {hint}"
        )
    from huggingface_hub import constants

    endpoint = getattr(constants, "ENDPOINT", "https://huggingface.co")
    if not _endpoint_reachable(endpoint):
        raise KtrayError(
            f"{what} needs hub repo {repo_id}, which is not in the local cache, and {endpoint} "
            f"cannot be reached; {hint}"
        )


def require_url(url: str, what: str) -> None:
    """Like :func:`require_hub` for weights that torch.hub downloads from a plain URL."""
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if os.path.isfile(cached):
        return
    if not _endpoint_reachable(url):
        raise KtrayError(
            f"pretrained weights for {what} ({url}) are not cached and cannot be downloaded; "
            "give a local checkpoint=PATH or use pretrained=False"
        )
