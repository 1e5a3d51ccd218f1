"""The search loop is wired as the method says: each step's gradients against independent references.

Every optimiser in the loop takes its first step from a fresh state, so the gradient it was handed can be
read back exactly from that state: Adam's ``exp_avg`` is ``(1 - beta1) * g`` and SGD's momentum buffer is
``g`` (weight decay included in both). Each test recomputes that gradient from the method's equations with
``dcpnas.tangent`` and ``dcpnas.losses`` (themselves checked against float64 references in test_tangent.py)
and compares. A sign flipped, a term dropped (lambda, mu, the tangent) or an inheritance skipped fails here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from dcpnas.binary import reconstruction_loss
from dcpnas.losses import kl_to_teacher
from dcpnas.search import DCPNASSearch, SearchConfig, TensorSearchData
from dcpnas.supernet import frozen_bn_stats
from dcpnas.tangent import child_arch_gradient, parent_tangent

# The gradient checks' search: architecture steps from the first step, a spread-out alpha, no decoupled
# back-tracking, and a lam large enough that the second-order term shapes the Child's gradient.
GRADIENT_CHECK = dict(epochs=1, warmup_epochs=0, alpha_init_std=0.3, decoupled=False, lam=2.0, mu=0.5, seed=3)


def batches(seed: int = 0, n: int = 8) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def one() -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 3, (n,), generator=g)
        return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64) + y.view(-1, 1, 1, 1), y

    return one(), one()


def adam_grad(search: DCPNASSearch, opt: str, param: torch.Tensor) -> torch.Tensor:
    """The gradient (weight decay included) that Adam's first step was given."""
    o = search.opt[opt]
    return o.state[param]["exp_avg"] / (1 - o.param_groups[0]["betas"][0])


def arch_grad_at(net, alpha0: torch.Tensor, fn):
    """Run ``fn(net)`` with ``net.alpha`` temporarily set back to ``alpha0`` (the point the loop differentiated at)."""
    now = net.alpha.detach().clone()
    with torch.no_grad():
        net.alpha.copy_(alpha0)
    try:
        return fn(net)
    finally:
        with torch.no_grad():
            net.alpha.copy_(now)


def test_parent_step_descends_ce_on_weights_and_architecture(tiny_config: Callable[..., SearchConfig]) -> None:
    cfg = tiny_config(**GRADIENT_CHECK)
    s = DCPNASSearch(cfg, dtype=torch.float64)
    (x, y), (xa, ya) = batches()
    alpha0 = s.parent.alpha.detach().clone()
    w0 = [p.detach().clone() for p in s.parent.weight_parameters()]
    reference = DCPNASSearch(cfg, dtype=torch.float64)  # same seed: same initial weights
    ref_logits = reference.parent(x, alpha=alpha0)
    ref_w = torch.autograd.grad(F.cross_entropy(ref_logits, y), list(reference.parent.weight_parameters()))

    s.parent_step((x, y), (xa, ya))

    clip = min(1.0, cfg.grad_clip / (torch.cat([g.flatten() for g in ref_w]).norm().item() + 1e-6))
    opt = s.opt["parent_w"]
    for p, p0, g in zip(s.parent.weight_parameters(), w0, ref_w):
        expected = g * clip + cfg.parent_weight_decay * p0  # SGD's first momentum buffer
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], expected, rtol=1e-9, atol=1e-12)

    def ce_grad(net):
        with frozen_bn_stats(net):
            return -parent_tangent(net, xa, ya)[0]

    expected = arch_grad_at(s.parent, alpha0, ce_grad) + cfg.arch_weight_decay * alpha0
    torch.testing.assert_close(adam_grad(s, "parent_a", s.parent.alpha), expected, rtol=1e-9, atol=1e-12)
    assert (s.parent.alpha - alpha0).mul(expected).sum() < 0, "the Parent must descend its CE"


def test_child_step_follows_eq_4_32_and_eq_4_33(tiny_config: Callable[..., SearchConfig]) -> None:
    cfg = tiny_config(**GRADIENT_CHECK)
    s = DCPNASSearch(cfg, dtype=torch.float64)
    (x, y), (xa, ya) = batches(1)
    alpha0 = s.child.alpha.detach().clone()
    reference = DCPNASSearch(cfg, dtype=torch.float64)
    with torch.no_grad(), frozen_bn_stats(reference.parent):
        teacher = torch.softmax(reference.parent(x), -1)
    loss = kl_to_teacher(reference.child(x, alpha=alpha0), teacher) + cfg.mu * reconstruction_loss(reference.child)
    ref_w = torch.autograd.grad(loss, list(reference.child.weight_parameters()))

    s.child_step((x, y), (xa, ya))

    clip = min(1.0, cfg.grad_clip / (torch.cat([g.flatten() for g in ref_w]).norm().item() + 1e-6))
    for p, g in zip(s.child.weight_parameters(), ref_w):  # -G + mu L_R, Eq. 4.32 without D
        torch.testing.assert_close(adam_grad(s, "child_w", p), g * clip, rtol=1e-8, atol=1e-12)

    with frozen_bn_stats(s.parent):
        tangent, teacher_a, _ = parent_tangent(s.parent, xa, ya)
    assert tangent.norm() > 0

    def eq_4_33(net):
        with frozen_bn_stats(net):
            return child_arch_gradient(net, xa, teacher_a, tangent, cfg.lam, cfg.discrepancy, cfg.hessian).grad

    expected = arch_grad_at(s.child, alpha0, eq_4_33) + cfg.arch_weight_decay * alpha0
    torch.testing.assert_close(adam_grad(s, "child_a", s.child.alpha), expected, rtol=1e-8, atol=1e-12)

    # The comparison above would also pass with lam ignored if the second-order term were negligible here.
    def first_order_only(net):
        with frozen_bn_stats(net):
            return child_arch_gradient(net, xa, teacher_a, tangent, 0.0).grad

    g1 = arch_grad_at(s.child, alpha0, first_order_only) + cfg.arch_weight_decay * alpha0
    assert (expected - g1).norm() > 0.1 * g1.norm(), "lam * H v must matter at this lam"


def test_replayed_child_step_uses_what_the_parent_step_computed(tiny_config: Callable[..., SearchConfig]) -> None:
    """Teacher: the Parent before its weight step; tangent and arch targets: after it, before its arch step."""
    cfg = tiny_config(**GRADIENT_CHECK, parent_outputs="replay")
    s = DCPNASSearch(cfg, dtype=torch.float64)
    (x, y), (xa, ya) = batches(2)
    alpha0 = s.parent.alpha.detach().clone()
    with torch.no_grad(), frozen_bn_stats(s.parent):
        teacher = torch.softmax(s.parent(x), -1)
    reference = DCPNASSearch(cfg, dtype=torch.float64)  # same seed: the Child's initial weights

    s.parent_step((x, y), (xa, ya))  # Parent step 0 records; Child step 0 replays it
    with torch.no_grad(), frozen_bn_stats(s.parent):
        live_teacher = torch.softmax(s.parent(x), -1)
    assert (live_teacher - teacher).abs().max() > 1e-3, "a live teacher must differ here, or the test cannot tell"

    def targets(net):
        with frozen_bn_stats(net):
            return parent_tangent(net, xa, ya)[:2]

    tangent, teacher_a = arch_grad_at(s.parent, alpha0, targets)
    s.child_step((x, y), (xa, ya))

    loss = kl_to_teacher(reference.child(x, alpha=alpha0), teacher) + cfg.mu * reconstruction_loss(reference.child)
    ref_w = torch.autograd.grad(loss, list(reference.child.weight_parameters()))
    clip = min(1.0, cfg.grad_clip / (torch.cat([r.flatten() for r in ref_w]).norm().item() + 1e-6))
    for p, r in zip(s.child.weight_parameters(), ref_w):
        torch.testing.assert_close(adam_grad(s, "child_w", p), r * clip, rtol=1e-8, atol=1e-12)

    def eq_4_33(net):
        with frozen_bn_stats(net):
            return child_arch_gradient(net, xa, teacher_a, tangent, cfg.lam, cfg.discrepancy, cfg.hessian).grad

    expected = arch_grad_at(s.child, alpha0, eq_4_33) + cfg.arch_weight_decay * alpha0
    torch.testing.assert_close(adam_grad(s, "child_a", s.child.alpha), expected, rtol=1e-8, atol=1e-12)


def test_architecture_is_handed_over_child_to_parent_at_each_epoch(tiny_config: Callable[..., SearchConfig]) -> None:
    cfg = tiny_config(epochs=3, warmup_epochs=1, alpha_init_std=1e-3, decoupled=True, lam=5e-3, mu=0.2, seed=3)
    g = torch.Generator().manual_seed(0)
    split = lambda n: (torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))  # noqa: E731
    data = TensorSearchData(split(16), split(16), split(8), batch_size=8)
    steps = data.steps
    s = DCPNASSearch(cfg)
    s.run(data, max_steps=3 * steps)  # warm-up epoch, then epoch 2's Parent phase; the Child phase is entered
    assert (s.epoch, s.phase) == (1, "child")
    parent_end = s.parent.alpha.detach().clone()
    assert torch.equal(s.child.alpha, parent_end)  # alpha_hat <- alpha
    s.run(data, max_steps=steps)  # epoch 2's Child phase; epoch 3's Parent phase is entered
    assert (s.epoch, s.phase) == (2, "parent")
    assert not torch.equal(s.child.alpha, parent_end), "the Child phase must move alpha_hat"
    assert torch.equal(s.parent.alpha, s.child.alpha)  # alpha <- alpha_hat


def small(**overrides) -> SearchConfig:
    base = dict(space="dcpnas_3x3", num_classes=3, init_channels=4, layers=3, epochs=3, warmup_epochs=1, seed=5)
    return SearchConfig(**{**base, **overrides})


def run_alphas(**overrides) -> tuple[torch.Tensor, dict[str, float]]:
    cfg = small(**overrides)
    g = torch.Generator().manual_seed(1)

    def split(n: int):
        y = torch.randint(0, 3, (n,), generator=g)
        return torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float(), y

    s = DCPNASSearch(cfg)
    s.run(TensorSearchData(split(32), split(32), split(8), batch_size=8, seed=1))
    return s.child.alpha.detach().clone(), s.history[-1]


@pytest.mark.slow
def test_decoupled_backtracking_acts_with_the_default_rule_and_not_with_the_spec_rule() -> None:
    off, _ = run_alphas(decoupled=False)
    on, m_on = run_alphas()
    spec, m_spec = run_alphas(psi_rule="spec")
    init = SearchConfig().psi_init
    # The scaled rule's shift on the back-tracked ops is about psi_init x the vanilla Adam step.
    for phase in ("parent", "child"):
        assert 0.3 * init < m_on[f"{phase}/backtrack_ratio"] < 3 * init, m_on
        assert m_spec[f"{phase}/backtrack_ratio"] < 1e-4, m_spec  # the literal rule: psi ~ 0, nothing moves
    moved = (on - off).norm() / (off - DCPNASSearch(small()).child.alpha.detach()).norm()
    assert moved > 0.2, f"decoupled on vs off: trajectories differ by only {moved:.3g} of the step taken"
    assert (spec - off).norm() < 1e-3 * (on - off).norm()
    assert not math.isclose(m_on["alpha_entropy"], m_spec["alpha_entropy"], rel_tol=1e-6)
