"""Fixtures for host tests: one real ComfyUI server shared by the whole pytest run.

``comfy_server`` starts it on first use (~10 s) and stops it when pytest ends. When a test
that uses it fails, its share of the server log is attached to the report.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import harness
from harness import ComfyServer

_LOG_MARK = pytest.StashKey[int]()

# The server shares a small, busy CPU: with one OpenMP thread the tiny test models run ~40x
# faster than with threads spinning against other processes (measured: 1 s/step -> 25 ms/step).
# Set before the server starts; an explicit OMP_NUM_THREADS in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> ComfyServer:
    """The session's ComfyUI (see harness.session_server); the pack is linked if it has __init__.py."""
    pytestconfig.add_cleanup(harness.stop_session_server)
    return harness.session_server(tmp_path_factory.getbasetemp() / "comfy")


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
    server = harness._SESSION
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
