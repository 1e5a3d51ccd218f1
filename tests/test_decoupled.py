"""Decoupled optimisation: the back-tracking projection and psi's update (method §6.4)."""

from __future__ import annotations

import torch

from dcpnas.decoupled import Backtracker, percentile_ranks
from dcpnas.ops import OpContext, create_op
from dcpnas.supernet import op_weight_norm


def test_percentile_ranks_order_and_ties() -> None:
    r = percentile_ranks(torch.tensor([[3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 5.0, 0.0]]))
    torch.testing.assert_close(r[0], torch.tensor([1.0, 1 / 3, 2 / 3, 0.0]))
    torch.testing.assert_close(r[1], torch.tensor([0.5, 0.5, 1.0, 0.0]))


def test_projection_moves_only_large_norm_ops_by_eta_psi_alpha_old() -> None:
    bt = Backtracker((1, 2, 4), tau=0.5, rule="spec").double()
    bt.psi.copy_(torch.tensor([[[2.0], [0.5]]], dtype=torch.float64))
    alpha_old = torch.arange(1.0, 9.0, dtype=torch.float64).view(1, 2, 4)
    alpha = alpha_old.clone() + 1
    norms = torch.tensor([[[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64)
    bt.project(alpha, alpha_old, norms, lr=0.1)
    mask = torch.tensor([[[1.0, 1, 0, 0], [0, 0, 1, 1]]], dtype=torch.float64)
    torch.testing.assert_close(alpha, alpha_old + 1 + 0.1 * mask * bt.psi * alpha_old)


def test_small_direction_selects_the_other_ops() -> None:
    bt = Backtracker((1, 1, 4), tau=0.5, direction="small")
    torch.testing.assert_close(bt.mask(torch.tensor([[[4.0, 3.0, 2.0, 1.0]]])), torch.tensor([[[0.0, 0, 1, 1]]]))


def test_psi_hypergradient_with_absolute_projection() -> None:
    bt = Backtracker((1, 1, 2), tau=0.0, rule="spec").double()
    alpha_old = torch.tensor([[[1.0, -2.0]]], dtype=torch.float64)
    bt.update_psi(torch.ones_like(alpha_old), lr=0.5)  # no projection yet: psi stays 0
    assert bt.psi.abs().sum() == 0
    bt.project(alpha_old.clone(), alpha_old, torch.tensor([[[1.0, 2.0]]], dtype=torch.float64), lr=0.1)
    grad = torch.tensor([[[3.0, 1.0]]], dtype=torch.float64)
    bt.update_psi(grad, lr=0.5)
    # only op 1 (larger norm) is back-tracked: dL/dpsi = eta * alpha_old[1] * grad[1] = 0.1 * -2 * 1
    torch.testing.assert_close(bt.psi, torch.tensor([[[abs(0 - 0.5 * (0.1 * -2.0 * 1.0))]]], dtype=torch.float64))
    bt.reset()
    before = bt.psi.clone()
    bt.update_psi(grad, lr=0.5)
    torch.testing.assert_close(bt.psi, before)


def test_scaled_rule_shifts_by_psi_times_alpha_old_over_its_edge_rms() -> None:
    bt = Backtracker((1, 2, 4), tau=0.5, psi_init=0.5).double()
    assert torch.equal(bt.psi, torch.full((1, 2, 1), 0.5, dtype=torch.float64))
    alpha_old = torch.tensor([[[1.0, -2.0, 3.0, 0.5], [1e-3, -1e-3, 2e-3, 0.0]]], dtype=torch.float64)
    norms = torch.tensor([[[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64)
    alpha = alpha_old + 1
    shift = bt.project(alpha, alpha_old, norms, lr=0.1)
    rms = alpha_old.pow(2).mean(-1, keepdim=True).sqrt()
    mask = torch.tensor([[[1.0, 1, 0, 0], [0, 0, 1, 1]]], dtype=torch.float64)
    torch.testing.assert_close(shift, 0.1 * mask * 0.5 * alpha_old / rms)
    torch.testing.assert_close(alpha, alpha_old + 1 + shift)
    # the shift's size does not depend on alpha's scale: both edges move by O(eta * psi)
    assert shift[0, 1].abs().max() > 0.1 * 0.5 * 0.5


def test_scaled_rule_steps_psi_by_psi_lr_against_the_hypergradient_sign() -> None:
    bt = Backtracker((1, 1, 2), tau=0.0, psi_init=0.5, psi_lr=0.2).double()
    alpha_old = torch.tensor([[[1.0, -2.0]]], dtype=torch.float64)
    bt.update_psi(torch.ones_like(alpha_old), lr=0.1)  # no projection yet: nothing to learn from
    assert bt.psi.item() == 0.5 and bt.psi_steps.item() == 0 and bt.psi_sq.abs().sum() == 0
    bt.project(alpha_old.clone(), alpha_old, torch.tensor([[[1.0, 2.0]]], dtype=torch.float64), lr=0.1)
    # dL/dpsi = eta * alpha_old[1] / rms * grad[1] < 0 -> psi grows by exactly psi_lr (first normalised step)
    bt.update_psi(torch.tensor([[[3.0, 1.0]]], dtype=torch.float64), lr=0.1)
    torch.testing.assert_close(bt.psi, torch.tensor([[[0.7]]], dtype=torch.float64))
    bt.project(alpha_old.clone(), alpha_old, torch.tensor([[[1.0, 2.0]]], dtype=torch.float64), lr=0.1)
    bt.update_psi(torch.tensor([[[0.0, -1.0]]], dtype=torch.float64), lr=0.1)  # same |h|, other sign
    torch.testing.assert_close(bt.psi, torch.tensor([[[0.7 - 0.2]]], dtype=torch.float64))
    bt.reset()
    bt.update_psi(torch.tensor([[[0.0, 5.0]]], dtype=torch.float64), lr=0.1)
    torch.testing.assert_close(bt.psi, torch.tensor([[[0.5]]], dtype=torch.float64))


def test_op_weight_norms_follow_the_book() -> None:
    ctx = OpContext(search=True)
    assert op_weight_norm(create_op("none", 4, 1, ctx)) == 0.0
    assert op_weight_norm(create_op("skip_connect", 4, 1, ctx)) == 1.0
    assert op_weight_norm(create_op("max_pool_3x3", 4, 1, ctx)) == 1 / 9
    sep = create_op("sep_conv_3x3", 4, 1, ctx)
    expected = sum(m.weight.pow(2).sum().item() for m in sep.modules() if isinstance(m, torch.nn.Conv2d))
    assert abs(op_weight_norm(sep) - expected) < 1e-6
