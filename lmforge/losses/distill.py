"""On-policy distillation maths (GKD, Agarwal et al. 2024; Thinking Machines' on-policy distillation, 2025) as
pure tensor functions: per-token divergences between a student and a teacher that share one vocabulary.

Conventions (as in ``rl.py``): per-token tensors are ``[B, T]`` over reply tokens, right-padded, with ``mask``
1 on real tokens; outputs are per token and unreduced, so the caller normalises over a whole optimizer step.

* ``generalized_jsd`` is the full-vocabulary divergence at every position, GKD's JSD(β) with TRL's convention:
  β = 0 is the forward KL(teacher || student), β = 1 the reverse KL(student || teacher), and in between
  β·KL(teacher || M) + (1 − β)·KL(student || M) with M = (1 − β)·student + β·teacher. Forward and backward run
  in row chunks with a hand-written gradient, so besides the two logits tensors (which exist anyway) and the
  gradient of the student's, no [tokens × vocab] tensor is kept: autograd through log-softmax would save a
  float32 copy per model.
* ``sampled_reverse_kl`` is the one-sample estimate log p_s(x) − log p_t(x) at the sampled token x, the
  per-token reward of Thinking Machines' note (the teacher gives one log-prob per token). Its gradient is the
  score-function one, (log p_s(x) − log p_t(x))·∇log p_s(x): an unbiased gradient of the per-token reverse KL
  only for tokens the student itself sampled.
"""

from __future__ import annotations

import math

import torch

from lmforge.losses.rl import LOGSOFTMAX_CHUNK_ELEMENTS, masked_mean

Metrics = dict[str, torch.Tensor]


def _chunk_terms(student: torch.Tensor, teacher: torch.Tensor, beta: float, temperature: float):
    """(divergence [rows], d divergence / d log p_student [rows, V], log p_student) of one float32 chunk.

    The second is g in dD/dz = p_s·(g − Σ p_s·g) / T, the softmax's chain rule: for the reverse KL
    g = log p_s − log p_t (plus a constant that cancels); for JSD(β) g = (1 − β)(log p_s − log M); the forward
    KL's gradient p_s − p_t is the same form with g = −p_t / p_s, and is computed directly instead (no division).
    """
    s = torch.log_softmax(student / temperature, dim=-1)
    t = torch.log_softmax(teacher / temperature, dim=-1)
    if beta == 1.0:
        g = s - t
        return (s.exp() * g).sum(-1), g, s
    if beta == 0.0:
        p_t = t.exp()
        # xlogy's rule: a token the teacher rules out (p_t = 0, say logits of -inf) adds 0, not 0 * inf.
        return torch.where(p_t > 0, p_t * (t - s), torch.zeros_like(s)).sum(-1), None, s
    m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    p_t = t.exp()
    teacher_side = torch.where(p_t > 0, p_t * (t - m), torch.zeros_like(s)).sum(-1)
    g = (1.0 - beta) * (s - m)
    return beta * teacher_side + (s.exp() * g).sum(-1), g, s


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32 at least (bf16/fp16 logits upcast one chunk at a time; float64 kept, for exact checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rows(logits: torch.Tensor) -> int:
    return max(1, LOGSOFTMAX_CHUNK_ELEMENTS // logits.shape[-1])


class _GeneralizedJSD(torch.autograd.Function):
    """JSD(β) per row of [*, V] logits, differentiable in the student's logits only; see the module docstring."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, beta: float, temperature: float) -> torch.Tensor:
        vocab = student.shape[-1]
        flat_s, flat_t, rows = student.reshape(-1, vocab), teacher.reshape(-1, vocab), _rows(student)
        pieces = [_chunk_terms(_wide(s), _wide(t), beta, temperature)[0]
                  for s, t in zip(flat_s.split(rows), flat_t.split(rows))]
        out = torch.cat(pieces) if pieces else _wide(flat_s.new_zeros(0))
        ctx.save_for_backward(student, teacher)
        ctx.beta, ctx.temperature = beta, temperature
        return out.reshape(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        student, teacher = ctx.saved_tensors
        vocab, rows = student.shape[-1], _rows(student)
        grad = torch.empty_like(student).reshape(-1, vocab)
        chunks = zip(student.reshape(-1, vocab).split(rows), teacher.reshape(-1, vocab).split(rows),
                     grad_out.reshape(-1, 1).split(rows), grad.split(rows))
        for s_chunk, t_chunk, g_out, out in chunks:
            _, g, s = _chunk_terms(_wide(s_chunk), _wide(t_chunk), ctx.beta, ctx.temperature)
            p_s = s.exp()
            if g is None:  # forward KL: d/dz = (p_s - p_t) / T
                d = p_s - torch.softmax(_wide(t_chunk) / ctx.temperature, dim=-1)
            else:
                d = p_s * (g - (p_s * g).sum(-1, keepdim=True))
            out.copy_(g_out * d / ctx.temperature)
        return grad.reshape(student.shape), None, None, None


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-position JSD(β) between softmax(student / T) and softmax(teacher / T), [*] (float32 at least) from [*, V]
    logits; gradients reach the student's logits only (the teacher is a fixed target)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the two models must share a vocabulary")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _GeneralizedJSD.apply(student_logits, teacher_logits.detach(), float(beta), float(temperature))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position KL(student || teacher) over the whole vocabulary: JSD(β = 1)."""
    return generalized_jsd(student_logits, teacher_logits, 1.0, temperature)


def sampled_reverse_kl(logps: torch.Tensor, teacher_logps: torch.Tensor) -> torch.Tensor:
    """Per-token loss from the log-probs of the sampled tokens under the student (with grad) and the teacher:
    its value is the one-sample reverse-KL estimate log p_s − log p_t, its gradient (log p_s − log p_t)·∇log p_s
    (the estimate as a negative reward with no discount, on the student's own samples)."""
    estimate = (logps - teacher_logps).detach()
    return estimate + estimate * (logps - logps.detach())


def distill_token_loss(per_token: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
    """(sum over real tokens, their count, metrics): the trainer divides by the step's whole token count, so
    every reply token of an optimizer step weighs the same (a long reply is not diluted)."""
    real = mask.bool()
    kept = torch.where(real, per_token, torch.zeros_like(per_token))
    with torch.no_grad():
        metrics: Metrics = {"divergence": masked_mean(per_token.detach(), mask)}
    return kept.sum(), real.sum(), metrics
