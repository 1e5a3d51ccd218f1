"""Decoupled optimisation: back-tracking the architecture step with a learnable psi (spec §6).

After the vanilla step alpha^{t+1}, ops whose weight norm ranks above ``tau`` within their
edge are moved by ``eta * psi o alpha^t`` (Eqs. 4.50-4.52); psi >= 0 is learned by its
hypergradient with an absolute-value projection (Eq. 4.51).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def percentile_ranks(norms: Tensor) -> Tensor:
    """Within-edge percentile of each op's norm in [0, 1] (largest -> 1; ties share their mean rank)."""
    less = (norms.unsqueeze(-1) > norms.unsqueeze(-2)).sum(-1)
    equal = (norms.unsqueeze(-1) == norms.unsqueeze(-2)).sum(-1)
    return (less + (equal - 1) / 2) / (norms.shape[-1] - 1)


class Backtracker(nn.Module):
    """The projection P(a, b) = a + eta * B o (psi o b) and psi's update, with its state in buffers."""

    def __init__(
        self,
        alpha_shape: tuple[int, ...],
        tau: float = 0.5,
        direction: str = "large",
        granularity: str = "edge",
        eta2: float = 1.0,
        psi_lr: float | None = None,
    ) -> None:
        super().__init__()
        if direction not in ("large", "small"):
            raise ValueError(f"unknown backtrack direction '{direction}'; known: large, small")
        if granularity not in ("edge", "op"):
            raise ValueError(f"unknown psi granularity '{granularity}'; known: edge, op")
        self.tau, self.direction, self.granularity = tau, direction, granularity
        self.eta2, self.psi_lr = eta2, psi_lr
        psi_shape = (*alpha_shape[:-1], 1) if granularity == "edge" else tuple(alpha_shape)
        self.register_buffer("psi", torch.zeros(psi_shape))
        self.register_buffer("prev_mask", torch.zeros(alpha_shape))
        self.register_buffer("prev_alpha", torch.zeros(alpha_shape))
        self.register_buffer("prev_eta", torch.zeros(()))

    def reset(self) -> None:
        """Forget the last projection (alpha was replaced from elsewhere, e.g. inherited)."""
        self.prev_eta.zero_()

    def mask(self, norms: Tensor) -> Tensor:
        r = percentile_ranks(norms)
        return ((r > self.tau) if self.direction == "large" else ((1 - r) > self.tau)).to(self.psi.dtype)

    def update_psi(self, grad: Tensor, lr: float) -> None:
        """psi <- |psi - eta_psi dL/dpsi| with dL/dpsi = eta * B o alpha^t o dL/dalpha (at the new point)."""
        if self.prev_eta.item() == 0:
            return
        h = self.prev_eta * self.prev_mask * self.prev_alpha * grad
        h = h.sum(-1, keepdim=True) if self.granularity == "edge" else h
        self.psi.copy_((self.psi - (self.psi_lr or lr) * h).abs())

    @torch.no_grad()
    def project(self, alpha: Tensor, alpha_old: Tensor, norms: Tensor, lr: float) -> None:
        """alpha <- alpha + eta * B o (psi o alpha_old), in place; remembers what psi's update needs."""
        mask = self.mask(norms.to(self.psi.dtype))
        eta = lr * self.eta2
        alpha.add_(eta * mask * (self.psi * alpha_old))
        self.prev_mask.copy_(mask)
        self.prev_alpha.copy_(alpha_old)
        self.prev_eta.fill_(eta)
