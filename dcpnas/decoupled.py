"""Decoupled optimisation: back-tracking the architecture step with a learnable psi (method §6).

After the vanilla step alpha^{t+1}, ops whose weight norm ranks above ``tau`` within their
edge are moved by ``eta * psi o alpha^t`` (Eqs. 4.50-4.52); psi >= 0 is learned by its
hypergradient with an absolute-value projection (Eq. 4.51).

Two rules for psi (docs/method.md, "Decoupled optimisation: the scaled rule"):

- ``scaled`` (default): psi_e = psi~_e / rms_e(alpha^t), i.e. the shift is ``eta * psi~ * alpha^t / rms``
  and psi~ is a dimensionless fraction of the architecture learning rate (about an Adam step). psi~
  starts at ``psi_init`` and follows its hypergradient with an RMS-normalised step of size ``psi_lr``.
  Same family of projections as the book (a non-negative per-edge multiple of alpha^t), reparametrised.
- ``spec``: method §6.4 literally: psi starts at 0 and takes plain hypergradient steps. The hypergradient
  carries eta twice, so psi stays ~1e-10 and the back-tracking moves nothing measurable.

Every update is written with tensor ops only (no host syncs): the first step after a reset is
masked with ``torch.where`` instead of an ``if``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PSI_RULES = ("scaled", "spec")
_TINY = 1e-12


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
        rule: str = "scaled",
        psi_init: float = 0.5,
        psi_beta: float = 0.99,
    ) -> None:
        super().__init__()
        if direction not in ("large", "small"):
            raise ValueError(f"unknown backtrack direction '{direction}'; known: large, small")
        if granularity not in ("edge", "op"):
            raise ValueError(f"unknown psi granularity '{granularity}'; known: edge, op")
        if rule not in PSI_RULES:
            raise ValueError(f"unknown psi rule '{rule}'; known: {', '.join(PSI_RULES)}")
        self.tau, self.direction, self.granularity = tau, direction, granularity
        self.eta2, self.psi_lr, self.rule, self.psi_beta = eta2, psi_lr, rule, psi_beta
        self.psi_init = psi_init if rule == "scaled" else 0.0
        psi_shape = (*alpha_shape[:-1], 1) if granularity == "edge" else tuple(alpha_shape)
        self.register_buffer("psi", torch.full(psi_shape, self.psi_init))
        self.register_buffer("psi_sq", torch.zeros(psi_shape))  # scaled rule: EMA of the squared hypergradient
        self.register_buffer("psi_steps", torch.zeros(()))
        self.register_buffer("prev_mask", torch.zeros(alpha_shape))
        self.register_buffer("prev_base", torch.zeros(alpha_shape))  # what psi multiplies: alpha^t (scaled: / rms)
        self.register_buffer("prev_eta", torch.zeros(()))

    def reset(self) -> None:
        """Forget the last projection (alpha was replaced from elsewhere, e.g. inherited)."""
        self.prev_eta.zero_()

    def mask(self, norms: Tensor) -> Tensor:
        r = percentile_ranks(norms)
        return ((r > self.tau) if self.direction == "large" else ((1 - r) > self.tau)).to(self.psi.dtype)

    def base(self, alpha_old: Tensor) -> Tensor:
        """What psi multiplies: alpha^t itself (spec), or alpha^t over its per-edge RMS (scaled)."""
        if self.rule == "spec":
            return alpha_old
        return alpha_old / alpha_old.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(_TINY)

    @torch.no_grad()
    def update_psi(self, grad: Tensor, lr: float) -> None:
        """psi <- |psi - eta_psi dL/dpsi|, dL/dpsi = eta * B o base o dL/dalpha at the new point (no-op after reset)."""
        h = self.prev_eta * self.prev_mask * self.prev_base * grad
        h = h.sum(-1, keepdim=True) if self.granularity == "edge" else h
        rate = self.psi_lr or lr
        active = self.prev_eta > 0
        if self.rule == "spec":
            new_psi = (self.psi - rate * h).abs()
        else:  # RMS-normalised hypergradient step (bias-corrected EMA, as in RMSprop/Adam's second moment)
            steps = self.psi_steps + 1
            sq = self.psi_beta * self.psi_sq + (1 - self.psi_beta) * h.pow(2)
            rms = (sq / (1 - self.psi_beta**steps)).sqrt()
            new_psi = (self.psi - rate * h / (rms + _TINY)).abs()
            self.psi_sq.copy_(torch.where(active, sq, self.psi_sq))
            self.psi_steps.copy_(torch.where(active, steps, self.psi_steps))
        self.psi.copy_(torch.where(active, new_psi, self.psi))

    @torch.no_grad()
    def project(self, alpha: Tensor, alpha_old: Tensor, norms: Tensor, lr: float) -> Tensor:
        """alpha <- alpha + eta * B o (psi o base(alpha_old)), in place; returns the shift (for the metrics)."""
        mask = self.mask(norms.to(self.psi.dtype))
        base = self.base(alpha_old)
        eta = lr * self.eta2
        shift = eta * mask * (self.psi * base)
        alpha.add_(shift)
        self.prev_mask.copy_(mask)
        self.prev_base.copy_(base)
        self.prev_eta.fill_(eta)
        return shift


def backtrack_ratio(shift: Tensor, vanilla: Tensor, mask: Tensor) -> Tensor:
    """||shift|| / ||vanilla step|| over the back-tracked ops: how much the projection adds to the step."""
    return shift.norm() / (vanilla * mask).norm().clamp_min(_TINY)
