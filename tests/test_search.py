"""The search loop (method §7): resume equivalence, inheritance, config refusal, the digits demo."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dcpnas.checkpoint import ResumeMismatchError, load_checkpoint, save_checkpoint
from dcpnas.search import DCPNASSearch, SearchConfig, TensorSearchData


def tiny_data(seed: int = 0) -> TensorSearchData:
    g = torch.Generator().manual_seed(seed)

    def split(n: int):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
        return x, y

    return TensorSearchData(split(24), split(24), split(12), batch_size=8, seed=seed)


def snapshot(s: DCPNASSearch) -> dict[str, torch.Tensor]:
    return {
        "parent_alpha": s.parent.alpha.detach().clone(),
        "child_alpha": s.child.alpha.detach().clone(),
        "psi_child": s.backtrack["child"].psi.clone(),
        "psi_parent": s.backtrack["parent"].psi.clone(),
    }


@pytest.fixture(scope="module")
def uninterrupted(tiny_config: Callable[..., SearchConfig]) -> DCPNASSearch:
    full = DCPNASSearch(tiny_config())
    full.run(tiny_data())
    return full


@pytest.mark.parametrize(
    "stop_after",
    [  # warm-up child phase, arch-step parent phase, phase boundary, arch-step child phase
        pytest.param(4, marks=pytest.mark.slow),
        7,
        pytest.param(9, marks=pytest.mark.slow),
        11,
    ],
)
def test_resume_gives_bitwise_identical_alphas(
    tmp_path, uninterrupted: DCPNASSearch, stop_after: int, tiny_config: Callable[..., SearchConfig]
) -> None:
    cfg = tiny_config()
    full = uninterrupted
    interrupted = DCPNASSearch(cfg)
    interrupted.run(tiny_data(), max_steps=stop_after)
    assert interrupted.global_step == stop_after
    path = save_checkpoint(interrupted.state_dict(), tmp_path / "ckpt.pt")
    torch.manual_seed(12345)  # a different global RNG state must not matter after loading
    resumed = DCPNASSearch(cfg)
    resumed.load_state_dict(load_checkpoint(path))
    resumed.run(tiny_data())
    a, b = snapshot(full), snapshot(resumed)
    assert a["psi_child"].abs().sum() > 0, "the test must exercise back-tracking"
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert full.genotype().hash == resumed.genotype().hash
    assert [h["genotype_hash"] for h in full.history] == [h["genotype_hash"] for h in resumed.history]


def test_resume_refuses_a_different_config(tmp_path, tiny_config: Callable[..., SearchConfig]) -> None:
    s = DCPNASSearch(tiny_config())
    path = save_checkpoint(s.state_dict(), tmp_path / "ckpt.pt")
    other = DCPNASSearch(tiny_config(lam=0.5))
    with pytest.raises(ResumeMismatchError, match=r"lam: checkpoint=0.005 now=0.5"):
        other.load_state_dict(load_checkpoint(path))


def test_architecture_is_inherited_both_ways_and_frozen_in_warmup(tiny_config: Callable[..., SearchConfig]) -> None:
    s = DCPNASSearch(tiny_config(epochs=2, warmup_epochs=1))
    start = s.child.alpha.detach().clone()
    s.run(tiny_data(), max_steps=6)  # the whole first (warm-up) epoch
    assert torch.equal(s.child.alpha, start) and torch.equal(s.parent.alpha, start)
    s.run(tiny_data(), max_steps=3)  # epoch 2, parent phase; then the child phase is entered
    assert not torch.equal(s.parent.alpha, start)
    assert torch.equal(s.child.alpha, s.parent.alpha)  # alpha_hat <- alpha on entering the child phase
    parent_alpha = s.parent.alpha.detach().clone()
    s.run(tiny_data(), max_steps=1)  # one child step moves alpha_hat only
    assert torch.equal(s.parent.alpha, parent_alpha)
    assert not torch.equal(s.child.alpha, parent_alpha)
    s.run(tiny_data())
    assert s.epoch == 2 and len(s.history) == 2
    assert "child/discrepancy" in s.history[1] and "child/discrepancy" not in s.history[0]


@pytest.mark.slow
def test_phase_tangent_and_exact_hessian_variants_run(tiny_config: Callable[..., SearchConfig]) -> None:
    for overrides in ({"tangent": "phase"}, {"hessian": "exact"}, {"discrepancy": "cos", "decoupled": False}):
        s = DCPNASSearch(tiny_config(**overrides))
        g = s.run(tiny_data())
        assert g.validate() and torch.isfinite(s.child.alpha).all(), overrides


def test_config_errors_name_the_field(tiny_config: Callable[..., SearchConfig]) -> None:
    with pytest.raises(ValueError, match=r"search\.hessian: 'hvp' is not one of ggn, exact"):
        tiny_config(hessian="hvp")
    with pytest.raises(ValueError, match=r"search.warmup_epochs: 5 must lie in \[0, epochs=2\]"):
        tiny_config(warmup_epochs=5)
    with pytest.raises(KeyError, match="unknown search space 'nope'"):
        tiny_config(space="nope")


def test_divergence_is_reported(tiny_config: Callable[..., SearchConfig]) -> None:
    from dcpnas.search import DivergedError

    s = DCPNASSearch(tiny_config(parent_lr=float("nan")))
    with pytest.raises(DivergedError, match="parent loss is not finite"):
        s.run(tiny_data())
