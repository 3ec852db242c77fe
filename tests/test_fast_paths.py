"""The fast paths equal the plain ones: variable-length attention for packed rows, the chunked
cross-entropy, fused/compiled training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.data.packing import collate, pack_samples
from lmforge.losses.linear_ce import linear_cross_entropy
from lmforge.losses.lm import IGNORE
from lmforge.models.attention import VARLEN, document_boundaries, register
from lmforge.models.heads import lm_loss


def tiny(seed: int = 0, attention: str = "sdpa", tied: bool = False) -> LlamaForCausalLM:
    register()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(attention)
    return model


def rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 30, (1,), generator=g))
        ids = torch.randint(1, 64, (length,), generator=g).tolist()
        labels = [IGNORE] * (length // 3) + ids[length // 3:]  # a prompt without loss, then the reply
        out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * length})
    return out


def loss_and_grads(model, batch, fused=False):
    model.zero_grad()
    loss, count, _ = lm_loss(model, batch, fused=fused)
    loss.backward()
    return float(loss.detach()), int(count), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_document_boundaries_of_a_packed_batch():
    positions = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])  # row 2 continues a document: it still starts one
    cu, longest = document_boundaries(positions)
    assert cu.tolist() == [0, 3, 5, 7, 10] and longest == 3


def test_varlen_packed_rows_equal_one_by_one_and_sdpa_block_mask():
    data = rows(7, seed=1)
    packed = collate(pack_samples(data, max_length=64), pad_id=0)
    assert packed["input_ids"].shape[0] < len(data)  # several documents share a row
    one_by_one_loss, one_by_one_count = 0.0, 0
    model = tiny(attention="sdpa")
    with torch.no_grad():
        for row in data:
            loss, count, _ = lm_loss(model, collate([row], pad_id=0))
            one_by_one_loss, one_by_one_count = one_by_one_loss + float(loss), one_by_one_count + int(count)
    sdpa = loss_and_grads(tiny(attention="sdpa"), packed)
    varlen = loss_and_grads(tiny(attention=VARLEN), packed)
    assert varlen[1] == sdpa[1] == one_by_one_count
    assert varlen[0] == pytest.approx(one_by_one_loss, rel=1e-5) and varlen[0] == pytest.approx(sdpa[0], rel=1e-6)
    for name, grad in sdpa[2].items():
        assert torch.allclose(varlen[2][name], grad, atol=1e-6), name


def test_varlen_falls_back_to_sdpa_for_padded_batches():
    batch = collate(rows(4, seed=2), pad_id=0)
    plain = loss_and_grads(tiny(attention="sdpa"), batch)
    varlen = loss_and_grads(tiny(attention=VARLEN), batch)
    assert varlen[0] == pytest.approx(plain[0], rel=1e-6)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_linear_cross_entropy_equals_full_logits(dtype, atol):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(50, 16, generator=g) * 0.3).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[::4] = IGNORE
    loss, count = linear_cross_entropy(hidden, weight, labels, chunk_rows=8)  # 5 chunks, the last one short
    (loss * 0.5).backward()
    got = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad, weight.grad = None, None
    expected = F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE, reduction="sum")
    (expected * 0.5).backward()
    assert int(count) == int((labels != IGNORE).sum())
    assert torch.allclose(got[0], expected.detach(), rtol=1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.allclose(got[1].float(), hidden.grad.float(), atol=atol)
    assert torch.allclose(got[2].float(), weight.grad.float(), atol=atol)


@pytest.mark.parametrize("attention, tied", [("sdpa", False), (VARLEN, False), (VARLEN, True)])
def test_fused_lm_loss_equals_plain(attention, tied):
    packed = collate(pack_samples(rows(7, seed=3), max_length=64), pad_id=0)
    plain = loss_and_grads(tiny(attention=attention, tied=tied), packed, fused=False)
    fused = loss_and_grads(tiny(attention=attention, tied=tied), packed, fused=True)
    assert fused[1] == plain[1] and fused[0] == pytest.approx(plain[0], rel=1e-6)
    for name, grad in plain[2].items():  # the tied head/embedding gets both of its gradients
        assert torch.allclose(fused[2][name], grad, atol=1e-6), name


@pytest.mark.slow
def test_compiled_blocks_equal_eager():
    from lmforge.loop.trainer import compile_blocks

    packed = collate(pack_samples(rows(7, seed=4), max_length=64), pad_id=0)
    eager = loss_and_grads(tiny(attention=VARLEN), packed, fused=True)
    model = tiny(attention=VARLEN)
    assert compile_blocks(model) == 2
    compiled = loss_and_grads(model, packed, fused=True)
    assert set(compiled[2]) == set(eager[2])  # parameter names unchanged (checkpoints stay loadable)
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    for name, grad in eager[2].items():
        assert torch.allclose(compiled[2][name], grad, atol=1e-5), name


def test_chunked_sequence_logps_equal_full_logits_with_gradients():
    from lmforge.losses.linear_ce import sequence_logps_from_hidden
    from lmforge.losses.preference import sequence_logps

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 9, 16, generator=g, requires_grad=True)
    weight = (torch.randn(40, 16, generator=g) * 0.3).requires_grad_(True)
    labels = torch.randint(0, 40, (4, 9), generator=g)
    labels[:, :3] = IGNORE  # prompts
    labels[3, 6:] = IGNORE  # a shorter, padded sequence
    coefficients = torch.tensor([0.7, -1.3, 0.2, 2.0])  # a loss that weighs each sequence differently
    sums, lengths = sequence_logps_from_hidden(hidden, weight, labels, chunk_rows=5)
    (sums * coefficients).sum().backward()
    got = (sums.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad, weight.grad = None, None
    expected, expected_lengths = sequence_logps(hidden @ weight.T, labels)
    (expected * coefficients).sum().backward()
    assert torch.equal(lengths, expected_lengths)
    assert torch.allclose(got[0], expected.detach(), atol=1e-5)
    assert torch.allclose(got[1], hidden.grad, atol=1e-6) and torch.allclose(got[2], weight.grad, atol=1e-6)


def test_fused_dpo_loss_equals_plain():
    from lmforge.config.schema import DPOConfig
    from lmforge.data.preference import collate_pairs
    from lmforge.stages.dpo import preference_loss

    g = torch.Generator().manual_seed(5)
    pairs = [{"prompt_ids": torch.randint(1, 64, (int(n),), generator=g).tolist(),
              "chosen_ids": torch.randint(1, 64, (6,), generator=g).tolist(),
              "rejected_ids": torch.randint(1, 64, (9,), generator=g).tolist()} for n in (4, 7, 5)]
    batch = collate_pairs(pairs, pad_id=0)
    batch["ref_chosen"], batch["ref_rejected"] = torch.tensor([-20.0, -25.0, -22.0]), torch.tensor([-30.0, -28, -33])
    results = []
    for fused in (False, True):
        model = tiny(seed=2, tied=True)
        loss, count, metrics = preference_loss(model, batch, DPOConfig(beta=0.1), reference=None, fused=fused)
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for name, grad in results[0][1].items():
        assert torch.allclose(results[1][1][name], grad, atol=1e-6), name
