"""Stock TorchCompileModel (inductor) on an LI-DiT MODEL through ComfyUI's sampling (KSampler's path).

Measured here: the compile time, the graphs dynamo made, the image's largest difference from the
eager one, and the step time compiled over eager in interleaved rounds (the ratio's interval is
the 95% t-interval of the per-round ratios). Computed, for a GPU (none is measured): the bound
on what compiling can save there. Inductor's gain is fusing the elementwise work (norms,
modulation, gates, activations, casts) into the matmuls' neighbours; matmuls and attention run
the same kernels either way. So one step's time on a GPU is at least FLOPs / (peak x MFU) for
the matmuls plus the elementwise bytes / bandwidth, and compiling can at most remove the second
term: the bound is (t_matmul + t_elementwise) / t_matmul. The elementwise bytes are counted
here: every output of every non-matmul op of one forward, written once and read once.

    .venv/bin/python scripts/perf_compile.py                                  # LI-DiT-1B, depth 4, 384 px, bf16
    .venv/bin/python scripts/perf_compile.py --gpu-resolution 1024 --gpu-depth 28   # the bound's geometry
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import perf_host  # noqa: E402  (also puts ComfyUI on the import path)

inproc = perf_host.inproc
#: an H100 SXM's dense bf16 matmul peak and HBM3 bandwidth (NVIDIA's data sheet), and the matmul
#: efficiency a large bf16 DiT reaches there
H100_BF16_FLOPS, H100_BYTES_PER_S, MFU = 989e12, 3.35e12, 0.6
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention", "matmul", "linear"}


@contextlib.contextmanager
def sdpa_attention() -> Iterator[None]:
    """ComfyUI's attention as PyTorch's SDPA (its GPU default; `--use-pytorch-cross-attention`)."""
    import comfy.ldm.modules.attention as attention

    saved = attention.optimized_attention, attention.optimized_attention_masked
    attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
    try:
        yield
    finally:
        attention.optimized_attention, attention.optimized_attention_masked = saved


def elementwise_bytes(patcher, conds, side: int, channels: int, cfg: float) -> tuple[float, float]:
    """(bytes the non-matmul ops of one step write and read, FLOPs of one step)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class Bytes(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ not in MATMULS:
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and t.numel() > 1 and not t._is_view():
                        Bytes.total += 2 * t.numel() * t.element_size()  # written once, read once
            return out

    # a GPU's attention is one fused kernel (PyTorch's SDPA, flash, sage): count it as one op, not
    # as the CPU's sub-quadratic kernel, whose score chunks are elementwise tensors of their own
    with sdpa_attention(), Bytes():
        perf_host.sample_seconds(patcher, conds, side, channels, 1, cfg)
    # FLOPs with ComfyUI's CPU attention, whose matmuls the counter sees (it has no formula for the CPU's SDPA)
    counter = FlopCounterMode(display=False)
    with counter:
        perf_host.sample_seconds(patcher, conds, side, channels, 1, cfg)
    return Bytes.total, counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=384)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--gpu-resolution", type=int, default=1024)
    parser.add_argument("--gpu-depth", type=int, default=28)
    parser.add_argument("--bound-only", action="store_true", help="only the computed GPU bound")
    parser.add_argument("--attention", choices=("comfy", "sdpa"), default="comfy", help="ComfyUI's attention as "
                        "it picks it (sub-quadratic on a CPU), or PyTorch's SDPA (--use-pytorch-cross-attention)")
    args = parser.parse_args()

    inproc.load_pack()
    from torch._dynamo.utils import counters

    import comfy.model_management as mm
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    device = mm.get_torch_device()
    if not args.bound_only:
        with sdpa_attention() if args.attention == "sdpa" else contextlib.nullcontext():
            measure(args, device, TorchCompileModel, counters)
    gpu_bound(args)


def measure(args, device, TorchCompileModel, counters) -> None:
    side = args.resolution // 8
    eager = perf_host.lidit_model(args.depth, torch.bfloat16, None, device)
    conds = perf_host.lidit_conds(eager, 40, 60)
    compiled = TorchCompileModel.execute(eager, backend="inductor").result[0]

    def latent(patcher) -> torch.Tensor:
        import comfy.sample

        x = torch.zeros(1, 16, side, side)
        return comfy.sample.sample(patcher, comfy.sample.prepare_noise(x, 0), args.steps, args.cfg, "euler", "normal",
                                   conds[0], conds[1], x, seed=0, disable_pbar=True)

    start = time.perf_counter()
    out = latent(compiled)
    compile_s = time.perf_counter() - start
    reference = latent(eager)
    seconds = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for name, m in (("eager", eager), ("compiled", compiled)):
            seconds[name].append(perf_host.sample_seconds(m, conds, side, 16, args.steps, args.cfg) / args.steps)
    print(f"LI-DiT-1B depth {args.depth}, {args.resolution} px, bf16, cfg {args.cfg} (batch 2), {args.steps} steps x "
          f"{args.rounds} rounds, {torch.get_num_threads()} threads, {device}, attention: {args.attention}")
    print(f"first compiled run (compile included): {compile_s:.0f} s; dynamo graphs: "
          f"{counters['stats']['unique_graphs']}; graph breaks: {sum(counters['graph_break'].values())} "
          f"({', '.join(sorted({k.splitlines()[0][:60] for k in counters['graph_break']}))})")
    print(f"image: largest |compiled - eager| = {(out - reference).abs().max().item():.4f}, "
          f"{((out - reference).norm() / reference.norm()).item():.2%} of the image's norm "
          f"(random weights; latent range {reference.min().item():.2f}..{reference.max().item():.2f})")
    for name in seconds:
        mean, half = perf_host.interval(seconds[name])
        print(f"| {name} | {mean:.3f} ± {half:.3f} s/step |")
    mean, half = perf_host.interval([c / e for c, e in zip(seconds["compiled"], seconds["eager"])])
    print(f"| compiled / eager (per-round, n = {args.rounds}) | {mean:.3f}x ± {half:.3f} |")



def gpu_bound(args) -> None:
    torch._dynamo.reset()
    side = args.gpu_resolution // 8
    per_depth = []
    for depth in (1, 2):  # both figures are linear in depth: two depths give the deep model's
        gpu = perf_host.lidit_model(depth, torch.bfloat16, None, torch.device("cpu"))
        per_depth.append(elementwise_bytes(gpu, perf_host.lidit_conds(gpu, 40, 60), side, 16, args.cfg))
        del gpu
    (b1, f1), (b2, f2) = per_depth
    moved, flops = b2 + (b2 - b1) * (args.gpu_depth - 2), f2 + (f2 - f1) * (args.gpu_depth - 2)
    t_mm, t_elem = flops / (H100_BF16_FLOPS * MFU), moved / H100_BYTES_PER_S
    print(f"\nGPU bound (computed, not measured): LI-DiT-1B depth {args.gpu_depth} at {args.gpu_resolution} px, batch 2: "
          f"{flops / 1e12:.2f} TFLOP and {moved / 1e9:.2f} GB of elementwise traffic per step; on an H100 "
          f"({H100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 at {MFU:.0%} MFU, {H100_BYTES_PER_S / 1e12:.2f} TB/s) "
          f"{1e3 * t_mm:.1f} ms of matmuls + {1e3 * t_elem:.1f} ms elementwise: compiling saves at most "
          f"{t_elem / (t_mm + t_elem):.0%} of a step (eager / fully fused <= {(t_mm + t_elem) / t_mm:.2f}x)")


if __name__ == "__main__":
    main()
