"""The host benchmark runs through ComfyUI's sampling and prints its table and ratios (at a tiny
size here; its real run is a command of its own, see the README)."""
import re
import subprocess
import sys
from pathlib import Path

from lidit.precision import native_bf16

REPO = Path(__file__).resolve().parents[2]


def test_bench_host_prints_times_flops_and_ratios_at_tiny_depth():
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "perf_host.py"), "--depth", "1", "--rounds", "2",
                          "--steps", "1", "--resolution", "384"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = re.findall(r"^\| (LI-DiT-1B|PixArt)[^|]*\| ([\d.]+) ± [\d.na]+ \| ([\d.]+) \|", run.stdout, re.M)
    bf16 = native_bf16("cpu")  # else bf16 is emulated (~80x slower than fp32): its rows are left out
    assert len(rows) == (4 if bf16 else 2) and all(float(seconds) > 0 and float(gflop) > 0 for _, seconds, gflop in rows)
    assert len(re.findall(r"^\| LI-DiT-1B.* / PixArt.*\| [\d.]+x ± ", run.stdout, re.M)) == (3 if bf16 else 1)
    assert bf16 != ("bf16 rows left out" in run.stdout)
