import dataclasses

import pytest
import torch

from lidit.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from lidit.config import LIDiTConfig, LLMBranch, preset, with_branches
from lidit.data.features import FeatureTable
from lidit.instruction import PromptTemplate
from lidit.llm import encode
from lidit.model import LIDiTModel, parameter_counts
from lidit.refiner import FeatureNorm, LinguisticTokenRefiner
from lidit.states import PreparedBranch, TextStates

PLAIN = PromptTemplate(chat_template=False)


def tiny(**text_overrides) -> LIDiTConfig:
    cfg = preset("tiny")
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **text_overrides))


def randomise_gates(module: torch.nn.Module) -> None:
    torch.manual_seed(1)
    for name, m in module.named_modules():
        if name.endswith((".gates", ".adaln")) or name.endswith("final.linear"):
            torch.nn.init.normal_(m.weight, std=0.3)
            torch.nn.init.normal_(m.bias, std=0.3)


def encode_all(llms, prompts, template=PLAIN):
    return [encode(llm, prompts, template, max_tokens=32) for llm in llms]


def context_of(model: LIDiTModel, texts: list[TextStates], t: torch.Tensor):
    return model.text(model.text.prepare(texts, torch.float32), t)


def test_refiner_with_zero_gates_returns_its_input_exactly(tiny_llms):
    torch.manual_seed(0)
    model = LIDiTModel(tiny()).init_weights()
    text = encode_all(tiny_llms, ["a red circle and a blue square"])[0]
    refiner: LinguisticTokenRefiner = model.text.refiners[0]
    (branch,) = PreparedBranch.join([refiner.prepare(text, torch.float32)])
    refined, _ = refiner(branch, model.text.t_embedder(torch.tensor([0.5]), torch.float32))
    assert torch.equal(branch.tokens, refiner.input_proj(refiner.feature_norm(text.hidden)))
    assert torch.equal(refined, branch.tokens)


def test_zero_init_finds_every_gate_and_modulation_by_attribute(tiny_llms):
    """The zero-initialised layers are listed by attribute: renaming one breaks `init_weights` here,
    instead of leaving a gate at random (which no shape check would notice)."""
    cfg = tiny()
    model = LIDiTModel(cfg).init_weights()
    layers = model.zero_initialised()
    branches = len(cfg.text.branches)
    assert len(layers) == branches * (cfg.text.refiner_depth + cfg.text.collab_depth) + cfg.dit.depth + 2
    zeroed = {id(p) for m in layers for p in ([m] if isinstance(m, torch.nn.Parameter) else m.parameters())}
    matrices = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    assert {n for n, p in matrices.items() if not p.any()} == {n for n, p in matrices.items() if id(p) in zeroed}
    texts = encode_all(tiny_llms, ["a red circle"])
    assert not model(torch.randn(1, 3, 16, 16), torch.tensor([0.5]), texts).any()  # adaLN-Zero: the output starts at 0


def test_feature_norm_tames_massive_activations():
    """A channel 10,000x the others (as in Gemma-3) must not drown the rest after the norm."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    x[:, 3] = 25_000 + 50 * torch.randn(64, generator=g)
    norm = FeatureNorm(16)
    raw = norm(x)
    assert raw[:, 3].abs().min() > 0.99  # identity stats: the massive channel is the whole token
    table = FeatureTable(prefix=torch.zeros(0, 16), entries={"a": (x[:32], 32), "b": (x[32:], 32)})
    norm.set_stats(*table.channel_stats())
    out = norm(x)
    assert out[:, 3].abs().max() < 4.0
    assert torch.allclose(out.pow(2).mean(-1), torch.ones(64), atol=1e-4)
    torch.testing.assert_close(out.float().std(0).mean(), torch.tensor(1.0), atol=0.1, rtol=0)


def test_channel_stats_fill_every_branch_feature_norm(tiny_llms):
    """The norm's buffers hold each LLM's channel statistics, and are saved with the weights."""
    prompts = ["a red circle", "a blue square and a green triangle", "a white circle"]
    texts = encode_all(tiny_llms, prompts)
    tables = [FeatureTable(prefix=torch.zeros(0, t.hidden_size),
                           entries={p: (t.hidden[i][t.mask[i]], int(t.prompt[i].sum())) for i, p in enumerate(prompts)})
              for t in texts]
    model = LIDiTModel(tiny()).init_weights()
    model.text.set_feature_stats([table.channel_stats() for table in tables])
    for refiner, t in zip(model.text.refiners, texts):
        real = t.hidden[t.mask]
        torch.testing.assert_close(refiner.feature_norm.mean, real.mean(0), atol=1e-4, rtol=1e-4)
        assert "feature_norm.std" in dict(refiner.named_buffers())
    assert any(k.endswith("feature_norm.mean") for k in model.state_dict())  # saved with the weights


def test_refiner_is_bidirectional_once_gates_open(tiny_llms):
    torch.manual_seed(0)
    model = LIDiTModel(tiny()).init_weights()
    randomise_gates(model)
    a, b = (encode_all(tiny_llms[:1], [p])[0] for p in ("a red circle and a blue square",
                                                       "a red circle and a blue triangle"))
    first = a.prompt[0].nonzero()[0, 0]
    torch.testing.assert_close(a.hidden[0, first], b.hidden[0, first])  # the causal LLM cannot see the change
    t_emb = model.text.t_embedder(torch.tensor([0.5]), torch.float32)
    refiner = model.text.refiners[0]
    (ra, _), (rb, _) = (refiner(PreparedBranch.join([refiner.prepare(s, torch.float32)])[0], t_emb) for s in (a, b))
    assert (ra[0, first] - rb[0, first]).abs().max() > 1e-4  # the refiner can


@pytest.mark.parametrize("drop", ["after_collab", "after_llm"])
def test_padding_invariance_and_instruction_drop(tiny_llms, drop):
    torch.manual_seed(0)
    model = LIDiTModel(tiny(drop_instruction=drop)).init_weights()
    randomise_gates(model)
    template = PromptTemplate()  # the paper's instruction, chat template where the tokenizer has one
    short, long_ = "a red circle", "a white circle, an orange square, a red triangle and a blue circle"
    alone = encode_all(tiny_llms, [short], template)
    batched = encode_all(tiny_llms, [short, long_], template)
    t = torch.tensor([0.3, 0.3])
    alone_ctx = context_of(model, alone, t[:1])
    batch_ctx = context_of(model, batched, t)
    n_prompt = sum(int(s.prompt[0].sum()) for s in alone)
    assert int(alone_ctx.mask[0].sum()) == alone_ctx.tokens.shape[1] == n_prompt  # only the prompt's own tokens survive
    assert alone_ctx.key_mask.attend is None  # no padding: no mask, so hosts may pick flash kernels
    assert int(batch_ctx.mask[0].sum()) == n_prompt and batch_ctx.key_mask.attend is not None
    torch.testing.assert_close(batch_ctx.tokens[0, :n_prompt], alone_ctx.tokens[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch_ctx.pooled[0], alone_ctx.pooled[0], atol=1e-5, rtol=1e-5)
    x = torch.randn(1, 3, 8, 8)
    out_alone = model(x, t[:1], alone)
    x2 = torch.cat([x, torch.randn_like(x)])
    out_batch = model(x2, t, batched)
    torch.testing.assert_close(out_batch[:1], out_alone, atol=1e-5, rtol=1e-5)
    # prepared once per prompt and batched afterwards (as a sampler batches cond + uncond): the same
    prepared = [PreparedBranch.cat([model.text.prepare(alone, torch.float32)[k],
                                    model.text.prepare(encode_all(tiny_llms, [long_], template), torch.float32)[k]])
                for k in range(len(alone))]
    torch.testing.assert_close(model(x2, t, prepared), out_batch, atol=1e-5, rtol=1e-5)


def test_a_step_on_prepared_text_never_reads_the_device(tiny_llms, monkeypatch):
    """Token counts are Python ints from `prepare`: a sampling step has no host sync (.item(),
    .tolist(), int(), bool() of a tensor), which would stall a GPU at every step."""
    torch.manual_seed(0)
    model = LIDiTModel(tiny()).init_weights()
    randomise_gates(model)
    prompts = ["a red circle", "a white circle, an orange square, a red triangle and a blue circle"]
    prepared = model.text.prepare(encode_all(tiny_llms, prompts, PromptTemplate()), torch.float32)

    def sync(*args, **kwargs):
        raise AssertionError("a device sync in the sampling step")
    for name in ("item", "tolist", "__int__", "__bool__", "__index__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([0.5, 0.5]), prepared)
    monkeypatch.undo()
    assert torch.isfinite(out).all()


def test_an_all_zero_branch_carries_no_text(tiny_llms):
    """ConditioningZeroOut zeroes a conditioning; LI-DiT reads zero tokens as no tokens at all."""
    torch.manual_seed(0)
    model = LIDiTModel(tiny()).init_weights()
    randomise_gates(model)
    texts = encode_all(tiny_llms, ["a red circle"])
    zeroed = [TextStates(torch.zeros_like(t.hidden), t.mask, t.prompt) for t in texts]
    nothing = [TextStates(t.hidden[:, :0], t.mask[:, :0], t.prompt[:, :0]) for t in texts]
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([0.4])
    torch.testing.assert_close(model(x, t, zeroed), model(x, t, nothing))
    assert (model(x, t, zeroed) - model(x, t, texts)).abs().max() > 1e-4


def test_collaborative_refiner_mixes_branches_and_handles_one_branch(tiny_llms):
    torch.manual_seed(0)
    two = LIDiTModel(tiny()).init_weights()
    randomise_gates(two)
    base = encode_all(tiny_llms, ["a red circle"])
    other = encode_all(tiny_llms, ["a blue square"])
    t = torch.tensor([0.5])
    ctx_a = context_of(two, base, t).tokens
    ctx_b = context_of(two, [base[0], other[1]], t).tokens  # only branch 2's prompt changes
    n0 = int(base[0].prompt.sum())
    assert (ctx_a[0, :n0] - ctx_b[0, :n0]).abs().max() > 1e-4  # branch 1's tokens read branch 2
    one = LIDiTModel(with_branches(tiny(), [LLMBranch("tiny-llama", 64)])).init_weights()
    randomise_gates(one)
    ctx = context_of(one, base[:1], t).tokens
    assert ctx.shape == (1, n0, 32) and torch.isfinite(ctx).all()
    with pytest.raises(ValueError, match="has 1 LLM branches, got 2"):
        context_of(one, base, t)


def test_empty_prompt_gives_finite_output(tiny_llms):
    model = LIDiTModel(tiny()).init_weights()
    randomise_gates(model)
    texts = encode_all(tiny_llms, [""])
    out = model(torch.randn(1, 3, 8, 8), torch.tensor([0.7]), texts)
    assert torch.isfinite(out).all()


def test_a_batch_of_empty_prompts_reaches_every_weight(tiny_llms):
    """Caption dropout can empty a whole micro-batch: every weight must stay in the graph, or DDP's
    reducer waits for gradients one rank never makes (a collective mismatch under torchrun)."""
    model = LIDiTModel(tiny(instruction="Draw:")).init_weights()
    model(torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.7]), encode_all(tiny_llms, ["", ""])).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("size", [(16, 16), (8, 24), (12, 10)])
def test_dit_output_shape_follows_any_size(size):
    model = LIDiTModel(preset("tiny")).init_weights()
    randomise_gates(model)
    texts = [TextStates(torch.randn(2, 5, b.hidden_size), torch.ones(2, 5, dtype=torch.bool),
                        torch.ones(2, 5, dtype=torch.bool)) for b in preset("tiny").text.branches]
    assert model(torch.randn(2, 3, *size), torch.rand(2), texts).shape == (2, 3, *size)


def test_checkpoint_round_trip_is_bitwise(tmp_path):
    torch.manual_seed(0)
    model = LIDiTModel(preset("tiny")).init_weights()
    randomise_gates(model)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, {"note": "test"})
    loaded = load_checkpoint(path)
    assert read_config(path) == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle


def test_checkpoint_with_a_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    from safetensors.torch import load_file, save_file
    model = LIDiTModel(preset("tiny")).init_weights()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model)
    state = load_file(path)
    state["dit.final.linear.weight"] = torch.zeros(5, 32)
    save_file(state, path, metadata={"lidit_config": model.config.to_json()})
    with pytest.raises(CheckpointError, match=r"'dit.final.linear.weight' has shape \(5, 32\), the model expects \(12, 32\)"):
        load_checkpoint(path)
    del state["dit.final.linear.weight"]
    save_file(state, path, metadata={"lidit_config": model.config.to_json()})
    with pytest.raises(CheckpointError, match="lacks the weight 'dit.final.linear.weight'"):
        load_checkpoint(path)


def test_config_json_round_trip_and_validation():
    for name in ("tiny", "demo", "lidit-1b", "lidit-10b"):
        cfg = preset(name)
        assert LIDiTConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="x_param is only defined"):
        dataclasses.replace(preset("lidit-1b"), x_param=True)


def test_preset_parameter_counts():
    assert abs(parameter_counts(preset("lidit-1b"))["total"] - 1.0e9) <= 0.15e9
    assert abs(parameter_counts(preset("lidit-10b"))["total"] - 1.0e10) <= 0.15e10
