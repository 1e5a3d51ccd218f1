"""``parent_outputs: replay``: the Child phase gets the Parent outputs of the Parent phase (docs/method.md §4.1)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dcpnas.binary import reconstruction_loss
from dcpnas.checkpoint import load_checkpoint, save_checkpoint
from dcpnas.losses import kl_to_teacher
from dcpnas.search import DCPNASSearch, SearchConfig, TensorSearchData
from dcpnas.supernet import frozen_bn_stats
from dcpnas.tangent import child_arch_gradient, parent_tangent

GRADIENT_CHECK = dict(epochs=1, warmup_epochs=0, alpha_init_std=0.3, decoupled=False, lam=2.0, mu=0.5, seed=3)


def batch(g: torch.Generator, n: int = 8, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=dtype) + y.view(-1, 1, 1, 1), y


def data(seed: int = 0) -> TensorSearchData:
    g = torch.Generator().manual_seed(seed)
    return TensorSearchData(batch(g, 24), batch(g, 24), batch(g, 12), batch_size=8, seed=seed)


def adam_grad(search: DCPNASSearch, opt: str, param: torch.Tensor) -> torch.Tensor:
    o = search.opt[opt]
    return o.state[param]["exp_avg"] / (1 - o.param_groups[0]["betas"][0])


def at_alpha(net: torch.nn.Module, alpha: torch.Tensor, fn: Callable):
    now = net.alpha.detach().clone()
    with torch.no_grad():
        net.alpha.copy_(alpha)
    try:
        return fn(net)
    finally:
        with torch.no_grad():
            net.alpha.copy_(now)


def test_replayed_child_step_uses_what_the_parent_step_computed(tiny_config: Callable[..., SearchConfig]) -> None:
    """Teacher: the Parent before its weight step; tangent and arch targets: after it, before its arch step."""
    cfg = tiny_config(**GRADIENT_CHECK, parent_outputs="replay")
    s = DCPNASSearch(cfg, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    (x, y), (xa, ya) = batch(g, dtype=torch.float64), batch(g, dtype=torch.float64)
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

    tangent, teacher_a = at_alpha(s.parent, alpha0, targets)
    s.child_step((x, y), (xa, ya))

    loss = kl_to_teacher(reference.child(x, alpha=alpha0), teacher) + cfg.mu * reconstruction_loss(reference.child)
    ref_w = torch.autograd.grad(loss, list(reference.child.weight_parameters()))
    clip = min(1.0, cfg.grad_clip / (torch.cat([r.flatten() for r in ref_w]).norm().item() + 1e-6))
    for p, r in zip(s.child.weight_parameters(), ref_w):
        torch.testing.assert_close(adam_grad(s, "child_w", p), r * clip, rtol=1e-8, atol=1e-12)

    def eq_4_33(net):
        with frozen_bn_stats(net):
            return child_arch_gradient(net, xa, teacher_a, tangent, cfg.lam, cfg.discrepancy, cfg.hessian).grad

    expected = at_alpha(s.child, alpha0, eq_4_33) + cfg.arch_weight_decay * alpha0
    torch.testing.assert_close(adam_grad(s, "child_a", s.child.alpha), expected, rtol=1e-8, atol=1e-12)


def test_replay_reads_the_parent_batches_and_runs_no_parent_pass(tiny_config: Callable[..., SearchConfig]) -> None:
    """After warm-up; a warm-up Child phase reads its own batches and runs the live teacher."""
    s = DCPNASSearch(tiny_config(warmup_epochs=1, epochs=2, parent_outputs="replay"))
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    passes: dict[tuple[int, str], int] = {}  # Parent forwards within each phase's steps (evaluation left out)
    in_step: list[tuple[int, str]] = []

    def count(*_) -> None:
        for key in in_step:
            passes[key] = passes.get(key, 0) + 1

    s.parent.register_forward_hook(count)

    def recording(phase: str, step: Callable) -> Callable:
        def run_step(wb, ab) -> None:
            seen.setdefault((s.epoch, phase), []).append(wb[0])
            in_step.append((s.epoch, phase))
            step(wb, ab)
            in_step.clear()

        return run_step

    for phase in ("parent", "child"):
        setattr(s, f"{phase}_step", recording(phase, getattr(s, f"{phase}_step")))
    s.run(data())
    assert passes == {(0, "parent"): 3, (0, "child"): 3, (1, "parent"): 6}  # replayed: no Parent pass in (1, child)
    assert all(map(torch.equal, seen[1, "parent"], seen[1, "child"]))
    assert not torch.equal(seen[0, "parent"][0], seen[0, "child"][0])
    assert len(s.replay) == 0  # emptied at the epoch's end: a checkpoint there holds no replay


def test_replay_resumes_bitwise_from_the_middle_of_the_child_phase(
    tmp_path, tiny_config: Callable[..., SearchConfig]
) -> None:
    cfg = tiny_config(parent_outputs="replay")
    full = DCPNASSearch(cfg)
    full.run(data())
    interrupted = DCPNASSearch(cfg)
    interrupted.run(data(), max_steps=10)  # epoch 2: 3 Parent steps recorded, one replayed
    assert (interrupted.phase, interrupted.step, len(interrupted.replay)) == ("child", 1, 3)
    path = save_checkpoint(interrupted.state_dict(), tmp_path / "ckpt.pt")
    resumed = DCPNASSearch(cfg)
    resumed.load_state_dict(load_checkpoint(path))
    resumed.run(data())
    assert torch.equal(full.child.alpha, resumed.child.alpha)
    assert all(torch.equal(a, b) for a, b in zip(full.child.parameters(), resumed.child.parameters()))
