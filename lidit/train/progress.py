"""Progress on a terminal (tqdm) or in plain lines, with an ETA within the wall-clock budget."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, mode: str, total: int, initial: int, every: int, enabled: bool,
                 deadline: float | None = None) -> None:
        self.bar, self.every, self.enabled, self.total, self.deadline = None, max(1, every), enabled, total, deadline
        if mode == "auto":
            mode = "tqdm" if sys.stderr.isatty() else "plain"
        self.mode = mode if enabled else "none"
        if self.mode == "tqdm":
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train", mininterval=1.0)
            except ImportError:
                self.mode = "plain"
        self.t0, self.s0 = time.perf_counter(), initial

    def update(self, step: int, loss: float | None, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        elif self.mode == "plain" and loss is not None:
            rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - step) / max(rate, 1e-9)
            if self.deadline is not None:  # the wall-clock budget ends the run first
                eta = max(0.0, min(eta, self.deadline - time.time()))
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {rate:.2f} it/s  "
                  f"eta {int(eta // 60)}:{int(eta % 60):02d}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
