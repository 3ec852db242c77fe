"""CPU memory: what the stages used to hold that they need not (see bench/cpu_memory.py for the figures)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.config.load import load_config
from lmforge.data.packing import collate
from lmforge.losses.lm import IGNORE
from lmforge.models.heads import CPU_LOGITS_PER_CHUNK, lm_loss, use_fused_loss

VOCAB = 32768  # a real tokenizer's size: SmolLM2 has 49152, Llama 3 128256


class LargestTensor(TorchDispatchMode):
    """The most elements any operation produced while active (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


def wide_vocab_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def test_default_sft_loss_on_the_cpu_never_holds_the_full_logits():
    cfg = load_config(None, ["model.scratch=test"], stage="sft")
    assert cfg.train.fused_loss is None and use_fused_loss(cfg)  # unset means the chunked loss, GPU or not
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(4):
        ids = torch.randint(0, VOCAB, (161,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * 20 + ids[20:], "attention_mask": [1] * len(ids)})
    batch = collate(rows, pad_id=0)
    model = wide_vocab_model()
    full_logits = 4 * 160 * VOCAB
    assert full_logits > CPU_LOGITS_PER_CHUNK  # the batch's logits would be more than one chunk
    with LargestTensor() as seen:
        loss, count, _ = lm_loss(model, batch, fused=use_fused_loss(cfg))
        loss.backward()
    assert int(count) == 4 * 141  # every labelled token after the first position
    assert seen.largest <= CPU_LOGITS_PER_CHUNK < full_logits  # one chunk's logits at a time, never all
    with torch.no_grad():  # and it is the same loss
        expected, _, _ = lm_loss(model, batch, fused=False)
    assert torch.allclose(loss.detach(), expected, rtol=1e-5)
