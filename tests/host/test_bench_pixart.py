"""The PixArt comparison benchmark runs (at a tiny depth here; its real run is a command of its own)."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_pixart_prints_ratios_at_tiny_depth():
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_pixart.py"), "--depth", "1", "--repeats", "1",
                          "--prompt-tokens", "8", "--instruction-tokens", "4"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ratios = re.findall(r"ratio to PixArt\s+([\d.]+)x", run.stdout)
    assert len(ratios) == 3 and float(ratios[-1]) == 1.0
    assert "PixArt-alpha XL/2" in run.stdout
