"""The output head and what is computed from it: the summed LM loss (full logits, or chunked straight from
the final hidden states so a [tokens x vocab] tensor never exists), and the sequence log-probs of DPO's
pairs. Stages, RL and benchmarks all take the head's numbers from here; the reward and value heads are
`models/load.as_reward_model` and `models/value.py`."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate.utils import extract_model_from_parallel

from lmforge.config.schema import StageConfig
from lmforge.losses.linear_ce import causal_lm_loss_from_hidden
from lmforge.losses.lm import causal_lm_loss
from lmforge.models.attention import VARLEN, packed_inputs
from lmforge.models.shared_prompt import batch_logps, model_inputs


def lm_loss(model, batch: dict, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Summed next-token loss of a batch. Packed rows under lmforge_varlen attention run as one flattened
    row with document boundaries; `fused` computes the loss from hidden states in chunks (no full logits)."""
    inner = extract_model_from_parallel(model)
    shape = batch["input_ids"].shape
    if "position_ids" in batch and inner.config._attn_implementation == VARLEN:
        inputs = packed_inputs(batch)
    else:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    head = fusable_output_layer(inner) if fused else None
    if head is None:
        logits = model(**inputs, use_cache=False).logits.reshape(*shape, -1)
        loss_sum, tokens = causal_lm_loss(logits, batch["labels"])
    else:  # no logits from the model: its final hidden states go through the head in chunks
        with hidden_states_as_logits(inner, head):
            hidden = model(**inputs, use_cache=False).logits
        loss_sum, tokens = causal_lm_loss_from_hidden(hidden.reshape(*shape, -1), head.weight, batch["labels"],
                                                      chunk_rows(head.weight))
    return loss_sum, tokens, {}


CPU_LOGITS_PER_CHUNK = 1 << 24
"""Elements of one chunk's logits on the CPU (64 MiB in fp32). A chunk's logits exist about three times at
once (logits, softmax, its gradient) in the host's memory; with the loss's own default (512 MiB chunks) a
SmolLM2 SFT batch of 8 x 256 tokens would be one 0.4 GB chunk. A CPU matmul of a few hundred rows
(341 for a 49152 vocabulary) is still an efficient one."""


def chunk_rows(weight: torch.Tensor) -> int | None:
    """Rows per chunk of the chunked loss: small chunks on the CPU, the loss's default elsewhere."""
    return max(1, CPU_LOGITS_PER_CHUNK // weight.shape[0]) if weight.device.type == "cpu" else None


@contextmanager
def hidden_states_as_logits(model, head):
    """The output layer swapped for an identity during one forward pass, so the model returns its final
    (normed) hidden states. Asking for output_hidden_states instead installs capture hooks in every
    block, which break torch.compile's graphs."""
    model.set_output_embeddings(torch.nn.Identity())
    try:
        yield
    finally:
        model.set_output_embeddings(head)


def fusable_output_layer(model):
    """The plain linear output layer the chunked loss can stand in for, or None (a bias, logit
    soft-capping or scaling, an adapter on the head)."""
    config = model.config
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if type(head.weight).__name__ == "DTensor" or head.weight.dim() != 2:  # sharded (FSDP) outside forward
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return head


def use_fused_loss(cfg: StageConfig) -> bool:
    """train.fused_loss, unset meaning on, CPU included: the chunked loss does the same matmuls as the full
    logits and never holds them (bench/cpu_memory.py: LoRA DPO on SmolLM2 2.87 -> 2.67 GB peak)."""
    return True if cfg.train.fused_loss is None else cfg.train.fused_loss


def policy_logps(model, batch: dict, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B] summed log-probs and token counts: the chosen (judged) sequences, then the rejected
    (mismatched), from a two-row or a shared-prompt batch."""
    inner = extract_model_from_parallel(model)
    inputs = model_inputs(inner, batch)
    head = fusable_output_layer(inner) if fused else None
    if head is None:
        return batch_logps(model(**inputs).logits, batch)
    with hidden_states_as_logits(inner, head):
        hidden = model(**inputs).logits
    return batch_logps(hidden, batch, head.weight)
