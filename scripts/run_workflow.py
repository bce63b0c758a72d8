"""Run an API-format workflow on a real, headless ComfyUI with this pack linked, and keep its images.

    .venv/bin/python scripts/run_workflow.py workflows/api/lidit_paper_pipeline.json --out out
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "host"))

from harness import ComfyServer  # noqa: E402  (the same driver the host tests use)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workflow", type=Path, help="API-format workflow JSON")
    parser.add_argument("--out", type=Path, default=REPO / "out")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    prompt = json.loads(args.workflow.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work, ComfyServer(Path(work), pack_dir=REPO) as server:
        print(f"ComfyUI on {server.url}; queueing {args.workflow.name}", flush=True)
        _, entry = server.run(prompt, timeout=args.timeout)
        for image in server.output_images(entry):
            target = args.out / image.name
            shutil.copy(image, target)
            print(f"wrote {target}")


if __name__ == "__main__":
    main()
