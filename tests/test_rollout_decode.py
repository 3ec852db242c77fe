"""lmforge's own rollout decoder (rl.backend=lmforge) against transformers' generate."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lmforge.rollout.backends import make_backend
from lmforge.rollout.decode import LMForgeBackend, UnsupportedModel, sample_from
from lmforge.rollout.sample import HFBackend, SamplingParams

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=2)
ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),  # biased q/k/v projections
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(head_dim=24, **SHAPE)),  # per-head q/k norms, head_dim != h/H
}
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in (4, 19, 9, 33, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_greedy_replies_equal_transformers_generate(arch, device):
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().to(device).eval()
    params = SamplingParams(max_new_tokens=37, temperature=0.0)
    expected = HFBackend(8).generate(model, prompts(), params, [2], 0)
    backend = LMForgeBackend()
    got = backend.generate(model, prompts(), params, [2], 0)
    assert got == expected
    # A second rollout reuses the decoder (and on a GPU its captured graph) and must not carry state over.
    decoder = backend._decoder
    assert backend.generate(model, prompts(1), params, [2], 0) == HFBackend(8).generate(model, prompts(1), params,
                                                                                        [2], 0)
    assert backend._decoder is decoder


def test_replies_stop_at_the_stop_token_and_pad_after_it():
    torch.manual_seed(0)
    model = ARCHITECTURES["llama"]().eval()
    params = SamplingParams(max_new_tokens=30, temperature=0.0)
    free = LMForgeBackend().generate(model, prompts(), params, [], 0)
    stop = free[1][5]  # the token row 1 emits at step 5 becomes the stop token
    rows = LMForgeBackend().generate(model, prompts(), params, [stop], 0)
    assert rows == HFBackend(8).generate(model, prompts(), params, [stop], 0)
    ended = rows[1]
    cut = ended.index(stop)
    assert cut <= 5 and set(ended[cut + 1:]) <= {0}


def test_updated_weights_are_used_by_the_next_rollout():
    """Training changes parameters in place between rollouts: the kept decoder must see them."""
    torch.manual_seed(0)
    model = ARCHITECTURES["llama"]().eval()
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    backend = LMForgeBackend()
    before = backend.generate(model, prompts(), params, [2], 0)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    after = backend.generate(model, prompts(), params, [2], 0)
    assert after != before
    assert after == HFBackend(8).generate(model, prompts(), params, [2], 0)


def test_sampling_draws_from_the_tempered_and_truncated_distribution():
    """First-token frequencies over 20k draws match softmax(logits / T) after top-k and top-p."""
    torch.manual_seed(0)
    logits = torch.randn(8) * 2
    rows = logits.expand(20000, 8)
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8)):
        probs = torch.softmax(logits / temperature, -1)
        keep = torch.zeros(8, dtype=torch.bool)
        order = probs.argsort(descending=True)
        if top_k:
            keep[order[:top_k]] = True
        else:
            mass_before = probs[order].cumsum(0) - probs[order]
            keep[order[mass_before <= top_p]] = True
        expected = torch.where(keep, probs, 0) / probs[keep].sum()
        counts = torch.bincount(sample_from(rows, temperature, top_p, top_k), minlength=8).float()
        seen = counts / counts.sum()
        assert counts[~keep].sum() == 0, (temperature, top_k, top_p)
        # 5 standard errors of a binomial proportion: a false alarm is vanishingly rare.
        tolerance = 5 * torch.sqrt(expected * (1 - expected) / 20000) + 1e-4
        assert torch.all((seen - expected).abs() <= tolerance), (seen, expected)


def test_sampled_rollouts_have_plausible_length_and_vary():
    torch.manual_seed(0)
    model = ARCHITECTURES["qwen2"]().eval()
    params = SamplingParams(max_new_tokens=20, temperature=1.0)
    backend = LMForgeBackend()
    rows = backend.generate(model, [prompts()[0]] * 6, params, [], 0)
    assert all(len(r) == 20 for r in rows)
    assert len({tuple(r) for r in rows}) == 6
    assert backend.generate(model, [prompts()[0]] * 6, params, [], 0) != rows  # fresh draws each rollout


def test_unsupported_architecture_names_the_way_out():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModel, match="rl.backend=hf"):
        LMForgeBackend().generate(model, [[1, 2]], SamplingParams(max_new_tokens=3), [2], 0)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_step_gives_the_same_greedy_replies(device):
    torch.manual_seed(0)
    model = ARCHITECTURES["llama"]().to(device).eval()
    params = SamplingParams(max_new_tokens=21, temperature=0.0)
    expected = HFBackend(8).generate(model, prompts(), params, [2], 0)
    assert LMForgeBackend(compile=True).generate(model, prompts(), params, [2], 0) == expected


def test_auto_backend_is_the_decoder_on_a_gpu_for_supported_unsharded_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    llama = ARCHITECTURES["llama"]()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert isinstance(make_backend("auto", llama, on_gpu=True), LMForgeBackend)
    assert isinstance(make_backend("auto", llama, on_gpu=False), HFBackend)
    assert isinstance(make_backend("auto", llama, on_gpu=True, sharded=True), HFBackend)
    assert isinstance(make_backend("auto", gpt2, on_gpu=True), HFBackend)
    with pytest.raises(UnsupportedModel, match="rl.backend=hf"):
        make_backend("lmforge", gpt2, on_gpu=True)
    with pytest.raises(UnsupportedModel, match="FSDP or ZeRO-3"):
        make_backend("lmforge", llama, on_gpu=True, sharded=True)
