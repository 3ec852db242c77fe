"""LoRA+, rsLoRA, PiSSA, GaLore, Mixture-of-Depths, NEFTune and LLaMA-Pro, each checked by the number
that defines it, on tiny models built from a config; then each through the SFT stage end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, LlamaConfig

from lmforge.config.errors import ConfigError
from lmforge.config.schema import ExpandConfig, GaloreConfig, LoraConfig, ModConfig, ModelConfig, TrainConfig
from lmforge.models.adapters import apply_finetuning
from lmforge.models.galore import GaLoreAdamW, galore_state_numel
from lmforge.models.layers import decoder_layers
from lmforge.models.mod import apply_mod
from lmforge.models.neftune import add_neftune_noise
from lmforge.models.optimizers import build_optimizer, find_plan, optimizer_state_numel

VOCAB = 96


def tiny_llama(layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    # Non-zero norms and wider weights than the default init, so that differences would show.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def ids(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def method(name: str, **kwargs) -> ModelConfig:
    return ModelConfig(scratch="test", finetuning=name, **kwargs)


def one_step(model, optimizer, input_ids):
    model.train()
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return out.loss.item()


# -- the optimizer the loop builds -------------------------------------------------------------------------
def test_plain_optimizer_is_the_trainers_adamw():
    model = tiny_llama()
    train = TrainConfig(lr=3e-4, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.9)
    optimizer = build_optimizer(model, train)
    assert type(optimizer) is torch.optim.AdamW and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (3e-4, 0.1, (0.8, 0.9), 1e-8)
    assert group["fused"] is None  # CPU: the reference implementation, as the trainer asks for
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model.requires_grad_(False), train)


def test_lora_plus_puts_b_matrices_in_a_group_with_lr_times_ratio():
    model = apply_finetuning(tiny_llama(), method("lora"), LoraConfig(r=4, plus_ratio=16))
    optimizer = build_optimizer(model, TrainConfig(lr=2e-4))
    b_ids = {id(p) for n, p in model.named_parameters() if ".lora_B." in n}
    a_ids = {id(p) for n, p in model.named_parameters() if ".lora_A." in n}
    assert len(b_ids) == len(a_ids) == 4 * 7  # every linear layer of 4 blocks
    base, fast = optimizer.param_groups
    assert {id(p) for p in fast["params"]} == b_ids and fast["lr"] == pytest.approx(2e-4 * 16)
    assert {id(p) for p in base["params"]} == a_ids and base["lr"] == pytest.approx(2e-4)
    # The loop's schedule scales every group's own rate by the same factor.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 16e-4])
    del scheduler
    plain = apply_finetuning(tiny_llama(), method("lora"), LoraConfig(r=4))
    assert len(build_optimizer(plain, TrainConfig()).param_groups) == 1


def test_rslora_scales_by_alpha_over_sqrt_r():
    for use_rslora, expected in ((True, 32 / math.sqrt(16)), (False, 32 / 16)):
        model = apply_finetuning(tiny_llama(), method("lora"), LoraConfig(r=16, alpha=32, use_rslora=use_rslora))
        scalings = [m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A")]
        assert len(scalings) == 4 * 7 and scalings == pytest.approx([expected] * 28)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_starts_at_the_base_models_output(init):
    base = tiny_llama()
    input_ids = ids()
    expected = logits(base, input_ids)
    q_before = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = apply_finetuning(base, method("lora"), LoraConfig(r=4, init=init)).eval()
    torch.testing.assert_close(logits(model, input_ids), expected, atol=2e-4, rtol=0)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    # The principal part moved into the adapter (A and B both non-zero), the residual stayed in the base.
    assert layer.lora_B["default"].weight.abs().min() > 0 or layer.lora_B["default"].weight.abs().sum() > 0.1
    moved = (q_before - layer.base_layer.weight).norm() / q_before.norm()
    assert moved > 0.2
    # and base + B A rebuilds the original weight
    rebuilt = layer.base_layer.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ \
        layer.lora_A["default"].weight
    torch.testing.assert_close(rebuilt, q_before, atol=1e-4, rtol=0)


def optimizer_state_numel_of(optimizer, param) -> int:
    return sum(v.numel() for k, v in optimizer.state[param].items() if k != "step")


# -- GaLore -------------------------------------------------------------------------------------------------
def test_galore_optimizer_state_is_smaller_than_adamws_by_the_expected_factor():
    galore_cfg = GaloreConfig(rank=4, update_interval=2)
    model = apply_finetuning(tiny_llama(), method("galore"), LoraConfig(), galore=galore_cfg).train()
    plan = find_plan(model)
    assert plan.galore is galore_cfg and set(plan.galore_targets) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    galore, adamw = build_optimizer(model, TrainConfig(lr=1e-3)), torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert isinstance(galore, GaLoreAdamW)
    for optimizer in (galore, adamw):
        one_step(model, optimizer, ids())
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.shape[0] != VOCAB]
    others = sum(p.numel() for p in model.parameters()) - sum(w.numel() for w in linears)
    expected = sum(galore_state_numel(*w.shape, 4) for w in linears) + 2 * others
    assert optimizer_state_numel(galore) == expected
    assert optimizer_state_numel(adamw) == 2 * sum(p.numel() for p in model.parameters())
    # The projected matrices alone: (short*r + 2*r*long) / (2*short*long) per matrix.
    q = galore.state[model.model.layers[0].self_attn.q_proj.weight]  # 32 x 32
    assert q["exp_avg"].shape == (4, 32) and q["projector"].shape == (32, 4)
    down = galore.state[model.model.layers[0].mlp.down_proj.weight]  # 32 x 64: moments r x 64
    assert down["exp_avg"].shape == (4, 64)
    # Per block, short*r + 2*r*long for q, o (32x32), k, v (16x32), gate, up, down (64x32 / 32x64), against
    # AdamW's 2*rows*cols: 3328 / 18432 floats, 5.5 times less.
    galore_block = 2 * (32 * 4 + 2 * 4 * 32) + 2 * (16 * 4 + 2 * 4 * 32) + 3 * (32 * 4 + 2 * 4 * 64)
    adamw_block = 2 * 2 * 32 * 32 + 2 * 2 * 16 * 32 + 3 * 2 * 64 * 32
    assert (galore_block, adamw_block) == (3328, 18432)
    projected = [p for p in galore.param_groups[0]["params"]]
    assert sum(optimizer_state_numel_of(galore, p) for p in projected) == 4 * galore_block
    assert sum(optimizer_state_numel_of(adamw, p) for p in projected) == 4 * adamw_block


def test_galore_plain_groups_match_torch_adamw_and_projected_updates_stay_low_rank():
    torch.manual_seed(0)
    reference, ours = torch.nn.Linear(8, 6), torch.nn.Linear(8, 6)
    ours.load_state_dict(reference.state_dict())
    hyper = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1}
    torch_adamw, galore_plain = torch.optim.AdamW(reference.parameters(), **hyper), GaLoreAdamW(ours.parameters(), **hyper)
    for step in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(step))
        for layer, optimizer in ((reference, torch_adamw), (ours, galore_plain)):
            layer(x).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    torch.testing.assert_close(ours.weight, reference.weight, atol=1e-6, rtol=0)

    weight = torch.nn.Parameter(torch.randn(12, 20))
    start = weight.detach().clone()
    optimizer = GaLoreAdamW([{"params": [weight], "rank": 2, "update_interval": 100, "scale": 0.5}], lr=0.1)
    for _ in range(3):
        (weight @ torch.randn(20, 7)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    change = weight.detach() - start
    assert torch.linalg.matrix_rank(change, atol=1e-5).item() == 2  # inside the rank-2 projection


def test_galore_resumes_exactly_from_a_saved_state(tmp_path):
    def make(weight):
        return GaLoreAdamW([{"params": [weight], "rank": 2, "update_interval": 2, "scale": 0.5}], lr=0.05,
                           weight_decay=0.1)

    def train(weight, optimizer, steps, offset):
        for step in range(offset, offset + steps):
            x = torch.randn(20, 7, generator=torch.Generator().manual_seed(step))
            (weight @ x).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()

    torch.manual_seed(0)
    straight = torch.nn.Parameter(torch.randn(12, 20))
    resumed = torch.nn.Parameter(straight.detach().clone())
    optimizer = make(straight)
    train(straight, optimizer, 5, 0)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    train(straight, optimizer, 4, 5)

    first = make(resumed)
    train(resumed, first, 5, 0)
    again = make(resumed)  # a new process: the state comes from the file, as the loop's checkpoints do
    again.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    train(resumed, again, 4, 5)
    assert torch.equal(resumed, straight)


# -- Mixture-of-Depths ----------------------------------------------------------------------------------------
def count_processed_tokens(model):
    seen = []
    for layer in decoder_layers(model):
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append((module.layer_idx, kwargs["hidden_states"].shape[1])),
            with_kwargs=True)
    return seen


def test_mod_with_capacity_one_equals_the_original_layers():
    base = tiny_llama()
    input_ids = ids()
    expected = logits(base, input_ids)
    assert apply_mod(base, ModConfig(capacity=1.0, layers=[0, 1, 2, 3])) == [0, 1, 2, 3]
    torch.testing.assert_close(logits(base, input_ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("capacity", [0.125, 0.3, 0.5])
def test_mod_processes_ceil_of_capacity_times_length_tokens(capacity):
    model = tiny_llama()
    apply_mod(model, ModConfig(capacity=capacity))  # alternate: layers 1 and 3
    seen = count_processed_tokens(model)
    length = 24
    logits(model, ids(length=length), use_cache=False)  # teacher-forced, as in training: top-k routing
    k = math.ceil(capacity * length)
    assert seen == [(0, length), (1, k), (2, length), (3, k)]
    seen.clear()  # with a KV cache (generation) every token is computed; the threshold decides what is kept
    logits(model, ids(length=length), use_cache=True)
    assert seen == [(0, length), (1, length), (2, length), (3, length)]


def test_mod_skipped_tokens_pass_unchanged_and_picked_ones_follow_the_router():
    model = tiny_llama()
    apply_mod(model, ModConfig(capacity=0.25, layers=[1]))
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.mod_router.weight.normal_()
    hidden = torch.randn(2, 16, 32)
    positions = torch.arange(16).unsqueeze(0)
    rope = model.model.rotary_emb(hidden, positions)
    with torch.no_grad():
        out = layer(hidden, position_ids=positions, position_embeddings=rope)
        top = layer.mod_router(hidden).squeeze(-1).topk(4, dim=1).indices
    changed = (out - hidden).abs().amax(-1) > 0
    assert changed.sum(1).tolist() == [4, 4]
    assert all(set(changed[b].nonzero().flatten().tolist()) == set(top[b].tolist()) for b in range(2))
    # Generating (a KV cache): tokens whose score is under the learned threshold skip; nothing looks ahead.
    layer.mod_threshold.fill_(0.0)
    with torch.no_grad():
        out = layer(hidden, position_ids=positions, position_embeddings=rope, past_key_values=DynamicCache(),
                    use_cache=True)
        passed = layer.mod_router(hidden).squeeze(-1) >= 0
    assert torch.equal((out - hidden).abs().amax(-1) > 0, passed)


def _returned_cache(output):
    """The cache a forward returns: `cache` since transformers 5.25, `past_key_values` before."""
    return getattr(output, "cache", None) or output.past_key_values


def test_mod_generation_keeps_every_tokens_keys_and_decodes_as_a_full_recompute():
    """With a KV cache each routed layer must compute and cache every prompt token (top-k there would
    store keys for k tokens only and look ahead); decoding one token at a time from that cache then gives
    the logits a whole-sequence pass in generation mode gives."""
    model = tiny_llama()
    apply_mod(model, ModConfig(capacity=0.25, layers=[1, 3]))
    with torch.no_grad():
        for layer in (model.model.layers[1], model.model.layers[3]):
            layer.mod_router.weight.normal_()
            layer.mod_threshold.fill_(0.1)
    prompt, steps = ids(batch=2, length=12), 4
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache = _returned_cache(out)
        assert [cache.get_seq_length(i) for i in range(4)] == [12, 12, 12, 12]
        sequence = torch.cat([prompt, out.logits[:, -1:].argmax(-1)], dim=1)
        for _ in range(steps - 1):
            out = model(input_ids=sequence[:, -1:], past_key_values=cache, use_cache=True)
            cache = _returned_cache(out)
            sequence = torch.cat([sequence, out.logits[:, -1:].argmax(-1)], dim=1)
        incremental = out.logits[:, -1]
        whole = model(input_ids=sequence[:, :-1], use_cache=True).logits[:, -1]
    torch.testing.assert_close(incremental, whole, atol=1e-4, rtol=0)
    assert cache.get_seq_length(1) == 12 + steps - 1


def test_mod_routes_packed_rows_with_their_document_mask():
    model = tiny_llama()
    input_ids = ids(batch=1, length=20)
    positions = torch.cat([torch.arange(12), torch.arange(8)]).unsqueeze(0)  # two packed documents
    apply_mod(model, ModConfig(capacity=0.5, layers=[1, 3]))
    together = logits(model, input_ids, position_ids=positions, use_cache=False)
    # Routing is per row, so compare a capacity-1 conversion: packed == each document alone.
    full = tiny_llama()
    apply_mod(full, ModConfig(capacity=1.0, layers=[1, 3]))
    packed = logits(full, input_ids, position_ids=positions, use_cache=False)
    alone = torch.cat([logits(full, input_ids[:, :12]), logits(full, input_ids[:, 12:])], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    assert together.shape == (1, 20, VOCAB) and torch.isfinite(together).all()
    # The mask between picked tokens is the document mask's rows and columns at the picked positions.
    from lmforge.models.mod import _pick_mask

    mask = torch.rand(2, 1, 20, 20) > 0.5
    picked = torch.tensor([[0, 3, 12, 19], [1, 2, 5, 18]])
    sub = _pick_mask(mask, picked, 20)
    for b in range(2):
        assert torch.equal(sub[b, 0], mask[b, 0][picked[b]][:, picked[b]])
    assert _pick_mask(None, picked, 20) is None


def test_mod_saves_and_reloads_through_lmforge(tmp_path):
    from lmforge.models.load import _load_weights

    model = tiny_llama()
    apply_mod(model, ModConfig(capacity=0.25))
    with torch.no_grad():
        for layer in (model.model.layers[1], model.model.layers[3]):
            layer.mod_router.weight.normal_()
            layer.mod_threshold.fill_(0.3)
    input_ids = ids()
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["lmforge_mod"] == {"capacity": 0.25, "layers": [1, 3]}
    loaded = _load_weights(str(tmp_path), {"dtype": torch.float32}, VOCAB).eval()
    assert type(loaded.model.layers[1]).__name__ == "RoutedLlamaDecoderLayer"
    assert loaded.model.layers[3].mod_threshold.item() == pytest.approx(0.3)
    torch.testing.assert_close(logits(loaded, input_ids), expected, atol=0, rtol=0)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # other tools: every token through every layer
    assert type(plain.model.layers[1]).__name__ == "LlamaDecoderLayer"


def test_mod_refuses_architectures_it_does_not_support():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB))
    with pytest.raises(ConfigError, match="Llama-style.*model_type='gpt2'"):
        apply_mod(gpt2, ModConfig())
    with pytest.raises(ConfigError, match=r"mod.layers \[7\] out of range"):
        apply_mod(tiny_llama(), ModConfig(layers=[1, 7]))


# -- NEFTune --------------------------------------------------------------------------------------------------
def test_neftune_adds_bounded_noise_in_training_mode_only():
    model = tiny_llama()
    embeddings = model.get_input_embeddings()
    input_ids = ids(batch=4, length=50)
    clean = embeddings(input_ids).detach()
    handle = add_neftune_noise(model, alpha=5.0)
    model.eval()
    assert torch.equal(embeddings(input_ids), clean)
    model.train()
    noise = embeddings(input_ids).detach() - clean
    bound = 5.0 / math.sqrt(50 * 32)
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert noise.abs().mean().item() == pytest.approx(bound / 2, rel=0.05)  # uniform on [-bound, bound]
    handle.remove()
    assert torch.equal(embeddings(input_ids), clean)


# -- LLaMA-Pro ------------------------------------------------------------------------------------------------
def test_llama_pro_expansion_starts_at_the_base_models_output(tmp_path):
    base = tiny_llama()
    input_ids = ids()
    expected = logits(base, input_ids)
    greedy = base.generate(input_ids[:1, :6], max_new_tokens=8, do_sample=False)
    originals = [layer.self_attn.q_proj.weight for layer in base.model.layers]
    model = apply_finetuning(base, method("llama_pro"), LoraConfig(), expand=ExpandConfig(num_new_blocks=2))
    layers = model.model.layers
    assert len(layers) == model.config.num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(6))
    assert [layers[i].self_attn.q_proj.weight is w for i, w in zip((0, 1, 3, 4), originals, strict=True)] == [True] * 4
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"2", "5"}  # only the new blocks, after each group of two
    torch.testing.assert_close(logits(model, input_ids), expected, atol=1e-6, rtol=0)
    # A fixed layer_idx per block keeps the KV cache right: generation is unchanged too.
    assert torch.equal(model.generate(input_ids[:1, :6], max_new_tokens=8, do_sample=False), greedy)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 6
    torch.testing.assert_close(logits(reloaded, input_ids), expected, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="must divide the model's 4 layers"):
        apply_finetuning(tiny_llama(), method("llama_pro"), LoraConfig(), expand=ExpandConfig(num_new_blocks=3))
