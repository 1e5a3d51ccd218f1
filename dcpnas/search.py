"""The DCP-NAS search loop (method §7): Parent and Child supernets trained in turn, the Child's
architecture steered along the Parent's tangent, both with decoupled (back-tracked) updates.

Pure PyTorch. Data parallelism enters through three seams, all optional: ``wrap`` (e.g. DDP)
for the weight-step forwards, ``reduce_mean`` for architecture gradients and metrics, and the
data object, which decides what each rank reads.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcpnas.binary import REAL, Binarize, reconstruction_loss
from dcpnas.checkpoint import check_same_config
from dcpnas.decoupled import PSI_RULES, Backtracker, backtrack_ratio
from dcpnas.genotype import Genotype
from dcpnas.losses import kl_to_teacher
from dcpnas.ops import OpContext
from dcpnas.replay import ParentReplay
from dcpnas.spaces import get_space
from dcpnas.supernet import SuperNet, frozen_bn_stats
from dcpnas.tangent import DISCREPANCIES, HESSIANS, child_arch_gradient, parent_tangent

Batch = tuple[Tensor, Tensor]
PHASES = ("parent", "child")
PAIRINGS = ("cycle", "min")


# Metric names the pipeline reads back (selection, report, progress board): one spelling, here.
PARENT_VAL_ACC, CHILD_VAL_ACC = "parent/val_acc", "child/val_acc"
ALPHA_ENTROPY, SKIP_NORMAL = "alpha_entropy", "skip_normal"


def pair_indices(n_weights: int, n_arch: int, pairing: str) -> Iterator[tuple[int, int, int]]:
    """(weight batch, arch batch, arch pass) of each step of a phase.

    ``cycle`` (PC-DARTS): every weight batch once, the architecture batches repeated from the
    start when used up (pass 1, 2, ...); ``min``: as ``zip``, as many steps as the shorter split.
    """
    return ((i, i % n_arch, i // n_arch) for i in range(phase_steps(n_weights, n_arch, pairing)))


def phase_steps(n_weights: int, n_arch: int, pairing: str) -> int:
    """Steps of one phase: every weight batch (``cycle``) or as many as the shorter split (``min``)."""
    return min(n_weights, n_arch) if pairing == "min" else n_weights


@dataclass
class SearchConfig:
    """Every hyperparameter of the search, with the defaults of method §7.3 ([A] = the specification's choice)."""

    # search space and supernet [A: DARTS/PC-DARTS sizes]
    space: str = "dcpnas"
    num_classes: int = 10
    in_channels: int = 3
    init_channels: int = 16
    layers: int = 8
    stem: str = "cifar"  # cifar (one 3x3 conv) | imagenet (three stride-2 convs)
    partial_channels: int = 1  # PC-DARTS K; 1 = all channels
    affine: bool = False  # BN affine inside supernet ops (DARTS searches without)
    binarize_depthwise_input: bool = False  # book-faithful variant of method §2.3
    alpha_init_std: float = 1e-3
    # schedule
    epochs: int = 50
    warmup_epochs: int = 15  # architecture frozen for these epochs
    # DCP-NAS objective (Eq. 4.32)
    lam: float = 5e-3  # weight of the tangent discrepancy D
    mu: float = 0.2  # weight of the reconstruction error L_R
    discrepancy: str = "fro"  # fro | l1 | cos (Table 4.4)
    hessian: str = "ggn"  # ggn | exact (the "no GGN" ablation)
    tangent: str = "batch"  # batch: Parent tangent on each arch batch | phase: mean over the Parent phase
    parent_outputs: str = "live"  # live: the Child step runs the frozen Parent | replay: recorded in its phase
    # decoupled optimisation (method §6.4)
    decoupled: bool = True
    tau: float = 0.5
    backtrack: str = "large"  # back-track the ops whose weight norm ranks high (large) or low (small)
    psi_granularity: str = "edge"  # edge | op
    eta2: float = 1.0
    psi_rule: str = "scaled"  # scaled: psi relative to the arch step (docs/method.md) | spec: method §6.4 literally
    psi_init: float = 0.5  # scaled rule: initial psi~ (shift ~ psi_init x an Adam step); the spec rule starts at 0
    psi_lr: float | None = None  # None: the architecture learning rate
    # optimisers
    parent_lr: float = 0.1
    parent_lr_min: float = 1e-3
    parent_momentum: float = 0.9
    parent_weight_decay: float = 3e-4
    child_lr: float = 1e-3
    child_lr_min: float = 0.0
    child_weight_decay: float = 0.0
    arch_lr: float = 6e-4
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    grad_clip: float = 5.0
    genotype_ranking: str = "raw"  # raw | softmax (method §8)
    seed: int = 0
    # loop (not the method): cost of a step on an accelerator
    pairing: str = "cycle"  # cycle: every weight batch once per phase, the arch split repeated | min: zip
    eval_batches: int | None = 10  # per-rank held-out batches per epoch (the last epoch: all); None = all
    finite_check_steps: int = 50  # steps between the (synchronising) cross-rank divergence checks
    bf16: bool = True  # CUDA only: bf16 autocast of every step and evaluation
    channels_last: bool = True  # CUDA only: NHWC supernets and batches

    def __post_init__(self) -> None:
        self.arch_betas = tuple(self.arch_betas)
        choices = {
            "stem": ("cifar", "imagenet"),
            "discrepancy": DISCREPANCIES,
            "hessian": HESSIANS,
            "tangent": ("batch", "phase"),
            "parent_outputs": ("live", "replay"),
            "backtrack": ("large", "small"),
            "psi_granularity": ("edge", "op"),
            "psi_rule": PSI_RULES,
            "genotype_ranking": ("raw", "softmax"),
            "pairing": PAIRINGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"search.{name}: '{getattr(self, name)}' is not one of {', '.join(allowed)}")
        get_space(self.space)
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"search.warmup_epochs: {self.warmup_epochs} must lie in [0, epochs={self.epochs}]")
        if self.lam < 0 or self.mu < 0:
            raise ValueError("search.lam and search.mu must be >= 0")
        if self.psi_init < 0:
            raise ValueError(f"search.psi_init: {self.psi_init} must be >= 0 (psi is projected to |psi|)")
        if (self.eval_batches is not None and self.eval_batches < 1) or self.finite_check_steps < 1:
            raise ValueError("search.eval_batches (or null) and search.finite_check_steps must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


class SearchData(Protocol):
    """What the loop reads: paired (weight batch, architecture batch) steps, and an eval set."""

    def batches(self, epoch: int, phase: str, start: int = 0) -> Iterable[tuple[Batch, Batch]]: ...

    def eval_batches(self) -> Iterable[Batch]: ...


class TensorSearchData:
    """In-memory splits with a deterministic shuffle per (seed, epoch, phase); resumable by index."""

    def __init__(
        self,
        weights: Batch,
        arch: Batch,
        held_out: Batch,
        batch_size: int,
        seed: int = 0,
        pairing: str = "cycle",
    ) -> None:
        self.w, self.a, self.e = weights, arch, held_out
        self.batch_size, self.seed, self.pairing = batch_size, seed, pairing
        self.n_w, self.n_a = len(weights[1]) // batch_size, len(arch[1]) // batch_size
        if min(self.n_w, self.n_a) == 0:
            raise ValueError(f"batch size {batch_size} exceeds the smaller search split")
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing '{pairing}' is not one of {', '.join(PAIRINGS)}")

    @property
    def steps(self) -> int:
        """Paired steps per phase under this pairing."""
        return phase_steps(self.n_w, self.n_a, self.pairing)

    def _order(self, n: int, epoch: int, phase: str, split: int, rep: int = 0) -> Tensor:
        key = (self.seed, epoch, PHASES.index(phase), split) + ((rep,) if rep else ())
        g = torch.Generator().manual_seed(hash(key) & 0x7FFFFFFF)
        return torch.randperm(n, generator=g)

    def batches(self, epoch: int, phase: str, start: int = 0) -> Iterator[tuple[Batch, Batch]]:
        ow = self._order(len(self.w[1]), epoch, phase, 0)
        b = self.batch_size
        for i, j, rep in itertools.islice(pair_indices(self.n_w, self.n_a, self.pairing), start, None):
            oa = self._order(len(self.a[1]), epoch, phase, 1, rep)  # each pass over the arch split reshuffled
            iw, ia = ow[i * b : (i + 1) * b], oa[j * b : (j + 1) * b]
            yield (self.w[0][iw], self.w[1][iw]), (self.a[0][ia], self.a[1][ia])

    def eval_batches(self) -> Iterator[Batch]:
        for i in range(0, len(self.e[1]), self.batch_size):
            yield self.e[0][i : i + self.batch_size], self.e[1][i : i + self.batch_size]


class DivergedError(RuntimeError):
    """A loss became NaN or infinite; the search cannot continue from this state."""


def _identity(t: Tensor) -> Tensor:
    return t


class DCPNASSearch:
    """Owns both supernets, their optimisers, the back-trackers and the loop position."""

    def __init__(
        self,
        cfg: SearchConfig,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        reduce_mean: Callable[[Tensor], Tensor] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cfg = cfg
        self.space = get_space(cfg.space)
        cuda = torch.device(device).type == "cuda"
        self.amp = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=cuda and cfg.bf16)
        self.memory_format = torch.channels_last if cuda and cfg.channels_last else torch.contiguous_format
        self.reduce = reduce_mean or _identity
        torch.manual_seed(cfg.seed)
        child_bits = Binarize(weights=True, activations=True, depthwise_input=cfg.binarize_depthwise_input)
        self.parent = self._supernet(REAL).to(device, dtype, memory_format=self.memory_format)
        self.child = self._supernet(child_bits).to(device, dtype, memory_format=self.memory_format)
        with torch.no_grad():
            self.child.alpha.copy_(self.parent.alpha)
        wrap = wrap or (lambda m: m)
        self.parent_fwd, self.child_fwd = wrap(self.parent), wrap(self.child)
        self.opt = {
            "parent_w": torch.optim.SGD(
                self.parent.weight_parameters(),
                cfg.parent_lr,
                momentum=cfg.parent_momentum,
                weight_decay=cfg.parent_weight_decay,
            ),
            "child_w": torch.optim.Adam(
                self.child.weight_parameters(), cfg.child_lr, weight_decay=cfg.child_weight_decay
            ),
            "parent_a": self._arch_opt(self.parent.alpha),
            "child_a": self._arch_opt(self.child.alpha),
        }
        self.sched = {
            "parent_w": torch.optim.lr_scheduler.CosineAnnealingLR(self.opt["parent_w"], cfg.epochs, cfg.parent_lr_min),
            "child_w": torch.optim.lr_scheduler.CosineAnnealingLR(self.opt["child_w"], cfg.epochs, cfg.child_lr_min),
        }
        bt = dict(
            alpha_shape=tuple(self.parent.alpha.shape),
            tau=cfg.tau,
            direction=cfg.backtrack,
            granularity=cfg.psi_granularity,
            eta2=cfg.eta2,
            psi_lr=cfg.psi_lr,
            rule=cfg.psi_rule,
            psi_init=cfg.psi_init,
        )
        self.backtrack = {"parent": Backtracker(**bt).to(device, dtype), "child": Backtracker(**bt).to(device, dtype)}
        self.epoch, self.phase, self.step, self.global_step = 0, "parent", 0, 0
        self.phase_tangent = torch.zeros_like(self.parent.alpha)
        self.replay = ParentReplay()  # parent_outputs: replay
        # [sum, count] per metric and non-finite weight losses [parent, child], kept on the device: read per epoch
        self.meters: dict[str, Tensor] = {}
        self.nonfinite = torch.zeros(2, dtype=torch.float64, device=device)
        self.history: list[dict[str, Any]] = []

    def _supernet(self, bits: Binarize) -> SuperNet:
        c = self.cfg
        ctx = OpContext(style="bnn", binarize=bits, affine=c.affine, search=True)
        return SuperNet(
            self.space,
            c.num_classes,
            c.init_channels,
            c.layers,
            ctx,
            c.stem,
            c.in_channels,
            c.partial_channels,
            alpha_init_std=c.alpha_init_std,
        )

    def _arch_opt(self, alpha: nn.Parameter) -> torch.optim.Adam:
        c = self.cfg
        return torch.optim.Adam([alpha], c.arch_lr, betas=c.arch_betas, weight_decay=c.arch_weight_decay)

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _meter(self, name: str, value: Tensor | float, n: int = 1) -> None:
        """Accumulate without a host round trip (a tensor value stays on its device)."""
        m = self.meters.get(name)
        if m is None:
            m = self.meters[name] = self.nonfinite.new_zeros(2)
        m[0] += torch.as_tensor(value).detach().to(m) * n
        m[1] += n

    def check_finite(self) -> None:
        """Raise ``DivergedError`` on every rank if any rank saw a non-finite weight loss.

        One all-reduce and one host read, every ``finite_check_steps`` steps and before each epoch's
        metrics (so before any checkpoint of a diverged state): the steps in between run on, wasted.
        """
        bad = self.reduce(self.nonfinite.clone()).tolist()
        for name, count in zip(PHASES, bad):
            if count > 0:
                where = f"epoch {self.epoch}, {self.phase} phase step {self.step}"
                raise DivergedError(f"{name} loss is not finite (on some rank, by {where})")

    def layout(self, batch: Batch) -> Batch:
        """The batch in the supernets' memory format (channels-last on CUDA)."""
        return batch[0].contiguous(memory_format=self.memory_format), batch[1]

    @property
    def arch_active(self) -> bool:
        return self.epoch >= self.cfg.warmup_epochs

    @property
    def replaying(self) -> bool:
        """``parent_outputs: replay`` after warm-up (a warm-up Child learns from the live Parent)."""
        return self.cfg.parent_outputs == "replay" and self.arch_active

    def genotype(self) -> Genotype:
        return Genotype.from_alphas(self.child.alpha, self.space, self.cfg.genotype_ranking)

    def parent_genotype(self) -> Genotype:
        """The real-valued Parent's own choice (DARTS on the Parent): the binarised-Parent baseline."""
        return Genotype.from_alphas(self.parent.alpha, self.space, self.cfg.genotype_ranking)

    # ---- one step of each phase ----------------------------------------------------------------
    def _weight_step(self, name: str, model: nn.Module, loss: Tensor) -> None:
        # Counted on the device, decided in check_finite across ranks: one rank raising while the
        # others wait in DDP's all-reduce would hang them.
        self.nonfinite[PHASES.index(name)] += torch.isfinite(loss.detach()).logical_not().to(self.nonfinite)
        opt = self.opt[f"{name}_w"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(list(model.weight_parameters()), self.cfg.grad_clip)
        opt.step()

    def _arch_step(self, name: str, alpha: nn.Parameter, grad: Tensor, norms: Callable[[], Tensor]) -> None:
        """Vanilla optimiser step on alpha, then the decoupled back-tracking projection."""
        opt, bt = self.opt[f"{name}_a"], self.backtrack[name]
        lr = opt.param_groups[0]["lr"]
        if self.cfg.decoupled:
            bt.update_psi(grad, lr)
        alpha_old = alpha.detach().clone()
        alpha.grad = grad.to(alpha.dtype)
        opt.step()
        alpha.grad = None
        if self.cfg.decoupled:
            vanilla = alpha.detach() - alpha_old
            shift = bt.project(alpha, alpha_old, norms(), lr)
            self._meter(f"{name}/backtrack_ratio", backtrack_ratio(shift, vanilla, bt.prev_mask))

    def parent_step(self, wb: Batch, ab: Batch) -> None:
        x, y = wb
        self.parent.train()
        logits = self.parent_fwd(x, alpha=self.parent.alpha.detach())
        loss = F.cross_entropy(logits, y)
        self._weight_step("parent", self.parent, loss)
        self._meter("parent/loss", loss, len(y))
        self._meter("parent/acc", (logits.argmax(1) == y).float().mean(), len(y))
        if not self.arch_active:
            return
        with frozen_bn_stats(self.parent):
            tangent, teacher_a, ce = parent_tangent(self.parent, *ab)
        grad = self.reduce(-tangent)
        self.phase_tangent += (-grad - self.phase_tangent) / (self.step + 1)  # running mean over the phase
        if self.replaying:  # what Child step self.step, on these batches, will use
            self.replay.record(self.step, torch.softmax(logits.detach(), dim=-1), teacher_a, -grad)
        self._meter("parent/arch_loss", ce)
        self._arch_step("parent", self.parent.alpha, grad, self.parent.op_weight_norms)

    def child_step(self, wb: Batch, ab: Batch) -> None:
        c = self.cfg
        x, y = wb
        self.child.train()
        replay = self.replay.get(self.step) if self.replaying else None  # (teacher, teacher_a, tangent)
        if replay is not None:
            teacher = replay[0]
        else:
            with torch.no_grad(), frozen_bn_stats(self.parent):
                teacher = torch.softmax(self.parent(x), dim=-1)
        logits = self.child_fwd(x, alpha=self.child.alpha.detach())
        kl = kl_to_teacher(logits, teacher)
        l_r = reconstruction_loss(self.child)
        self._weight_step("child", self.child, kl + c.mu * l_r)
        self._meter("child/kl", kl, len(y))
        self._meter("child/l_r", l_r, len(y))
        self._meter("child/acc", (logits.argmax(1) == y).float().mean(), len(y))
        if not self.arch_active:
            return
        xa, ya = ab
        with frozen_bn_stats(self.parent), frozen_bn_stats(self.child):
            if replay is not None:
                _, teacher_a, tangent = replay
                tangent = tangent if c.tangent == "batch" else self.phase_tangent
            elif c.tangent == "batch":
                tangent, teacher_a, _ = parent_tangent(self.parent, xa, ya)
                tangent = self.reduce(tangent)
            else:
                with torch.no_grad():
                    teacher_a = torch.softmax(self.parent(xa), dim=-1)
                tangent = self.phase_tangent
            ag = child_arch_gradient(self.child, xa, teacher_a, tangent, c.lam, c.discrepancy, c.hessian, self.reduce)
        self._meter("child/arch_kl", ag.kl)
        self._meter("child/discrepancy", ag.discrepancy)
        self._arch_step("child", self.child.alpha, ag.grad, self.child.op_weight_norms)

    # ---- phases and epochs ---------------------------------------------------------------------
    def _enter_phase(self) -> None:
        """Architecture inheritance (Algorithm 10): the entering supernet takes the other's alpha."""
        src, dst = (self.child, self.parent) if self.phase == "parent" else (self.parent, self.child)
        if self.phase == "parent" and self.epoch == 0:
            return
        with torch.no_grad():
            dst.alpha.copy_(src.alpha)
        self.backtrack[self.phase].reset()
        if self.phase == "parent":
            self.phase_tangent.zero_()

    @torch.no_grad()
    def evaluate(self, data: Iterable[Batch]) -> dict[str, float]:
        """Top-1 of both supernets on held-out data, summed across ranks (counted on the device).

        Supernets normalise with batch statistics here: their running statistics average over
        an architecture that keeps moving and lag far behind in short searches.
        """
        self.parent.train()
        self.child.train()
        correct = self.nonfinite.new_zeros(3)
        with frozen_bn_stats(self.parent), frozen_bn_stats(self.child), self.amp:
            for x, y in map(self.layout, data):
                for i, net in enumerate((self.parent, self.child)):
                    correct[i] += (net(x).argmax(1) == y).sum()
                correct[2] += len(y)
        p, c, n = self.reduce(correct).tolist()
        return {PARENT_VAL_ACC: p / n, CHILD_VAL_ACC: c / n}

    def _epoch_metrics(self, data: SearchData, seconds: float, cpu_seconds: float) -> dict[str, Any]:
        names = sorted(self.meters)
        if names:  # every rank has the same names (the same steps ran)
            sums = torch.stack([self.meters[k] for k in names])
            metrics = dict(zip(names, self.reduce(sums[:, 0] / sums[:, 1]).tolist()))
        else:
            metrics = {}
        last = self.epoch == self.cfg.epochs - 1  # the final metrics: the whole held-out split
        bound = None if last else self.cfg.eval_batches
        metrics.update(self.evaluate(itertools.islice(data.eval_batches(), bound)))
        probs = torch.softmax(self.child.alpha.detach().double(), -1)
        genotype = self.genotype()
        metrics.update(
            {
                "epoch": self.epoch,
                ALPHA_ENTROPY: float(-(probs * probs.log()).sum(-1).mean()),
                SKIP_NORMAL: genotype.count("skip_connect", "normal"),
                "skip_reduce": genotype.count("skip_connect", "reduce"),
                "lr/parent": self.opt["parent_w"].param_groups[0]["lr"],
                "lr/child": self.opt["child_w"].param_groups[0]["lr"],
                "epoch_seconds": seconds,
                # this process's CPU time for the same training: what the epoch costs on cores of its own,
                # which a busy machine barely changes (the dry run's projection is checked against it)
                "epoch_cpu_seconds": cpu_seconds,
                "genotype_hash": genotype.hash,
            }
        )
        return metrics

    def run(
        self,
        data: SearchData,
        max_steps: int | None = None,
        on_epoch_end: Callable[[DCPNASSearch, dict[str, Any]], None] | None = None,
    ) -> Genotype:
        """Run (or continue) the search to ``cfg.epochs``; stop early after ``max_steps`` steps."""
        steps_run = 0
        while self.epoch < self.cfg.epochs:
            t0, cpu0 = time.perf_counter(), time.process_time()
            for phase in PHASES[PHASES.index(self.phase) :]:
                if phase != self.phase:
                    self.phase, self.step = phase, 0
                if self.step == 0:
                    self._enter_phase()
                step_fn = self.parent_step if phase == "parent" else self.child_step
                # replay: the Child phase reads the Parent phase's batches, in the same order
                order = "parent" if self.replaying else phase
                for wb, ab in data.batches(self.epoch, order, self.step):
                    if max_steps is not None and steps_run >= max_steps:
                        return self.genotype()
                    with self.amp:
                        step_fn(self.layout(wb), self.layout(ab))
                    self.step += 1
                    self.global_step += 1
                    steps_run += 1
                    if self.global_step % self.cfg.finite_check_steps == 0:
                        self.check_finite()
            for s in self.sched.values():
                s.step()
            self.replay.clear()
            self.check_finite()
            metrics = self._epoch_metrics(data, time.perf_counter() - t0, time.process_time() - cpu0)
            self.history.append(metrics)
            self.meters.clear()
            self.nonfinite.zero_()
            self.epoch, self.phase, self.step = self.epoch + 1, "parent", 0
            if on_epoch_end is not None:
                on_epoch_end(self, metrics)
        return self.genotype()

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "parent": self.parent.state_dict(),
            "child": self.child.state_dict(),
            "opt": {k: o.state_dict() for k, o in self.opt.items()},
            "sched": {k: s.state_dict() for k, s in self.sched.items()},
            "backtrack": {k: b.state_dict() for k, b in self.backtrack.items()},
            "position": {"epoch": self.epoch, "phase": self.phase, "step": self.step, "global_step": self.global_step},
            "phase_tangent": self.phase_tangent,
            "replay": self.replay.state_dict(),
            "meters": {k: v.tolist() for k, v in self.meters.items()},
            "history": self.history,
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_config(state["config"], self.cfg.to_dict(), "search")
        self.parent.load_state_dict(state["parent"])
        self.child.load_state_dict(state["child"])
        for k, o in self.opt.items():
            o.load_state_dict(state["opt"][k])
        for k, s in self.sched.items():
            s.load_state_dict(state["sched"][k])
        for k, b in self.backtrack.items():
            b.load_state_dict(state["backtrack"][k])
        pos = state["position"]
        self.epoch, self.phase, self.step, self.global_step = (
            pos["epoch"],
            pos["phase"],
            pos["step"],
            pos["global_step"],
        )
        self.phase_tangent.copy_(state["phase_tangent"])
        self.replay.load_state_dict(state["replay"])
        self.meters.clear()
        self.meters.update({k: self.nonfinite.new_tensor(v) for k, v in state["meters"].items()})
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"])
