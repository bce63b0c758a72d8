"""Peak resident memory of loading an LI-DiT checkpoint through the LI-DiT Loader, per byte of file.

Writes a random LI-DiT-1B checkpoint (reduced depth) and loads it in fresh processes, each with
ComfyUI and the pack imported first. The peak is Linux's VmHWM, reset (/proc/self/clear_refs)
right before the load, minus the resident memory at that moment. Rows: the loader as shipped
(weights streamed into the host-built model), at the file's dtype and converted to bf16; and, for
comparison, the usual way (safetensors `load_file`, then `load_state_dict`).

    .venv/bin/python scripts/perf_load_rss.py              # depth 4: a 1.4 GB file
"""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "host"))

MODES = {"stream": "LI-DiT Loader, weights as stored (fp32)", "stream-bf16": "LI-DiT Loader, converted to bf16",
         "load_file": "safetensors load_file + load_state_dict (for comparison)"}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(path: str, mode: str) -> None:
    """In a fresh process: print the load's peak resident memory above the resident memory before it."""
    import inproc

    inproc.load_pack()
    import torch

    model = inproc.sub("nodes.host_model")
    checkpoint = inproc.sub("lidit.checkpoint")
    load_device = torch.device("cpu")
    import gc
    gc.collect()
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    if mode == "load_file":
        from safetensors.torch import load_file

        state = load_file(path)
        patcher = model.new_lidit(checkpoint.read_config(path), torch.float32, None, load_device)
        patcher.model.diffusion_model.load_state_dict(state)
        del state
    else:
        patcher = model.build_lidit(path, torch.bfloat16 if mode == "stream-bf16" else torch.float32, None, load_device)
    print(status_kib("VmHWM") - before)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(*args.measure)

    import torch

    from lidit.checkpoint import save_checkpoint
    from lidit.config import preset
    from lidit.model import LIDiTModel

    config = preset("lidit-1b")
    config = dataclasses.replace(config, dit=dataclasses.replace(config.dit, depth=args.depth))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lidit-1b.safetensors"
        with torch.no_grad():
            model = LIDiTModel(config)
            save_checkpoint(path, model)
        del model
        size = path.stat().st_size
        print(f"LI-DiT-1B at depth {args.depth}: {size / 2**20:.0f} MiB file (fp32)")
        print("| load | peak RSS above baseline | x file size |")
        print("|---|---|---|")
        for mode, label in MODES.items():
            run = subprocess.run([sys.executable, __file__, "--measure", str(path), mode], capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(run.stderr[-3000:])
            peak = int(run.stdout.strip().splitlines()[-1]) * 1024
            print(f"| {label} | {peak / 2**20:.0f} MiB | {peak / size:.2f}x |")


if __name__ == "__main__":
    main()
