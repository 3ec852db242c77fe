"""GaLore AdamW: Adam whose moments live in a low-rank projection of each targeted weight's gradient
(Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection").

For a weight of shape m x n (m <= n after transposing the picture), every `update_interval` steps an SVD
of the current gradient G gives P, its top `rank` left singular vectors on the shorter side. Adam then
runs on R = P^T G (rank x n) and the update P N, times `scale`, is applied to the full weight. The state
per matrix is the projector (m x rank) plus two rank x n moments instead of two m x n moments.

Written here rather than taken from PyPI: `galore-torch` 1.0 (the authors' package, unchanged since
March 2024) imports bitsandbytes at package import and requires it, a GPU-oriented dependency lmforge
does not otherwise need; torch has no GaLore optimizer of its own.

Parameter groups without a `rank` key get plain AdamW (decoupled weight decay), matching
torch.optim.AdamW's arithmetic.
"""

from __future__ import annotations

import torch


class GaLoreAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        state["step"] += 1
        step = int(state["step"].item())
        grad = param.grad
        projected = "rank" in group and param.dim() == 2
        if projected:
            grad = self._project(state, grad, group, step)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        update = exp_avg / bias1 / (exp_avg_sq / bias2).sqrt().add_(group["eps"])
        if projected:
            projector = state["projector"]
            left = param.shape[0] <= param.shape[1]
            update = (projector @ update if left else update @ projector.T) * group["scale"]
        # Decoupled weight decay on the full weight, as AdamW does.
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(update, alpha=-group["lr"])

    @staticmethod
    def _project(state: dict, grad: torch.Tensor, group: dict, step: int) -> torch.Tensor:
        """The gradient in the low-rank basis, recomputing the basis every update_interval steps. The
        moments are kept across a basis change, as in the paper."""
        rows, cols = grad.shape
        rank = min(group["rank"], rows, cols)
        if "projector" not in state or (step - 1) % group["update_interval"] == 0:
            u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
            # The projector sits on the shorter side, so the moments are rank x (longer side).
            state["projector"] = (u[:, :rank] if rows <= cols else vh[:rank].T).to(grad.dtype).contiguous()
        projector = state["projector"]
        return projector.T @ grad if rows <= cols else grad @ projector


def galore_state_numel(rows: int, cols: int, rank: int) -> int:
    """Floats of optimizer state GaLore keeps for one rows x cols matrix: the projector and two moments."""
    short, long = sorted((rows, cols))
    rank = min(rank, short)
    return short * rank + 2 * rank * long


def adamw_state_numel(numel: int) -> int:
    return 2 * numel
