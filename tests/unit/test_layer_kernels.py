"""The shortened kernels of `lidit.layers` compute what the plain formulas compute: the CPU RMSNorm
(values and gradients, every dtype), and key masks that drop the mask when each row is either
complete or empty while still zeroing the empty rows' attention exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lidit.layers import Attention, KeyMask, gated, modulate, rms_norm


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm_equals_torchs(dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 7, 3, 16, generator=gen) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(16, generator=gen)).to(dtype)
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == dtype
    want = F.rms_norm(x.double(), (16,), w.double(), 1e-6)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


def test_rms_norm_gradients() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))


def test_modulate_and_gated_are_the_plain_formulas() -> None:
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64), torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    shift, scale, gate = (torch.randn(2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(gated(x, gate[:, None], y), x + gate[:, None] * y, rtol=1e-14, atol=1e-14)


def test_complete_and_empty_rows_attend_without_a_mask_and_empty_rows_contribute_nothing() -> None:
    torch.manual_seed(3)
    attn = Attention(16, 2, context_dim=12)
    x, context = torch.randn(3, 6, 16), torch.randn(3, 4, 12)
    mask = torch.tensor([[True] * 4, [False] * 4, [True] * 4])
    key_mask = KeyMask(mask, [4, 0, 4])
    assert key_mask.attend is None  # each row complete or empty: mask-free kernels stay eligible
    out = attn(x, ("dit", 0, "cross"), context=context, key_mask=key_mask)
    torch.testing.assert_close(out[1], attn.out.bias.expand(6, 16))  # the empty row: zero attention
    torch.testing.assert_close(out[[0, 2]], attn(x[[0, 2]], ("dit", 0, "cross"), context=context[[0, 2]]))
    partial = KeyMask(torch.tensor([[True, True, False, False], [False] * 4, [True] * 4]), [2, 0, 4])
    assert partial.attend is not None and partial.attend[1].all()  # the empty row attends everywhere, no NaN
    assert torch.isfinite(attn(x, ("dit", 0, "cross"), context=context, key_mask=partial)).all()
