"""Fixtures for host tests: one real ComfyUI server shared by the whole pytest run.

``comfy_server`` starts it on first use (~10 s) and stops it when pytest ends. When a test
that uses it fails, its share of the server log is attached to the report.
"""

from __future__ import annotations

import os
from pathlib import Path

import harness
import pytest
from harness import ComfyServer

_LOG_MARK = pytest.StashKey[int]()

# The server shares a small, busy CPU: with one OpenMP thread the tiny test models run ~40x
# faster than with threads spinning against other processes (measured: 1 s/step -> 25 ms/step).
# Set before the server starts; an explicit OMP_NUM_THREADS in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> ComfyServer:
    """The ComfyUI server of the test run (see harness.shared_server); the pack is linked if it has __init__.py."""
    pytestconfig.add_cleanup(harness.stop_shared_server)
    return harness.shared_server(tmp_path_factory.getbasetemp() / "comfy")


@pytest.fixture(scope="session")
def comfy_models_dir(comfy_server: ComfyServer) -> Path:
    """``<dir>/<key>`` is a registered model folder for each key in harness.MODEL_FOLDER_KEYS
    (diffusion_models, LLM, text_encoders, vae, checkpoints, loras). Files added any time are seen."""
    assert comfy_server.models_dir is not None
    return comfy_server.models_dir


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the server as ``host`` (so ``-m 'not host'`` works), and run
    the rings in order: unit tests first (fast feedback, no server in memory), then host,
    then browser. The sort is stable, so module and fixture grouping stays as collected."""
    for item in items:
        if "comfy_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.host)

    def ring(item: pytest.Item) -> int:
        if item.get_closest_marker("browser"):
            return 2
        return 1 if item.get_closest_marker("host") else 0

    items.sort(key=ring)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    rep = outcome.get_result()
    server = harness._SERVER
    if server is None or "comfy_server" not in getattr(item, "fixturenames", ()):
        return
    if rep.when == "setup":
        item.stash[_LOG_MARK] = server.log_size()
    elif rep.when == "call" and rep.failed:
        since = item.stash.get(_LOG_MARK, 0)
        rep.sections.append(("ComfyUI server log (this test)", server.log_text(since=since, tail=200)))


@pytest.fixture(scope="session")
def lidit_assets(comfy_models_dir: Path):
    """The LLMs and checkpoints the workflows name: tiny random ones unless LIDIT_TEST_ASSETS=real
    (see tests/host/lidit_assets.py for how names resolve)."""
    import lidit_assets as assets

    return assets.provision(comfy_models_dir)


@pytest.fixture(scope="session")
def pack():
    """ComfyUI and the pack imported into this process (see tests/host/inproc.py)."""
    import inproc

    return inproc.load_pack()


@pytest.fixture(scope="session")
def tiny_pack_assets(pack, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two tiny random LLMs, registered in ComfyUI's LLM folders under names of their own, and a
    tiny flow checkpoint for them: {'llms': [names], 'checkpoint': path}."""
    import folder_paths

    from tests.fixtures_models import build_tiny_checkpoint, build_tiny_llm, llm_branch, tiny_config

    root = tmp_path_factory.mktemp("inproc")
    folders = [build_tiny_llm(root / "LLM" / name, arch, hidden, chat)
               for name, arch, hidden, chat in (("tiny-smol", "llama", 64, True), ("tiny-gemma", "gemma3", 48, False))]
    folder_paths.add_model_folder_path("LLM", str(root / "LLM"))
    ckpt = build_tiny_checkpoint(root / "tiny.safetensors", tiny_config([llm_branch(f) for f in folders]), seed=7)
    return {"llms": [f.name for f in folders], "checkpoint": ckpt}


DEMO_CHECKPOINT = harness.REPO_ROOT / "checkpoints" / "lidit-demo.safetensors"
DEMO_LLMS = ["SmolLM2-135M-Instruct", "gemma-3-270m"]


@pytest.fixture(scope="session")
def demo_assets(pack) -> dict:
    """The real demo checkpoint and LLMs (scripts/provision_llms.py), or a skip."""
    missing = [p for p in [DEMO_CHECKPOINT, *(harness.REPO_ROOT / "models" / "LLM" / n / "config.json" for n in DEMO_LLMS)]
               if not p.exists()]
    if missing:
        pytest.skip(f"needs the demo assets (scripts/provision_llms.py): missing {missing[0]}")
    return {"llms": DEMO_LLMS, "checkpoint": DEMO_CHECKPOINT}
