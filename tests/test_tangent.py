"""Tangent propagation and the second-order term (method §4, §5), against exact references."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from dcpnas.binary import CHILD, REAL
from dcpnas.losses import kl_to_teacher
from dcpnas.ops import OpContext
from dcpnas.spaces import get_space
from dcpnas.supernet import SuperNet, frozen_bn_stats
from dcpnas.tangent import child_arch_gradient, discrepancy, ggn_vector_product, parent_tangent


def tiny_supernet(binarize, seed: int = 0) -> SuperNet:
    torch.manual_seed(seed)
    ctx = OpContext(binarize=binarize, affine=False, search=True)
    net = SuperNet(get_space("dcpnas_3x3"), num_classes=3, init_channels=4, layers=3, ctx=ctx, alpha_init_std=0.3)
    return net.double().train()


def batch(seed: int = 1, n: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(n, 3, generator=g, dtype=torch.float64) * 2, -1)
    return x, p, torch.randint(0, 3, (n,), generator=g)


class LinearInAlpha(nn.Module):
    """Logits z_b = M_b alpha (+ c_b): the GGN is the exact Hessian of the softmax-KL here."""

    def __init__(self, n: int, classes: int, shape: tuple[int, ...]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.alpha = nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64))
        self.m = torch.randn(n, classes, self.alpha.numel(), generator=g, dtype=torch.float64)
        self.c = torch.randn(n, classes, generator=g, dtype=torch.float64)

    def forward(self, x: Tensor, alpha: Tensor | None = None) -> Tensor:
        a = (self.alpha if alpha is None else alpha).flatten()
        return torch.einsum("bnp,p->bn", self.m[: len(x)], a) + self.c[: len(x)]


def explicit_ggn(model: nn.Module, x: Tensor) -> Tensor:
    """F = J^T H_z J from the explicit Jacobian (backward mode) and the softmax-KL logit Hessian."""
    alpha = model.alpha.detach().clone()
    jac = torch.autograd.functional.jacobian(lambda a: model(x, alpha=a), alpha)  # [B, N, *alpha]
    b, n = jac.shape[:2]
    jac = jac.reshape(b, n, -1)
    q = torch.softmax(model(x, alpha=alpha), -1).detach()
    hz = (torch.diag_embed(q) - q.unsqueeze(-1) * q.unsqueeze(-2)) / b
    return torch.einsum("bnp,bnm,bmq->pq", jac, hz, jac)


@pytest.mark.parametrize("binarize", [REAL, CHILD], ids=["parent", "child"])
def test_ggn_vector_product_matches_explicit_jacobians(binarize) -> None:
    net = tiny_supernet(binarize)
    x, _, _ = batch()
    v = torch.randn_like(net.alpha)
    with frozen_bn_stats(net):
        fv = ggn_vector_product(net, x, net(x), v)
        reference = (explicit_ggn(net, x) @ v.flatten()).view_as(v)
    rel = (fv - reference).norm() / reference.norm()
    assert reference.norm() > 0
    assert rel < 1e-4, rel


def test_ggn_equals_exact_hessian_when_logits_are_linear_in_alpha() -> None:
    model = LinearInAlpha(6, 5, (2, 3, 4))
    x = torch.zeros(6, 1)
    p = torch.softmax(torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)), -1)
    v = torch.randn_like(model.alpha)
    logits = model(x)
    fv = ggn_vector_product(model, x, logits, v)
    (g,) = torch.autograd.grad(kl_to_teacher(model(x), p), model.alpha, create_graph=True)
    (hv,) = torch.autograd.grad(g, model.alpha, grad_outputs=v)
    torch.testing.assert_close(fv, hv, rtol=1e-10, atol=1e-12)


def double_backprop_objective_grad(child: nn.Module, x: Tensor, p: Tensor, t: Tensor, lam: float, kind: str) -> Tensor:
    """Autograd of -G + lam * D(dG/dalpha) with D built from a create_graph gradient."""
    neg_g = kl_to_teacher(child(x), p)  # -G
    (dneg,) = torch.autograd.grad(neg_g, child.alpha, create_graph=True)
    d, _ = discrepancy(-dneg, t, kind)
    (grad,) = torch.autograd.grad(neg_g + lam * d, child.alpha)
    return grad


@pytest.mark.parametrize("kind", ["fro", "l1", "cos"])
def test_exact_child_arch_gradient_equals_double_backprop(kind: str) -> None:
    child = tiny_supernet(CHILD)
    x, p, _ = batch()
    t = torch.randn_like(child.alpha) * 0.05
    with frozen_bn_stats(child):
        ours = child_arch_gradient(child, x, p, t, lam=0.7, kind=kind, hessian="exact").grad
        reference = double_backprop_objective_grad(child, x, p, t, 0.7, kind)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["fro", "l1", "cos"])
def test_ggn_child_arch_gradient_is_exact_for_linear_logits(kind: str) -> None:
    model = LinearInAlpha(6, 5, (2, 3, 4))
    x = torch.zeros(6, 1)
    p = torch.softmax(torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5)), -1)
    t = torch.randn_like(model.alpha) * 0.1
    ggn = child_arch_gradient(model, x, p, t, lam=0.3, kind=kind, hessian="ggn").grad
    torch.testing.assert_close(ggn, double_backprop_objective_grad(model, x, p, t, 0.3, kind), rtol=1e-9, atol=1e-12)


def test_ggn_second_order_term_points_like_the_exact_hessian_on_real_supernet() -> None:
    """The lam * H_G v term alone, GGN vs double backprop: +F (a flipped sign) gives cos ~ -1, first order only 0.

    The whole gradient -g + lam H v is dominated by -g, so comparing it would pass for both mistakes. Near
    agreement between Child and teacher (p ~ q) the GGN is the Hessian's dominant part (method §5.2).
    """
    net = tiny_supernet(REAL)
    x, _, _ = batch(n=8)
    with torch.no_grad(), frozen_bn_stats(net):
        q = torch.softmax(net(x), -1)
    p = torch.softmax(
        q.log() + 0.1 * torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(4)), -1
    )
    t = torch.randn_like(net.alpha) * 0.05
    with frozen_bn_stats(net):
        first = child_arch_gradient(net, x, p, t, lam=0.0).grad
        ggn = child_arch_gradient(net, x, p, t, lam=1.0, hessian="ggn").grad - first
        exact = child_arch_gradient(net, x, p, t, lam=1.0, hessian="exact").grad - first
    assert ggn.norm() > 0.05 * first.norm(), "the second-order term must be large enough to tell variants apart"
    cos = torch.nn.functional.cosine_similarity(ggn.flatten(), exact.flatten(), dim=0)
    assert cos > 0.9, cos


def count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_lambda_zero_does_first_order_work_only() -> None:
    child = tiny_supernet(CHILD)
    x, p, _ = batch()
    calls = count_forwards(child)
    with frozen_bn_stats(child):
        out = child_arch_gradient(child, x, p, torch.randn_like(child.alpha), lam=0.0)
        assert calls[0] == 1
        (dkl,) = torch.autograd.grad(kl_to_teacher(child(x), p), child.alpha)
    torch.testing.assert_close(out.grad, dkl)
    assert out.discrepancy == 0.0
    calls[0] = 0
    with frozen_bn_stats(child):
        child_arch_gradient(child, x, p, torch.randn_like(child.alpha), lam=0.1)
    assert calls[0] == 2  # the graph-carrying forward and one forward-mode JVP


def test_reduce_hook_averages_g_and_second_order_term() -> None:
    child = tiny_supernet(CHILD)
    x, p, _ = batch()
    t = torch.randn_like(child.alpha) * 0.05
    seen: list[Tensor] = []

    def reduce(v: Tensor) -> Tensor:
        seen.append(v)
        return v * 0.5

    with frozen_bn_stats(child):
        out = child_arch_gradient(child, x, p, t, lam=0.2, reduce=reduce)
    assert len(seen) == 2
    torch.testing.assert_close(out.g, 0.5 * seen[0])


def test_parent_tangent_is_minus_ce_gradient() -> None:
    parent = tiny_supernet(REAL)
    x, _, y = batch()
    with frozen_bn_stats(parent):
        t, probs, ce = parent_tangent(parent, x, y)
        loss = torch.nn.functional.cross_entropy(parent(x), y)
        (grad,) = torch.autograd.grad(loss, parent.alpha)
    torch.testing.assert_close(t, -grad)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(y), dtype=torch.float64))
    assert not t.requires_grad and ce.item() == pytest.approx(loss.item())


def test_discrepancy_derivatives_match_autograd() -> None:
    g = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 3, dtype=torch.float64)
    for kind in ("fro", "l1", "cos"):
        d, v = discrepancy(g, t, kind)
        (auto,) = torch.autograd.grad(d, g)
        torch.testing.assert_close(v, auto, msg=kind)
    with pytest.raises(ValueError, match="unknown discrepancy 'l3'"):
        discrepancy(g, t, "l3")
