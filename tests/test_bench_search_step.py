"""bench/search_step.py: the DARTS reference steps are right, and every variant runs (tiny config)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from bench_scripts import load_bench
from torch.func import functional_call

from dcpnas.search import DCPNASSearch
from dcpnas.supernet import SuperNet, frozen_bn_stats

bench = load_bench("search_step")
TINY = dict(channels=4, layers=3, space="dcpnas_3x3")
Batch = tuple[torch.Tensor, torch.Tensor]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny ops gain nothing from a second thread and lose a lot to it on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_parent() -> SuperNet:
    cfg = bench.search_config(**TINY)
    return bench.real_supernet(cfg).double().train()


def unrolled_reference(model: SuperNet, train: Batch, val: Batch, xi: float, through_step: bool = True) -> torch.Tensor:
    """d L_val(w', alpha) / d alpha, w' = w - xi dL_train/dw, by autograd (create_graph) through the virtual step.

    ``through_step=False`` holds w' fixed: only the direct term, without DARTS' Hessian term.
    """
    (xt, yt), (xv, yv) = train, val
    weights = {n: p for n, p in model.named_parameters() if n != "alpha"}
    with frozen_bn_stats(model):
        loss_t = F.cross_entropy(functional_call(model, weights, (xt,)), yt)
        grads = torch.autograd.grad(loss_t, list(weights.values()), create_graph=through_step)
        unrolled = {n: p - xi * g for (n, p), g in zip(weights.items(), grads)}
        loss_v = F.cross_entropy(functional_call(model, unrolled, (xv,)), yv)
        (grad,) = torch.autograd.grad(loss_v, model.alpha)
    return grad


def test_darts_second_order_gradient_matches_autograd_through_the_unrolled_step() -> None:
    model = tiny_parent()
    train, val = bench.make_batches(4, 8, dtype=torch.float64)
    xi = 0.01
    before = [p.detach().clone() for p in model.parameters()]
    # DARTS' r = 0.01 is a numerical choice; this tiny batch-4 net is so curved along dL_val/dw that the
    # central difference only converges below r ~ 1e-5, so the formula is checked with r = 1e-6.
    ours = bench.unrolled_arch_grad(model, train, val, xi, r=1e-6)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b), "the virtual and perturbed weights were not undone"
    reference = unrolled_reference(model, train, val, xi)
    direct = unrolled_reference(model, train, val, xi, through_step=False)
    assert (reference - direct).norm() > 0.05 * reference.norm()  # the Hessian term matters here
    assert (ours - reference).norm() < 1e-6 * reference.norm(), (ours - reference).norm() / reference.norm()


def test_first_order_gradient_is_the_validation_gradient() -> None:
    model = tiny_parent()
    _, val = bench.make_batches(4, 8, dtype=torch.float64)
    with frozen_bn_stats(model):
        (reference,) = torch.autograd.grad(F.cross_entropy(model(val[0]), val[1]), model.alpha)
    torch.testing.assert_close(bench.first_order_arch_grad(model, val), reference)


def test_darts_runs_on_the_parent_supernet() -> None:
    cfg = bench.search_config(**TINY)
    darts = bench.real_supernet(cfg).state_dict()
    parent = DCPNASSearch(cfg).parent.state_dict()
    assert darts.keys() == parent.keys()
    for k, v in darts.items():
        assert torch.equal(v, parent[k]), k


def test_every_variant_runs_and_is_reported() -> None:
    argv = ["--channels", "4", "--layers", "3", "--batch", "4", "--image-size", "8", "--space", "dcpnas_3x3"]
    result = bench.main([*argv, "--repeats", "1", "--warmup", "0", "--components", "--no-memory"])
    names = {*bench.VARIANTS, "dcpnas_iter", "dcpnas_iter_replay", "arch_grad_lam0", "arch_grad_ggn", "arch_grad_exact"}
    for clock in ("wall", "cpu"):
        assert set(result["summary"][clock]) == names
        assert all(s["median"] > 0 for s in result["summary"][clock].values())
        assert [g["goal"] for g in result["goals"][clock]] == [g[0] for g in bench.GOALS]
