"""LI-DiT-1B against ComfyUI's own PixArt in ComfyUI's sampling, as users run them, in one process.

Both MODELs come from ComfyUI's machinery (PixArt: `comfy.supported_models`; LI-DiT: the pack's
loader path) with the same random weights scale, the same width (1152), heads (16), patch (2),
latent size and DiT text length (120 tokens; LI-DiT: 60 prompt tokens per LLM branch after 40
instruction tokens, which the refiners see and the DiT does not). Each is timed through
`comfy.sample.sample` (KSampler's path) at cfg > 1, the negative being an empty prompt: ComfyUI
batches it with the prompt, so a step is one forward at batch 2. The models are timed in turn,
round after round, so drifts of a shared machine hit all of them alike; a ratio's interval is the
95% t-interval of the per-round ratios.

Rows: LI-DiT and PixArt in fp32 (ComfyUI's CPU default for PixArt) and, where the CPU multiplies
bf16 natively (AVX512-BF16 / AMX; LI-DiT's default there), both in bf16 too. On a CPU without it
bf16 is emulated, ~80x slower than fp32 on an AVX2 host: no one runs that, so those rows are left
out and the line that says so prints both matmul rates. GFLOP/s are the FLOPs torch's counter sees
in one step over the step's time, against the measured matmul peak of that dtype.

With `--profile`, instead of timing, it profiles (torch.profiler, CPU) each dtype's sampling steps
three ways: LI-DiT through the host (KSampler's path), the bare network (the same module called
directly on the inputs the host gave it, with torch's SDPA), and PixArt through the host; it prints
the ops with the most self time, in ms per step.

    .venv/bin/python scripts/perf_host.py                 # depth 4, 384 px, 5 rounds (minutes on 2 cores)
    .venv/bin/python scripts/perf_host.py --depth 28 --resolution 1024 --rounds 3   # a GPU's table
    .venv/bin/python scripts/perf_host.py --profile --depth 4 --steps 2   # where a step's time goes
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "host"))

import inproc  # noqa: E402  (ComfyUI + the pack in this process, as the tests use them)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Small random weights (uninitialised memory can hold denormals that slow CPUs down)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def lidit_model(depth: int, dtype: torch.dtype, cast: torch.dtype | None, device: torch.device):
    from lidit.config import preset

    config = preset("lidit-1b")
    config = dataclasses.replace(config, dit=dataclasses.replace(config.dit, depth=depth))
    patcher = inproc.sub("nodes.host_model").new_lidit(config, dtype, cast, device)
    randomise(patcher.model.diffusion_model)
    return patcher


def lidit_conds(patcher, instruction: int, prompt: int) -> tuple[list, list]:
    """A prompt and an empty negative, packed as Collaborative Fusion packs them."""
    text, pack = inproc.sub("lidit.states"), inproc.sub("nodes.conditioning").pack
    config = inproc.sub("nodes.host_model").lidit_config_of(patcher)
    gen = torch.Generator().manual_seed(1)

    def branch(hidden: int, n_prompt: int):
        n = instruction + n_prompt
        mask = torch.ones(1, n, dtype=torch.bool)
        is_prompt = torch.arange(n)[None] >= instruction
        return text.TextStates(torch.randn(1, n, hidden, generator=gen), mask, is_prompt)

    def cond(n_prompt: int) -> list:
        tensor, extras = pack([branch(b.hidden_size, n_prompt) for b in config.text.branches])
        return [[tensor, extras]]
    return cond(prompt), cond(0)


def pixart_model(depth: int, dtype: torch.dtype, cast: torch.dtype | None, device: torch.device):
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.PixArtSigma({"image_model": "pixart_sigma", "depth": depth, "hidden_size": 1152,
                                                 "num_heads": 16, "patch_size": 2, "in_channels": 4,
                                                 "micro_condition": False, "model_max_length": 120})
    config.set_inference_dtype(dtype, cast)
    model = config.get_model({}, device=torch.device("cpu"))
    randomise(model.diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def pixart_conds(tokens: int) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(1)
    return ([[torch.randn(1, tokens, 4096, generator=gen), {}]], [[torch.randn(1, tokens, 4096, generator=gen), {}]])


def sample_seconds(patcher, conds, latent_side: int, channels: int, steps: int, cfg: float) -> float:
    import comfy.sample

    latent = torch.zeros(1, channels, latent_side, latent_side)
    noise = comfy.sample.prepare_noise(latent, 0)
    start = time.perf_counter()
    comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", conds[0], conds[1], latent, seed=0,
                        disable_pbar=True)
    return time.perf_counter() - start


def step_flops(patcher, conds, latent_side: int, channels: int, cfg: float) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        sample_seconds(patcher, conds, latent_side, channels, 1, cfg)
    return counter.get_total_flops()


def capture_forward(patcher) -> tuple:
    """A clone of the MODEL whose DIFFUSION_MODEL wrapper keeps the network's last inputs, and those
    inputs: (x, t in [0, 1], the prepared text), as the host hands them to LIDiTModel."""
    import comfy.patcher_extension as ext

    seen: dict = {}

    def wrapper(executor, x, timesteps, context, transformer_options=None, **kwargs):
        seen["args"] = (x, timesteps, list(kwargs[inproc.sub("nodes.host_model").TEXT]))
        return executor(x, timesteps, context, transformer_options=transformer_options, **kwargs)
    clone = patcher.clone()
    clone.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, "perf_host", wrapper)
    return clone, seen


def step_profile(run, steps: int) -> dict[str, float]:
    """Self CPU milliseconds per op name, per step, over one call of `run` (`steps` steps)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}


def profile_table(args, device: torch.device, dtypes: list[torch.dtype], side: int, top: int = 14) -> None:
    """Per dtype, the ops with the most self time per step: host, bare network, PixArt."""
    lidit_model_class = inproc.sub("lidit.model").LIDiTModel
    for dtype in dtypes:
        lidit = lidit_model(args.depth, dtype, None, device)
        pixart, pixart_cond = pixart_model(args.depth, dtype, None, device), pixart_conds(120)
        captured, seen = capture_forward(lidit)
        conds = lidit_conds(lidit, 40, 60)
        sample_seconds(captured, conds, side, 16, 1, args.cfg)
        x, t, text = seen["args"]
        net = lidit.model.diffusion_model

        def bare() -> None:
            with torch.no_grad():
                for _ in range(args.steps):
                    lidit_model_class.forward(net, x, t, text)
        runs = {"host": lambda: sample_seconds(lidit, conds, side, 16, args.steps, args.cfg), "bare": bare,
                "PixArt": lambda: sample_seconds(pixart, pixart_cond, side, 4, args.steps, args.cfg)}
        for run in runs.values():  # warm-up
            run()
        ms = {name: step_profile(run, args.steps) for name, run in runs.items()}
        ops = sorted(set().union(*ms.values()), key=lambda op: -max(m.get(op, 0.0) for m in ms.values()))[:top]
        print(f"\n{str(dtype).removeprefix('torch.')}, depth {args.depth}, {args.resolution} px, batch 2, "
              f"{torch.get_num_threads()} threads: self CPU ms per step")
        print("| op | " + " | ".join(f"{name} (ms/step)" for name in ms) + " |")
        print("|---|" + "---|" * len(ms))
        for op in ops:
            print(f"| {op} | " + " | ".join(f"{m.get(op, 0.0):.1f}" for m in ms.values()) + " |")
        print("| total | " + " | ".join(f"{sum(m.values()):.1f}" for m in ms.values()) + " |")


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=384,
                        help="pixels; latents are 8x smaller (ComfyUI's PixArt fails below 384: its position table "
                             "base size rounds to 0)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--profile", action="store_true", help="profile the ops of a step instead of timing")
    args = parser.parse_args()

    pack = inproc.load_pack()  # noqa: F841  (sets up ComfyUI first)
    import comfy.model_management as mm

    from lidit.precision import native_bf16

    device = mm.get_torch_device()
    bf16 = native_bf16(device)
    side = args.resolution // 8
    if args.profile:
        profile_table(args, device, [torch.float32, *([torch.bfloat16] if bf16 else [])], side)
        return
    runs = {  # name -> (model, conds, latent channels, compute dtype)
        f"LI-DiT-1B, fp32{'' if bf16 else ' (default here)'}": (lidit_model(args.depth, torch.float32, None, device),
                                                               None, 16, torch.float32),
        "PixArt, ComfyUI default (fp32)": (pixart_model(args.depth, torch.float32, None, device), pixart_conds(120), 4,
                                           torch.float32),
    }
    if bf16:
        runs = {"LI-DiT-1B, default (bf16)": (lidit_model(args.depth, torch.bfloat16, None, device), None, 16,
                                              torch.bfloat16), **runs,
                "PixArt, bf16": (pixart_model(args.depth, torch.bfloat16, None, device), pixart_conds(120), 4,
                                 torch.bfloat16)}
    runs = {name: (m, c or lidit_conds(m, 40, 60), ch, dt) for name, (m, c, ch, dt) in runs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for model, conds, channels, _ in runs.values():  # warm-up
        sample_seconds(model, conds, side, channels, 1, args.cfg)
    for _ in range(args.rounds):
        for name, (model, conds, channels, _) in runs.items():
            seconds[name].append(sample_seconds(model, conds, side, channels, args.steps, args.cfg) / args.steps)
    peaks = {dt: matmul_peak(dt) for _, _, _, dt in runs.values()}

    print(f"depth {args.depth}, {args.resolution} px ({side}x{side} latents), cfg {args.cfg} (prompt + negative in one "
          f"batch), {args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} threads, {device}")
    if bf16:
        print(f"matmul peak: fp32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s, bf16 {peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s")
    else:
        print(f"matmul peak: fp32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s. bf16 rows left out: this CPU has no native "
              f"bf16 (a 256^3 bf16 matmul: {matmul_peak(torch.bfloat16, n=256) / 1e9:.1f} GFLOP/s)")
    print("| model | s/step (95% CI) | GFLOP/step | GFLOP/s | of matmul peak |")
    print("|---|---|---|---|---|")
    for name, (model, conds, channels, dtype) in runs.items():
        mean, half = interval(seconds[name])
        flops = step_flops(model, conds, side, channels, args.cfg)
        print(f"| {name} | {mean:.3f} ± {half:.3f} | {flops / 1e9:.1f} | {flops / mean / 1e9:.0f} | "
              f"{flops / mean / peaks[dtype]:.0%} |")
    names = list(runs)
    print(f"\n| ratio (per-round, n = {args.rounds}) | mean (95% CI) |")
    print("|---|---|")
    # out of the box, then each dtype alike; without bf16 the fp32 pair is all three
    for a, b in ((names[0], names[2]), (names[1], names[2]), (names[0], names[3])) if bf16 else ((names[0], names[1]),):
        mean, half = interval([x / y for x, y in zip(seconds[a], seconds[b])])
        print(f"| {a} / {b} | {mean:.2f}x ± {half:.2f} |")


if __name__ == "__main__":
    main()
