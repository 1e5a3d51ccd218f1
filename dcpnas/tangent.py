"""Tangent propagation (method §4) and its second-order term (method §5).

The Child's architecture gradient (Eq. 4.33) is ``-g + lam * H_G v`` with ``g = dG/d alpha_hat``,
``v = dD/dg`` and ``H_G`` the Hessian of the agreement G = -KL(p_parent || q_child). ``H_G v`` is
computed either with the generalised Gauss-Newton matrix (``H_G ~ -F``, one forward-mode JVP
and one backward, no second-order autograd) or exactly by double backprop (the ablation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD

from dcpnas.losses import kl_to_teacher

Reduce = Callable[[Tensor], Tensor]
DISCREPANCIES = ("fro", "l1", "cos")
HESSIANS = ("ggn", "exact")


def _identity(t: Tensor) -> Tensor:
    return t


def parent_tangent(parent: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """T = d f^P / d alpha = -dCE/d alpha (Eq. 4.29, detached), the Parent's soft targets, and CE."""
    logits = parent(x)
    ce = F.cross_entropy(logits, y)
    (grad,) = torch.autograd.grad(ce, parent.alpha)
    return -grad, torch.softmax(logits.detach(), dim=-1), ce.detach()


def discrepancy(g: Tensor, t: Tensor, kind: str = "fro") -> tuple[Tensor, Tensor]:
    """D(alpha_hat) between the Child's and Parent's architecture gradients (Eq. 4.31) and dD/dg."""
    d = g - t
    if kind == "fro":
        return d.pow(2).sum(), 2 * d
    if kind == "l1":
        return d.abs().sum(), torch.sign(d)
    if kind == "cos":
        gn, tn = g.norm(), t.norm()
        dot = (g * t).sum()
        return 1 - dot / (gn * tn), -t / (gn * tn) + dot * g / (gn**3 * tn)
    raise ValueError(f"unknown discrepancy '{kind}'; known: {', '.join(DISCREPANCIES)}")


def logits_jvp(model: nn.Module, x: Tensor, v: Tensor) -> Tensor:
    """J v = d logits / d alpha . v by forward-mode AD (binary surrogates define matching JVPs)."""
    with torch.no_grad(), fwAD.dual_level():
        out = model(x, alpha=fwAD.make_dual(model.alpha.detach(), v))
        return fwAD.unpack_dual(out).tangent


def ggn_vector_product(model: nn.Module, x: Tensor, logits: Tensor, v: Tensor) -> Tensor:
    """F v = J^T H_z J v for the batch-mean softmax KL/CE, H_z = (diag(q) - q q^T) / B (method §5.2).

    ``logits`` must be ``model(x)`` with its graph alive; the model must be in a state where a
    second forward computes the same function (see ``frozen_bn_stats``).
    """
    jv = logits_jvp(model, x, v)
    q = torch.softmax(logits.detach(), dim=-1)
    s = (q * jv - q * (q * jv).sum(-1, keepdim=True)) / logits.shape[0]
    (fv,) = torch.autograd.grad(logits, model.alpha, grad_outputs=s)
    return fv


@dataclass
class ArchGradient:
    """The Child's architecture gradient (to descend) and the terms that produced it."""

    grad: Tensor
    g: Tensor
    kl: Tensor  # detached scalars, left on the device (reading them would stall it)
    discrepancy: Tensor


def child_arch_gradient(
    child: nn.Module,
    x: Tensor,
    teacher_probs: Tensor,
    tangent: Tensor,
    lam: float,
    kind: str = "fro",
    hessian: str = "ggn",
    reduce: Reduce = _identity,
) -> ArchGradient:
    """grad of -G + lam * D w.r.t. alpha_hat (Eq. 4.33) on one batch.

    ``reduce`` averages a tensor across data-parallel ranks; it is applied to g (so that D is
    taken between global gradients) and to H_G v, so every rank ends with the same gradient.
    With ``lam == 0`` only the first-order term is computed.
    """
    if hessian not in HESSIANS:
        raise ValueError(f"unknown hessian '{hessian}'; known: {', '.join(HESSIANS)}")
    exact = lam > 0 and hessian == "exact"
    logits = child(x)
    kl = kl_to_teacher(logits, teacher_probs)
    (dkl,) = torch.autograd.grad(kl, child.alpha, create_graph=exact, retain_graph=lam > 0)
    g = reduce(-dkl.detach())
    if lam == 0:
        return ArchGradient(-g, g, kl.detach(), torch.zeros_like(kl.detach()))
    d, v = discrepancy(g, tangent, kind)
    if exact:
        # H_G v = d/d alpha <dG/d alpha, v>, by double backprop through the whole Child.
        (hv,) = torch.autograd.grad(-dkl, child.alpha, grad_outputs=v)
    else:
        hv = -ggn_vector_product(child, x, logits, v)
    return ArchGradient(-g + lam * reduce(hv), g, kl.detach(), d.detach())
