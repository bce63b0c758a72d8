"""The adapter that makes an LI-DiT checkpoint a standard ComfyUI MODEL.

The MODEL behaves like any core model (KSampler, ModelSamplingSD3, CFGGuider, img2img all
work): the config picks the sampling type (eps, v or flow with a shift) and the latent format.
Once per sampling run, `extra_conds` prepares each prompt's text (everything in the text pathway
that does not depend on t); at every step the network runs the refiners, the collaborative
refiner and the DiT, with ComfyUI's attention. Weights are built from the host's ops, so fp16,
fp8 storage, partial (lowvram) loading and LoRA patches work as for core models.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.supported_models_base
from comfy.cli_args import args

from ..lidit.checkpoint import STOCK_CONFIG_KEY, CheckpointError, CheckpointFile, load_into
from ..lidit.config import LIDiTConfig
from ..lidit.dit import DiTBlock
from ..lidit.layers import rms_norm
from ..lidit.model import LIDiTModel
from ..lidit.precision import DTYPES, cpu_has_native_bf16
from . import conditioning
from .attention import CHUNK_SCORES, host_attend
from .conditioning import FINGERPRINT, LAYOUT, MASK, PROMPT
from .memory import release_free_memory

LATENT_FORMATS = {"pixel": comfy.latent_formats.ChromaRadiance, "sd3": comfy.latent_formats.SD3,
                  "flux": comfy.latent_formats.Flux, "sd15": comfy.latent_formats.SD15, "sdxl": comfy.latent_formats.SDXL}
#: image pixels per latent pixel, per latent format
DOWNSCALE = {"pixel": 1, "sd3": 8, "flux": 8, "sd15": 8, "sdxl": 8}
#: ComfyUI's sampling settings of lidit's DDPM schedules (comfy.model_sampling: "linear" is scaled-linear)
DDPM_SETTINGS = {"scaled_linear": {}, "linear": {"beta_schedule": "sqrt_linear", "linear_start": 1e-4, "linear_end": 0.02}}
MODEL_TYPES = {"flow": comfy.model_base.ModelType.FLOW, "eps": comfy.model_base.ModelType.EPS,
               "v": comfy.model_base.ModelType.V_PREDICTION}
#: the loader's weight_dtype options (as UNETLoader's, plus the plain float types); *_fast: fp8 matmuls where the GPU has them
WEIGHT_DTYPES = {**{name: DTYPES[name] for name in ("fp32", "bf16", "fp16")}, "fp8_e4m3fn": torch.float8_e4m3fn,
                 "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
TEXT = "lidit_text"  # the model kwarg that carries the prepared text (conditioning.CONDText)
#: measured peak of a forward's activations besides attention scores, in values of `hidden` per image token
#: (CPU, inference: 9 for the demo, 2-10 for LI-DiT-1B at 1k-4k tokens; one block's tensors are alive at a time)
VALUES_PER_TOKEN = 12


_reported_blocks: set = set()


class HostAttend:
    """ComfyUI's attention for one forward (`host_attend`), carrying that forward's
    transformer_options to the DiT blocks, which honour ComfyUI's block patches."""

    def __init__(self, transformer_options: dict, depth: int) -> None:
        self.options = transformer_options
        self.blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        self.depth = depth
        self.call = host_attend(transformer_options, depth)
        unused = sorted(str(key) for key in self.blocks_replace if key[0] != "double_block" or key[1] >= depth)
        if unused and tuple(unused) not in _reported_blocks:
            _reported_blocks.add(tuple(unused))
            logging.warning("LI-DiT: ignoring block patches it has no block for: %s. LI-DiT's %d DiT blocks are "
                            "('double_block', 0..%d); it has no single-stream blocks (SkipLayerGuidanceDiT: use "
                            "double_layers).", ", ".join(unused), depth, depth - 1)

    def __call__(self, q, k, v, mask, site):
        return self.call(q, k, v, mask, site)


class HostDiTBlock(DiTBlock):
    """A DiT block that honours ComfyUI's `patches_replace["dit"][("double_block", i)]` the way
    core cross-attention DiTs (Wan) do: the patch gets {"img", "txt", "vec", "pe",
    "transformer_options"} and {"original_block"}, and returns {"img", ...}. SkipLayerGuidanceDiT's
    `double_layers` land here. `block_index`, `total_blocks` and `block_type` are set in
    transformer_options for patches that read them, as in Flux. The weights are DiTBlock's own."""

    def forward(self, x, c, text, index, attend, *args, **kwargs):
        if not isinstance(attend, HostAttend):
            return super().forward(x, c, text, index, attend, *args, **kwargs)
        options = attend.options
        options["block_index"], options["total_blocks"], options["block_type"] = index, attend.depth, "double"
        patch = attend.blocks_replace.get(("double_block", index))
        if patch is None:
            return super().forward(x, c, text, index, attend, *args, **kwargs)

        def original_block(a: dict) -> dict:
            return {"img": DiTBlock.forward(self, a["img"], a["vec"], text, index, attend, *args, **kwargs),
                    "txt": a["txt"]}
        out = patch({"img": x, "txt": text.tokens, "vec": c, "pe": None, "transformer_options": options},
                    {"original_block": original_block})
        return out["img"]


@functools.cache
def host_ops(operations: type) -> type:
    """ComfyUI's ops for the model's dtypes, with RMSNorm (LI-DiT's QK-norm, four per DiT block)
    computed by `lidit.layers.rms_norm` wherever ComfyUI has no weight to cast or patch: torch's
    own CPU rms_norm, which ComfyUI's op calls, is a composite of five full passes over q and k."""
    class RMSNorm(operations.RMSNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.comfy_cast_weights or self.weight_function or self.bias_function:
                return super().forward(x)
            return rms_norm(x, self.weight, self.eps)
    return type(f"LIDiT{operations.__name__}", (operations,), {"RMSNorm": RMSNorm})


class LIDiTHostNet(LIDiTModel):
    """lidit's model with the `diffusion_model(x, timesteps, context, **conds)` call ComfyUI makes.

    A subclass rather than a wrapper, so its weight names are the checkpoint's own (`text.*`,
    `dit.*`) for ComfyUI's patching too. Its forward runs ComfyUI's DIFFUSION_MODEL wrappers
    (EasyCache, and any extension that wraps a core model's forward) as core models do.
    """

    def __init__(self, lidit_config: LIDiTConfig, dtype=None, device=None, operations=None) -> None:
        super().__init__(lidit_config, ops=host_ops(operations), dtype=dtype, device=device)
        self.dtype = dtype
        for block in self.dit.blocks:
            block.__class__ = HostDiTBlock

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None, transformer_options: dict | None = None,
                **kwargs) -> torch.Tensor:
        transformer_options = {} if transformer_options is None else transformer_options
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._forward, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options)
        ).execute(x, timesteps, context, transformer_options=transformer_options, **kwargs)

    def _forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None, transformer_options: dict | None = None,
                 **kwargs) -> torch.Tensor:
        branches = [b.map(lambda t: t.to(x.device, x.dtype if t.is_floating_point() else None)) for b in kwargs[TEXT]]
        return super().forward(x, timesteps, branches, HostAttend(transformer_options or {}, self.config.dit.depth))


class LIDiTHostModel(comfy.model_base.BaseModel):
    def __init__(self, model_config: LIDiTSupportedModel, model_type, device=None) -> None:
        super().__init__(model_config, model_type, device=device, unet_model=LIDiTHostNet)

    @property
    def lidit_config(self) -> LIDiTConfig:
        return self.model_config.lidit_config

    def extra_conds(self, **kwargs):
        """Once per prompt and sampling run: the text pathway's timestep-free work, from the raw
        float32 states, in the compute dtype. Its outputs fit float16; the raw states would not."""
        if LAYOUT not in kwargs:
            raise ValueError("LI-DiT needs its conditioning from an LI-DiT Collaborative Fusion node; this one "
                             "came from elsewhere (e.g. CLIPTextEncode)")
        self.check_size(kwargs["noise"].shape, kwargs["device"])
        texts = conditioning.unpack(kwargs["cross_attn"], kwargs[MASK], kwargs[PROMPT], kwargs[LAYOUT],
                                    kwargs.get(FINGERPRINT))
        dtype = self.manual_cast_dtype or self.get_dtype()
        with torch.no_grad():
            prepared = self.diffusion_model.text.prepare([t.to(kwargs["device"]) for t in texts], dtype)
        return {TEXT: conditioning.CONDText(tuple(prepared))}

    def memory_required(self, input_shape, cond_shapes=None) -> float:
        """Bytes one forward on `input_shape` needs, as measured for LI-DiT: the activations, plus
        one attention call's scores (twice: scores and softmax) unless the host's kernel is
        memory-efficient. ComfyUI's default, linear in latent pixels with a fixed factor, is far off
        for a patch-8 pixel model (10 TB for the demo at 4096 px) and for 1/8 latents alike."""
        dit = self.lidit_config.dit
        batch, height, width = input_shape[0], input_shape[-2], input_shape[-1]
        tokens = -(-height // dit.patch) * -(-width // dit.patch)
        size = mm.dtype_size(self.manual_cast_dtype or self.get_dtype())
        scores = 0 if mm.xformers_enabled() or mm.pytorch_attention_flash_attention() else \
            2 * min(batch * dit.heads * tokens * tokens, CHUNK_SCORES) * size
        return batch * tokens * dit.hidden * size * VALUES_PER_TOKEN + scores

    def check_size(self, shape: tuple[int, ...], device: torch.device) -> None:
        """Refuse, before sampling, a latent shape whose activations cannot fit the device at all."""
        have = mm.get_total_memory(device)
        if self.memory_required(shape) <= have:
            return
        factor, patch = DOWNSCALE[self.lidit_config.latent_format], self.lidit_config.dit.patch
        low, high = 0, 1 << 16  # square sides in patches: `low` fits, `high` does not
        while high - low > 1:
            mid = (low + high) // 2
            if self.memory_required([shape[0], 1, mid * patch, mid * patch]) <= have:
                low = mid
            else:
                high = mid
        raise ValueError(
            f"LI-DiT: {shape[-1] * factor}x{shape[-2] * factor} at batch {shape[0]} needs about "
            f"{self.memory_required(shape) / 2**30:.1f} GiB for one forward, more than the "
            f"{have / 2**30:.1f} GiB of {device}. The largest square size that fits is about "
            f"{low * patch * factor}x{low * patch * factor}: sample smaller, then upscale.")

    def process_timestep(self, timestep: torch.Tensor, **kwargs) -> torch.Tensor:
        """ComfyUI passes its model_sampling's timestep (possibly patched, e.g. by ModelSamplingSD3);
        lidit wants t in [0, 1]: the flow time (= sigma), or the DDPM index / 1000."""
        sampling = self.model_sampling
        if isinstance(sampling, comfy.model_sampling.CONST):  # flow: timestep = sigma * multiplier (Flux: sigma)
            return timestep / getattr(sampling, "multiplier", 1.0)
        return timestep / sampling.num_timesteps


class LIDiTSupportedModel(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}  # BASE would otherwise inject num_heads and friends into the network's kwargs
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def __init__(self, lidit_config: LIDiTConfig) -> None:
        self.lidit_config = lidit_config
        self.latent_format = LATENT_FORMATS[lidit_config.latent_format]
        flow = lidit_config.prediction == "flow"
        self.sampling_settings = {"shift": lidit_config.shift, "multiplier": 1000} if flow else \
            DDPM_SETTINGS[lidit_config.schedule]
        super().__init__({"lidit_config": lidit_config})

    def get_model(self, state_dict=None, prefix="", device=None) -> LIDiTHostModel:
        return LIDiTHostModel(self, MODEL_TYPES[self.lidit_config.prediction], device=device)

    def process_unet_state_dict_for_saving(self, state_dict: dict) -> dict:
        """For ComfyUI's ModelSave (a LoRA baked in, a merge): the weights under ComfyUI's prefix, and
        the config, which ComfyUI's save has no metadata for, as a uint8 tensor of its JSON; the
        LI-DiT Loader reads both (`lidit.checkpoint.stock_saved`)."""
        out = super().process_unet_state_dict_for_saving(state_dict)
        out[STOCK_CONFIG_KEY] = torch.frombuffer(bytearray(self.lidit_config.to_json().encode()), dtype=torch.uint8)
        return out


def lidit_config_of(model: comfy.model_patcher.ModelPatcher) -> LIDiTConfig:
    config = getattr(getattr(model, "model", None), "lidit_config", None)
    if config is None:
        raise ValueError(f"this MODEL is not an LI-DiT model ({type(getattr(model, 'model', model)).__name__}): "
                         "load it with the LI-DiT Loader")
    return config


def inference_dtypes(option: str, stored: torch.dtype, params: int,
                     device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, manual-cast compute dtype or None), picked as ComfyUI picks them for core models,
    except on CPUs that multiply bf16 natively: there `default` stores and computes in bf16, and no
    choice computes in fp16 (400x slower than bf16 there). ComfyUI itself computes in fp32 on every CPU."""
    supported = LIDiTSupportedModel.supported_inference_dtypes
    native_bf16 = mm.is_device_cpu(device) and cpu_has_native_bf16()
    if option == "default":
        weight = mm.unet_dtype(device, params, supported, stored)
        if native_bf16 and weight == torch.float32 and not args.fp32_unet:
            weight = torch.bfloat16
    else:
        weight = WEIGHT_DTYPES[option]
    if native_bf16 and weight != torch.float32:
        return weight, None if weight == torch.bfloat16 else torch.bfloat16
    return weight, mm.unet_manual_cast(weight, device, supported)


def new_lidit(config: LIDiTConfig, dtype: torch.dtype, manual_cast: torch.dtype | None, load_device: torch.device,
              fp8_optimizations: bool = False) -> comfy.model_patcher.ModelPatcher:
    """An LI-DiT MODEL with unfilled weights stored in `dtype`, computing in `manual_cast` (None: in
    `dtype`), built from the ops ComfyUI picks for that pair (`comfy.ops.pick_operations`)."""
    model_config = LIDiTSupportedModel(config)
    model_config.set_inference_dtype(dtype, manual_cast)
    model_config.optimizations["fp8"] = fp8_optimizations
    offload_device = mm.unet_offload_device()
    model = model_config.get_model(device=offload_device)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def build_lidit(path: str, dtype: torch.dtype, manual_cast: torch.dtype | None, load_device: torch.device,
                fp8_optimizations: bool = False, file: CheckpointFile | None = None) -> comfy.model_patcher.ModelPatcher:
    """The MODEL the checkpoint's own config describes, filled from it. Nothing is unpickled, and
    nothing is allocated before the file is known to fill the model."""
    file = file or CheckpointFile.open(path)
    config, name = file.config, os.path.basename(path)
    channels = LATENT_FORMATS[config.latent_format].latent_channels
    if config.dit.in_channels != channels:
        raise CheckpointError(f"{name}: its config says latent_format {config.latent_format!r} ({channels} channels) "
                              f"but dit.in_channels = {config.dit.in_channels}")
    patcher = new_lidit(config, dtype, manual_cast, load_device, fp8_optimizations)
    load_into(file, patcher.model.diffusion_model)
    logging.info("LI-DiT: loaded %s (%s, %s latents, weights %s, compute %s, %d LLM branches: %s)", name,
                 config.prediction, config.latent_format, dtype, manual_cast or dtype, len(config.text.branches),
                 ", ".join(f"{b.name} ({b.hidden_size})" for b in config.text.branches))
    return patcher


def load_lidit(path: str, weight_dtype: str = "default") -> comfy.model_patcher.ModelPatcher:
    if not path.endswith((".safetensors", ".sft")):
        raise CheckpointError(f"{os.path.basename(path)}: LI-DiT checkpoints are .safetensors files")
    file = CheckpointFile.open(path)
    release_free_memory()
    load_device = mm.get_torch_device()
    dtype, manual_cast = inference_dtypes(weight_dtype, *file.stored_dtype(), load_device)
    return build_lidit(path, dtype, manual_cast, load_device, weight_dtype.endswith("_fast"), file)
