"""LI-DiT Instructed Encode (CLIP) on a CLIP loaded from a GGUF file the way the community loader
CLIPLoaderGGUF (ComfyUI-GGUF) loads one: the tiny Qwen3 text encoder quantised to Q8_0 with the
`gguf` package, read back with gguf's reader, its matrices kept quantised in the module and
dequantised per layer at each call by custom operations handed to ComfyUI's own
`load_text_encoder_state_dicts`. The states match the unquantised file's within Q8_0's error."""
from __future__ import annotations

import numpy as np
import pytest
import test_clip_text_node as clip_node
import torch

from tests.fixtures_models import TINY_QWEN3

tiny_te = clip_node.tiny_te  # the tiny Qwen3 CLIP from the stock CLIPLoader (a module fixture)


def write_gguf(src, dst) -> None:
    """Every matrix as Q8_0 (as GGUF text encoders ship), vectors as F32, ComfyUI's key names kept."""
    import gguf
    from safetensors.torch import load_file

    writer = gguf.GGUFWriter(str(dst), "qwen3")
    for name, t in load_file(src).items():
        data = t.float().numpy()
        if data.ndim == 2 and data.shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class Quantised(torch.Tensor):
    """A GGUF tensor as ComfyUI-GGUF's GGMLTensor keeps it: the raw blocks (uint8) as the data, their
    type, and the logical shape as `shape`, which is what ComfyUI's loader inspects."""

    @staticmethod
    def __new__(cls, raw: np.ndarray, qtype, shape):
        t = torch.Tensor._make_subclass(cls, torch.from_numpy(np.array(raw)), False)
        t.qtype, t.logical_shape = qtype, torch.Size(shape)
        return t

    @property
    def shape(self):
        return getattr(self, "logical_shape", None) or torch.Tensor.shape.__get__(self)

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]


def dequantize(raw: torch.Tensor, qtype, shape, dtype: torch.dtype) -> torch.Tensor:
    import gguf

    data = torch.Tensor.as_subclass(raw, torch.Tensor).detach().numpy()
    return torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(shape).to(dtype)


def gguf_ops():
    """comfy.ops.manual_cast with Linear and Embedding that take a Quantised weight at load and
    dequantise it per call, as ComfyUI-GGUF's GGMLOps do."""
    import comfy.ops

    class Mixin:
        dequantised = 0

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs):
            w = state_dict.get(prefix + "weight")
            if isinstance(w, Quantised):  # kept quantised, as a parameter (a device, a shape), like GGMLTensor
                self.gguf = (w.qtype, w.logical_shape)
                self.weight = torch.nn.Parameter(w, requires_grad=False)
                return
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)

        def weight_for(self, dtype):
            if getattr(self, "gguf", None) is None:
                return None
            Mixin.dequantised += 1
            return dequantize(self.weight, *self.gguf, dtype)

    class Ops(comfy.ops.manual_cast):
        class Linear(Mixin, comfy.ops.manual_cast.Linear):
            def forward(self, x):
                w = self.weight_for(x.dtype)
                return super().forward(x) if w is None else torch.nn.functional.linear(x, w, None)

        class Embedding(Mixin, comfy.ops.manual_cast.Embedding):
            def forward(self, ids, out_dtype=None):
                w = self.weight_for(out_dtype or torch.float32)
                return super().forward(ids, out_dtype=out_dtype) if w is None else torch.nn.functional.embedding(ids, w)
    return Ops, Mixin


def load_gguf_clip(path):
    """What CLIPLoaderGGUF does: gguf's reader, a state dict of quantised tensors, ComfyUI's loader."""
    import gguf

    import comfy.sd

    reader = gguf.GGUFReader(str(path))
    state = {}
    for t in reader.tensors:
        shape = tuple(int(v) for v in reversed(t.shape))
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            state[t.name] = torch.from_numpy(np.array(t.data)).reshape(shape)
        else:
            state[t.name] = Quantised(t.data, t.tensor_type, shape)
    ops, mixin = gguf_ops()
    clip = comfy.sd.load_text_encoder_state_dicts([state], clip_type=comfy.sd.CLIPType.LUMINA2,
                                                  model_options={"custom_operations": ops})
    return clip, mixin


def test_a_gguf_clip_encodes_like_the_unquantised_one(tiny_te, tmp_path) -> None:
    pytest.importorskip("gguf")
    path = tmp_path / "tiny_qwen3-Q8_0.gguf"
    write_gguf(tiny_te["root"] / "text_encoders" / "tiny_qwen3.safetensors", path)
    clip, mixin = load_gguf_clip(path)
    module = clip.cond_stage_model.qwen3_4b.transformer
    linears = [m for m in module.modules() if isinstance(m, mixin) and getattr(m, "gguf", None) is not None]
    assert len(linears) > 10 and all(m.weight.dtype == torch.uint8 for m in linears)  # not dequantised at load
    mixin.dequantised = 0
    got = clip_node.encode(clip, clip_node.PROMPT).states
    want = clip_node.encode(tiny_te["clip"], clip_node.PROMPT).states
    # per layer, at the call: the embedding, then 7 matrices in each layer up to hidden_layer -3 (the rest is skipped)
    assert mixin.dequantised == 1 + 7 * (TINY_QWEN3["layers"] + 1 - 3)
    assert torch.equal(got.mask, want.mask) and torch.equal(got.prompt, want.prompt)
    real = want.mask[..., None]
    error = ((got.hidden - want.hidden) * real).norm() / (want.hidden * real).norm()
    assert 0 < error < 0.02, error
