"""Run a real ComfyUI server for host tests, and talk to it over HTTP + websocket.

Why a real server: the pack is only correct if the real host imports it, validates the
graphs, caches, streams progress and can interrupt it. Mocks of ComfyUI drift; the server
does not. ComfyUI comes from ``scripts/provision.sh`` (``.comfyui/ComfyUI``) or from
``$COMFYUI_DIR``.

One server is shared by the whole pytest run (:func:`shared_server`): it takes ~10 s to
start and ~0.5 GB of RAM, so each test must make its prompts unique (vary a seed or a
filename prefix) when it needs a node to re-execute rather than come from the cache.

Usage from a test (the ``comfy_server`` fixture lives in ``tests/host/conftest.py``)::

    @pytest.mark.host
    def test_x(comfy_server):
        pid = comfy_server.queue(prompt)          # HTTP 400 -> PromptRejected
        entry = comfy_server.wait(pid, timeout=120)  # failure -> ExecutionFailed
        [png] = comfy_server.output_images(entry)
        assert image_size(png) == (64, 32)
        assert "execution_success" in comfy_server.event_types(pid)
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
import websocket  # websocket-client
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "ComfyUI-LI-DiT"
#: Model folder keys the shared server registers under its own tmp models dir.
MODEL_FOLDER_KEYS = ("diffusion_models", "LLM", "text_encoders", "vae", "checkpoints", "loras", "lidit_pathways")
#: test-only custom-node modules the shared server loads (a tiny text encoder for CLIPLoader, a tiny
#: PixArt for UNETLoader)
SERVER_NODES = Path(__file__).with_name("server_nodes")
TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class ComfyError(RuntimeError):
    """Base class: every message carries enough context to debug without re-running."""


class ServerStartError(ComfyError):
    pass


class PromptRejected(ComfyError):
    """POST /prompt answered HTTP 400 (validation); ``node_errors`` says which node and why."""

    def __init__(self, error: Any, node_errors: Mapping[str, Any]):
        self.error = error
        self.node_errors = dict(node_errors)
        super().__init__(
            f"prompt rejected: {json.dumps(error)}\nnode_errors: {json.dumps(node_errors, indent=1)}"
        )


class ExecutionFailed(ComfyError):
    """The prompt ran but ended in execution_error / execution_interrupted."""

    def __init__(self, prompt_id: str, entry: Mapping[str, Any]):
        self.prompt_id = prompt_id
        self.entry = dict(entry)
        status = entry.get("status", {})
        msgs = [m for m in status.get("messages", []) if m[0] != "execution_start"]
        super().__init__(
            f"prompt {prompt_id} ended with status {status.get('status_str')!r}:\n"
            + json.dumps(msgs, indent=1)[:6000]
        )


def find_comfyui_dir() -> Path:
    """``$COMFYUI_DIR`` if set, else the copy provision.sh extracted into the repo."""
    env = os.environ.get("COMFYUI_DIR")
    path = Path(env).expanduser().resolve() if env else REPO_ROOT / ".comfyui" / "ComfyUI"
    if not (path / "main.py").is_file():
        hint = "COMFYUI_DIR" if env else "run scripts/provision.sh first"
        raise ServerStartError(f"no ComfyUI at {path} ({hint})")
    return path


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (small race window; fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) of an image file."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _die_with_parent() -> None:
    """preexec_fn: have the kernel SIGTERM the server if pytest dies (no orphans in CI).

    Linux ties this to the *thread* that started the child: start servers from the main
    thread (fixtures do), not from a short-lived worker thread.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ComfyServer:
    """One ComfyUI process on 127.0.0.1 with its own input/output/user/temp folders.

    ``model_folders`` maps a folder_paths key (e.g. ``"diffusion_models"``, ``"LLM"``) to
    folders; they go into an extra_model_paths.yaml passed with
    ``--extra-model-paths-config``, together with any ready-made ``extra_model_paths_configs``.
    ComfyUI re-lists a folder when its mtime changes, so files added after start are seen.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        comfy_dir: Path | None = None,
        pack_dir: Path | None = REPO_ROOT,
        port: int | None = None,
        model_folders: Mapping[str, Sequence[Path]] | None = None,
        extra_model_paths_configs: Sequence[Path] = (),
        extra_args: Sequence[str] = (),
    ):
        self.comfy_dir = comfy_dir or find_comfyui_dir()
        self.pack_dir = pack_dir
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.output_dir = self.workdir / "output"
        self.input_dir = self.workdir / "input"
        self.user_dir = self.workdir / "user"
        self.temp_dir = self.workdir / "temp"
        self.log_path = self.workdir / "comfyui.log"
        self.model_folders = {k: [Path(p) for p in v] for k, v in (model_folders or {}).items()}
        self.extra_model_paths_configs = [Path(p) for p in extra_model_paths_configs]
        self.extra_args = list(extra_args)
        self.client_id = uuid.uuid4().hex
        #: set by shared_server(): ``models_dir / key`` is registered for each MODEL_FOLDER_KEYS
        self.models_dir: Path | None = None
        self.pack_linked = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._events: dict[str | None, list[dict[str, Any]]] = {}
        self._binary_frames = 0
        self._cv = threading.Condition()
        self._ws: websocket.WebSocket | None = None
        self._ws_thread: threading.Thread | None = None
        self._stopping = False
        self._http = requests.Session()

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def link_pack(self) -> Path | None:
        """Symlink the repo (which is the pack) into custom_nodes, if it has an __init__.py.

        Without ``__init__.py`` ComfyUI would log an IMPORT FAILED for it, so nothing is
        linked (and a stale link of ours is removed).
        """
        link = self.comfy_dir / "custom_nodes" / PACK_NAME
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise ServerStartError(f"{link} exists and is not a symlink; refusing to replace it")
        if self.pack_dir is None or not (self.pack_dir / "__init__.py").is_file():
            return None
        link.symlink_to(self.pack_dir.resolve(), target_is_directory=True)
        return link

    def _write_model_paths(self) -> list[Path]:
        configs = list(self.extra_model_paths_configs)
        if self.model_folders:
            cfg = {
                "lidit_tests": {
                    key: "\n".join(str(Path(p).resolve()) for p in paths)
                    for key, paths in self.model_folders.items()
                }
            }
            path = self.workdir / "extra_model_paths.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=True))
            configs.insert(0, path)
        return configs

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "main.py", "--cpu",
            "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--disable-api-nodes",
            "--output-directory", str(self.output_dir),
            "--input-directory", str(self.input_dir),
            "--user-directory", str(self.user_dir),
            "--temp-directory", str(self.temp_dir),
            # keep the sqlite db out of the ComfyUI folder (it may be the user's own)
            "--database-url", f"sqlite:///{self.workdir / 'comfyui.db'}",
        ]
        configs = self._write_model_paths()
        if configs:
            cmd += ["--extra-model-paths-config", *map(str, configs)]
        return cmd + self.extra_args

    def start(self, timeout: float = 180.0) -> None:
        """Start the server and block until /system_stats answers and the websocket is open."""
        if self.proc is not None:
            return
        for d in (self.output_dir, self.input_dir, self.user_dir, self.temp_dir):
            d.mkdir(parents=True, exist_ok=True)
        for paths in self.model_folders.values():
            for p in paths:
                Path(p).mkdir(parents=True, exist_ok=True)
        self.pack_linked = self.link_pack() is not None
        # No HF_HUB_OFFLINE: the pack must stay offline by itself. The network guard refuses, and
        # logs, every connection that is not to the loopback (tests/host/netguard/sitecustomize.py).
        guard = str(Path(__file__).with_name("netguard"))
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (guard, os.environ.get("PYTHONPATH")) if p))
        for offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.pop(offline, None)
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent,
            )
        atexit.register(self.stop)
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"ComfyUI exited with code {self.proc.returncode} during startup\n"
                    + self.log_text(tail=80)
                )
            try:
                if self._http.get(self.url + "/system_stats", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"ComfyUI did not answer /system_stats within {timeout:.0f}s\n"
                    + self.log_text(tail=80)
                )
            time.sleep(0.25)
        self.startup_seconds = time.monotonic() - t0
        self._connect_ws()

    def stop(self, grace: float = 10.0) -> None:
        """Terminate (then kill) the server; closes the websocket. Safe to call twice."""
        self._stopping = True
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:
                pass
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(grace)
        if self._ws_thread is not None:
            self._ws_thread.join(timeout=5)

    def __enter__(self) -> ComfyServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ logs
    def log_size(self) -> int:
        """A mark for :meth:`log_text` (``since=``), to show only one test's share of the log."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_text(self, since: int = 0, tail: int | None = None) -> str:
        if not self.log_path.exists():
            return f"(no log at {self.log_path})"
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode("utf-8", "replace")
        if tail is not None:
            text = "\n".join(text.splitlines()[-tail:])
        return f"--- ComfyUI log {self.log_path} ---\n{text}"

    def import_failures(self) -> list[str]:
        """Custom-node / comfy_extras modules that ComfyUI reported as IMPORT FAILED."""
        lines = self.log_path.read_text("utf-8", "replace").splitlines() if self.log_path.exists() else []
        return [ln.strip() for ln in lines if "IMPORT FAILED" in ln]

    def pack_import_failed(self) -> bool:
        """True when our pack was linked but ComfyUI logged IMPORT FAILED for it."""
        return self.pack_linked and any(PACK_NAME in ln for ln in self.import_failures())

    # ------------------------------------------------------------------ websocket
    def _connect_ws(self) -> None:
        self._ws = websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=10
        )
        self._ws.settimeout(1.0)
        self._ws_thread = threading.Thread(target=self._ws_loop, name="comfy-ws", daemon=True)
        self._ws_thread.start()

    def _ws_loop(self) -> None:
        ws = self._ws
        assert ws is not None
        while not self._stopping:
            try:
                opcode, data = ws.recv_data()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:
                break
            if opcode == websocket.ABNF.OPCODE_BINARY:
                with self._cv:  # preview images: counted, not kept
                    self._binary_frames += 1
                continue
            if opcode != websocket.ABNF.OPCODE_TEXT:
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
                continue
            try:
                msg = json.loads(data)
            except ValueError:
                continue
            payload = msg.get("data") or {}
            pid = payload.get("prompt_id") if isinstance(payload, dict) else None
            with self._cv:
                self._events.setdefault(pid, []).append(
                    {"type": msg.get("type"), "data": payload, "t": time.monotonic()}
                )
                self._cv.notify_all()

    def events(self, prompt_id: str | None) -> list[dict[str, Any]]:
        """Websocket events of one prompt, in arrival order: ``{"type", "data", "t"}``.

        ``prompt_id=None`` gives the events that carry no prompt id (``status`` queue updates).
        """
        with self._cv:
            return list(self._events.get(prompt_id, []))

    def event_types(self, prompt_id: str | None) -> list[str]:
        return [e["type"] for e in self.events(prompt_id)]

    @property
    def preview_frames(self) -> int:
        """Binary websocket frames received so far (latent previews)."""
        with self._cv:
            return self._binary_frames

    def wait_event(self, prompt_id: str, types: str | Iterable[str], timeout: float = 60.0) -> dict[str, Any]:
        """Block until an event of one of ``types`` arrives for ``prompt_id``; return it."""
        wanted = {types} if isinstance(types, str) else set(types)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for ev in self._events.get(prompt_id, []):
                    if ev["type"] in wanted:
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [e["type"] for e in self._events.get(prompt_id, [])]
                    raise TimeoutError(
                        f"no {sorted(wanted)} event for prompt {prompt_id} within {timeout:.0f}s; "
                        f"events seen: {seen}"
                    )
                self._cv.wait(min(left, 1.0))

    # ------------------------------------------------------------------ HTTP API
    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ComfyError(f"ComfyUI is not running (exit code {code})\n" + self.log_text(tail=80))

    def get(self, path: str, timeout: float = 30.0) -> Any:
        """GET a JSON endpoint, e.g. ``get("/queue")``."""
        self._check_alive()
        r = self._http.get(self.url + path, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """``/object_info`` (all nodes) or the definition of one node class."""
        if node_class is None:
            return self.get("/object_info", timeout=60)
        return self.get(f"/object_info/{node_class}")[node_class]

    def queue(self, prompt: Mapping[str, Any], *, client_id: str | None = None,
              extra_data: Mapping[str, Any] | None = None) -> str:
        """POST an API-format prompt; return its prompt_id. HTTP 400 raises PromptRejected."""
        self._check_alive()
        body: dict[str, Any] = {"prompt": prompt, "client_id": client_id or self.client_id}
        if extra_data:
            body["extra_data"] = dict(extra_data)
        r = self._http.post(self.url + "/prompt", json=body, timeout=60)
        if r.status_code == 400:
            data = r.json()
            raise PromptRejected(data.get("error"), data.get("node_errors", {}))
        if not r.ok:
            raise ComfyError(f"POST /prompt answered HTTP {r.status_code}: {r.text[:2000]}")
        return str(r.json()["prompt_id"])

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of a finished prompt, or None while it is queued or running."""
        return self.get(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120.0, *, check: bool = True) -> dict[str, Any]:
        """Block until the prompt finished; return its history entry.

        Also waits (briefly) for the terminal websocket event, so :meth:`events` is complete
        when this returns. ``check=True`` raises ExecutionFailed unless it succeeded.
        """
        deadline = time.monotonic() + timeout
        entry: dict[str, Any] | None = None
        while entry is None:
            entry = self.history(prompt_id)
            if entry is not None:
                break
            if time.monotonic() > deadline:
                queue = self.get("/queue")
                running = [item[1] for item in queue.get("queue_running", [])]
                pending = [item[1] for item in queue.get("queue_pending", [])]
                raise TimeoutError(
                    f"prompt {prompt_id} not finished after {timeout:.0f}s "
                    f"(running: {running}, pending: {pending}); "
                    f"events: {self.event_types(prompt_id)}\n" + self.log_text(tail=40)
                )
            time.sleep(0.2)
        try:
            self.wait_event(prompt_id, TERMINAL_EVENTS, timeout=10)
        except TimeoutError:
            pass  # history is authoritative; events() may just be short
        if check and entry.get("status", {}).get("status_str") != "success":
            raise ExecutionFailed(prompt_id, entry)
        return entry

    def run(self, prompt: Mapping[str, Any], timeout: float = 120.0, *, check: bool = True) -> tuple[str, dict[str, Any]]:
        """queue + wait: ``(prompt_id, history entry)``."""
        pid = self.queue(prompt)
        return pid, self.wait(pid, timeout, check=check)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: the running prompt, or only ``prompt_id`` if it is the one running."""
        self._check_alive()
        body = {"prompt_id": prompt_id} if prompt_id else {}
        self._http.post(self.url + "/interrupt", json=body, timeout=30).raise_for_status()

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """POST /free: unload models and/or drop the node cache (takes effect between prompts)."""
        self._check_alive()
        self._http.post(self.url + "/free", json={"unload_models": unload_models,
                                                  "free_memory": free_memory}, timeout=30).raise_for_status()

    # ------------------------------------------------------------------ outputs
    def output_images(self, entry: Mapping[str, Any], node_id: str | None = None) -> list[Path]:
        """Files of the images listed in a history entry (all nodes, or one node id)."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        files: list[Path] = []
        for nid, out in entry.get("outputs", {}).items():
            if node_id is not None and nid != str(node_id):
                continue
            for img in out.get("images", []):
                root = roots[img.get("type", "output")]
                files.append(root / img.get("subfolder", "") / img["filename"])
        return files


# ---------------------------------------------------------------------- one server per test run
_SERVER: ComfyServer | None = None
_SERVER_ERROR: str | None = None


def shared_server(workdir: Path, *, start_timeout: float = 180.0) -> ComfyServer:
    """The one server of this test process, started on first use.

    Every fixture that needs a server (host and browser tests) goes through here, so a
    whole pytest run starts ComfyUI once. Model folders: ``<workdir>/models/<key>`` for each
    key in MODEL_FOLDER_KEYS (tests drop fixture models there, see ``server.models_dir``),
    plus the YAML files listed in ``$LIDIT_EXTRA_MODEL_PATHS`` (os.pathsep-separated), e.g.
    to run the host tests against real weights.
    """
    global _SERVER, _SERVER_ERROR
    if _SERVER_ERROR is not None:
        raise ComfyError(f"the shared ComfyUI server failed to start earlier:\n{_SERVER_ERROR}")
    if _SERVER is not None:
        if _SERVER.proc is None:
            raise ComfyError("the shared ComfyUI server was already stopped")
        return _SERVER
    models = Path(workdir) / "models"
    extra = [Path(p) for p in os.environ.get("LIDIT_EXTRA_MODEL_PATHS", "").split(os.pathsep) if p]
    server = ComfyServer(
        Path(workdir) / "server",
        model_folders={**{k: [models / k] for k in MODEL_FOLDER_KEYS}, "custom_nodes": [SERVER_NODES]},
        extra_model_paths_configs=extra,
    )
    server.models_dir = models
    _SERVER = server
    try:
        server.start(timeout=start_timeout)
        if server.pack_import_failed():
            server.stop()
            raise ServerStartError(f"ComfyUI could not import the {PACK_NAME} pack\n" + server.log_text(tail=80))
    except Exception as e:
        _SERVER_ERROR = f"{type(e).__name__}: {e}"
        raise
    return server


def stop_shared_server() -> None:
    if _SERVER is not None:
        _SERVER.stop()


# ---------------------------------------------------------------------- browser
BROWSER_DIR = REPO_ROOT / "tests" / "browser"
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found (scripts/provision.sh installs Debian's chromium)"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "tests/browser/node_modules missing (scripts/provision.sh runs npm ci)"
    return None


def load_workflows(
    url: str,
    files: Sequence[Path],
    out_json: Path,
    *,
    screenshot_dir: Path | None = None,
    timeout: float = 240.0,
) -> dict[str, dict[str, Any]]:
    """Run ``tests/browser/load_workflows.mjs``: load UI workflows in the real frontend.

    Returns ``{str(file): {"output": api_prompt | None, "missing": [types], "errors": [...]}}``
    keyed by the paths as given. One chromium start (~6 s) serves all files, so pass them
    together.
    """
    cmd = ["node", str(BROWSER_DIR / "load_workflows.mjs"), "--url", url, "--out", str(out_json),
           "--timeout-ms", str(int(timeout * 1000 / 2))]
    if screenshot_dir is not None:
        cmd += ["--screenshot-dir", str(screenshot_dir)]
    cmd += [str(f) for f in files]
    try:
        proc = subprocess.run(cmd, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise TimeoutError(f"load_workflows.mjs did not finish within {timeout:.0f}s\n{e.stderr or ''}") from e
    if proc.returncode != 0:
        raise ComfyError(f"load_workflows.mjs failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}")
    return json.loads(Path(out_json).read_text())
