"""The browser tests drive the same ComfyUI server as tests/host, through the real frontend."""
from __future__ import annotations

import os

import harness
import pytest
from harness import ComfyServer


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> ComfyServer:
    """The same server as tests/host (harness.shared_server is a per-process singleton)."""
    if os.environ.get("LIDIT_SKIP_BROWSER") == "1":
        pytest.skip("LIDIT_SKIP_BROWSER=1")
    why = harness.browser_missing()
    if why:
        pytest.fail(why)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as tests/host/conftest.py, when run alone
    pytestconfig.add_cleanup(harness.stop_shared_server)
    return harness.shared_server(tmp_path_factory.getbasetemp() / "comfy")


