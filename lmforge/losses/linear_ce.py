"""Next-token cross-entropy straight from hidden states, never holding the whole [tokens × vocab] logits.

For 16k tokens and a 32k vocabulary the logits alone take 2 GiB in fp32 (and the same again for their
gradient). Here the output projection and the loss run over chunks of rows; each chunk's gradient with
respect to the hidden states and the projection weight is computed in the forward pass (softmax minus
the one-hot target), so backward only scales what was stored. The result equals
`F.cross_entropy(hidden @ weight.T, labels, reduction="sum")` and its gradients up to float rounding.
"""

from __future__ import annotations

import torch

from lmforge.losses.lm import IGNORE

LOGITS_PER_CHUNK = 1 << 27
"""Elements of one chunk's fp32 logits (512 MiB)."""


def _chunk_loss(logits, safe, valid):
    logits = logits.float()
    return ((logits.logsumexp(-1) - logits.gather(1, safe)[:, 0]) * valid).sum()


def _chunk_loss_and_grad(logits, safe, valid):
    """The chunk's summed loss and d(loss)/d(logits) = softmax - one_hot(target), zero on ignored rows,
    in the logits' dtype."""
    full = logits.float()
    log_norm = full.logsumexp(-1)
    loss = ((log_norm - full.gather(1, safe)[:, 0]) * valid).sum()
    grad = (full - log_norm[:, None]).exp()
    grad = grad.scatter_add(1, safe, -torch.ones_like(safe, dtype=grad.dtype)) * valid[:, None]
    return loss, grad.to(logits.dtype)


if torch.cuda.is_available():  # one fused kernel instead of a handful of passes over [rows x vocab] fp32
    _chunk_loss_and_grad = torch.compile(_chunk_loss_and_grad, dynamic=True)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows: int):
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[start:start + chunk_rows]
            targets = labels[start:start + chunk_rows]
            valid = targets != IGNORE
            safe = targets.clamp(min=0)[:, None]
            logits = rows @ weight.T
            if grad_hidden is None and grad_weight is None:
                total -= _chunk_token_logps(logits, safe, valid).sum()
                continue
            loss, grad_logits = _chunk_loss_and_grad(logits, safe, valid)
            total += loss
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_rows] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ rows).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.float()
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype), None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of `hidden @ weight.T` against `labels` (IGNORE rows skipped), and the number
    of tokens it covers. hidden [N, H], weight [V, H], labels [N]."""
    rows = chunk_rows or max(1, LOGITS_PER_CHUNK // weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, rows), (labels != IGNORE).sum()


def causal_lm_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_lm_loss` from the final hidden states [B, T, H]: position t predicts label t+1."""
    width = hidden.shape[-1]
    return linear_cross_entropy(hidden[:, :-1].reshape(-1, width), weight, labels[:, 1:].reshape(-1), chunk_rows)


def _chunk_token_logps(logits, safe, valid):
    full = logits.float()
    return torch.where(valid, full.gather(1, safe)[:, 0] - full.logsumexp(-1), torch.zeros_like(full[:, 0]))


def _chunk_token_logps_grad(logits, safe, valid, grad_out):
    """d(sum_i g_i · logp_i)/d(logits) = g_i · (one_hot(target) - softmax), zero on ignored rows."""
    probs = logits.float().softmax(-1)
    weight = (grad_out * valid)[:, None]
    grad = (-probs).scatter_add(1, safe, torch.ones_like(safe, dtype=probs.dtype)) * weight
    return grad.to(logits.dtype)


if torch.cuda.is_available():
    _chunk_token_logps_grad = torch.compile(_chunk_token_logps_grad, dynamic=True)


class _ChunkedTokenLogps(torch.autograd.Function):
    """Per-token log-probs of the labels under `hidden @ weight.T`, chunked. The preference losses need
    each token's value, so the gradient is not known in the forward pass: backward recomputes each
    chunk's logits (one extra matmul) instead of keeping them all."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows: int):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            targets = labels[start:start + chunk_rows]
            out[start:start + chunk_rows] = _chunk_token_logps(hidden[start:start + chunk_rows] @ weight.T,
                                                               targets.clamp(min=0)[:, None], targets != IGNORE)
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        rows_per = ctx.chunk_rows
        for start in range(0, hidden.shape[0], rows_per):
            rows, targets = hidden[start:start + rows_per], labels[start:start + rows_per]
            grad_logits = _chunk_token_logps_grad(rows @ weight.T, targets.clamp(min=0)[:, None],
                                                  targets != IGNORE, grad_out[start:start + rows_per].float())
            if grad_hidden is not None:
                grad_hidden[start:start + rows_per] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ rows).float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def sequence_logps_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`losses.preference.sequence_logps` from the final hidden states [B, T, H] and the output weight:
    per-sequence sums of the labelled tokens' log-probs, and the counts, without [B, T, V] logits."""
    rows = chunk_rows or max(1, LOGITS_PER_CHUNK // weight.shape[0])
    batch, length, width = hidden.shape
    targets = labels[:, 1:]
    token = _ChunkedTokenLogps.apply(hidden[:, :-1].reshape(-1, width), weight, targets.reshape(-1), rows)
    return token.view(batch, length - 1).sum(-1), (targets != IGNORE).sum(-1)


def token_logps_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            chunk_rows: int | None = None) -> torch.Tensor:
    """Log-prob of each target under `hidden @ weight.T`, chunked: hidden [N, H], targets [N] -> [N] fp32.
    For callers that pick the predicting rows themselves (DPO's shared prompt feeds one row twice)."""
    rows = chunk_rows or max(1, LOGITS_PER_CHUNK // weight.shape[0])
    return _ChunkedTokenLogps.apply(hidden, weight, targets, rows)
