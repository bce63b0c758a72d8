"""The load-memory benchmark runs, and the streamed load stays below a load that holds a second
copy of the file (the README's figure comes from its full run)."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_streamed_checkpoint_load_holds_no_second_copy_of_the_file():
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "perf_load_rss.py"), "--depth", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ratios = dict(re.findall(r"^\| (.+?) \| \d+ MiB \| ([\d.]+)x \|$", run.stdout, re.M))
    streamed = float(ratios["LI-DiT Loader, weights as stored (fp32)"])
    copied = float(ratios["safetensors load_file + load_state_dict (for comparison)"])
    assert streamed < 0.75 * copied, run.stdout
