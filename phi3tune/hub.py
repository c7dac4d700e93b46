"""Share what was trained: upload an adapter or a merged model directory to the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelSourceError, Phi3TuneError

_TRUE = {"1", "on", "yes", "true"}
# Network failures of huggingface_hub's HTTP stack (httpx or requests), recognized by class name so that
# phi3tune does not import either library itself.
_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "TransportError", "NetworkError", "TimeoutException",
                   "ReadTimeout", "ProxyError", "OfflineModeIsEnabled"}


class HubError(Phi3TuneError, ConnectionError):
    """The model hub cannot be reached, or refused the upload (not logged in, no write access)."""


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) tells every Hugging Face library not to go online."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_hub_id(name: str, what: str, filename: str = "config.json") -> None:
    """A hub id that is not cached, with no hub to ask, fails in a second naming ``what`` (the setting), instead
    of after half a minute of retries with a message about the network library."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, filename), str):
            return  # cached: the Hugging Face libraries manage offline from the cache
    except ValueError:  # not a valid repo id: let the loader word it
        return
    if hub_offline():
        raise ModelSourceError(f"{what} {name!r} is not a local directory nor in the Hugging Face cache, and "
                               "HF_HUB_OFFLINE is set, so the hub is not asked. Give a local directory (written by "
                               "save_pretrained), or unset HF_HUB_OFFLINE on a machine with network access")
    reason = _unreachable(constants.ENDPOINT)
    if reason:
        raise ModelSourceError(f"{what} {name!r} is not a local directory nor in the Hugging Face cache, and the "
                               f"model hub {constants.ENDPOINT} cannot be reached ({reason}). Give a local "
                               "directory, or check the network (HF_ENDPOINT, HTTPS_PROXY)")


def _unreachable(endpoint: str, timeout_s: float = 3.0) -> str | None:
    """Why a TCP connection to the hub (or the HTTPS proxy in use) fails, or None when it opens."""
    import socket
    from urllib.parse import urlparse
    from urllib.request import getproxies

    url = urlparse(getproxies().get("https") or endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"
    return None


def _kind_of(folder: Path) -> str:
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file():
        return "model"
    raise ModelSourceError(f"push_to_hub: {str(folder)!r} holds neither adapter_config.json (an adapter, e.g. "
                           "results/final_checkpoint) nor config.json (a merged model from merge_adapter)")


def _as_hub_error(exc: BaseException, repo_id: str) -> HubError | None:
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _NETWORK_ERRORS or isinstance(exc, (ConnectionError, TimeoutError)):
        return HubError(f"push_to_hub: no model hub reachable ({type(exc).__name__}: {str(exc)[:160]}). "
                        "Check the network (and HF_ENDPOINT), or copy the directory by other means")
    if "LocalTokenNotFoundError" in names:
        return HubError("push_to_hub: not logged in to the Hugging Face Hub; run `hf auth login`, set HF_TOKEN, "
                        "or pass token=")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return HubError(f"push_to_hub: the hub refused access to {repo_id!r} (HTTP {status}); use a token with "
                        "write access to that namespace")
    return None


def push_to_hub(folder: str | os.PathLike[str], repo_id: str, *, private: bool = True, token: str | None = None,
                commit_message: str | None = None, revision: str | None = None) -> str:
    """Upload an adapter directory (``final_checkpoint``) or a merged model directory to ``repo_id``.

    Creates the model repo if needed (private by default) and uploads every file of ``folder`` in one commit.
    Returns the repo URL. Offline (``HF_HUB_OFFLINE=1``) or without a network it raises ``HubError`` at once.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelSourceError(f"push_to_hub: {str(path)!r} is not a directory; give an adapter directory or a "
                               "merged model directory")
    kind = _kind_of(path)
    if not repo_id or repo_id.count("/") > 1 or repo_id.strip() != repo_id:
        raise HubError(f"push_to_hub: repo_id {repo_id!r} is not a hub model id; use 'name' or 'user/name'")
    if hub_offline():
        raise HubError("push_to_hub: no model hub reachable: HF_HUB_OFFLINE is set, so Hugging Face libraries stay "
                       "offline. Unset it on a machine with network access to upload, or copy "
                       f"{str(path)!r} by other means")
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:  # it comes with transformers; the "hub" extra pins it
        raise HubError("push_to_hub needs huggingface_hub: pip install 'phi3tune[hub]'") from exc
    api = HfApi(token=token)
    message = commit_message or f"Upload {kind} trained with phi3tune"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(path), commit_message=message, revision=revision,
                          repo_type="model", ignore_patterns=[".*", "**/.*"])
    except Exception as exc:
        mapped = _as_hub_error(exc, repo_id)
        if mapped is None:
            raise
        raise mapped from exc
    return str(getattr(url, "url", url))
