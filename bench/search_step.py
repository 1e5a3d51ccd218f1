"""Cost of one search step: DARTS first/second order against DCP-NAS (GGN and exact Hessian), one run.

Every variant gets its own state built from one ``SearchConfig`` (same supernet size, seed, batch,
thread count) and runs on the same two batches (weight split, architecture split):

  darts_1st      DARTS first order on the real supernet (the Parent): Adam step on alpha with
                 dL_val/dalpha at the current w, then one SGD step on w.
  darts_2nd      DARTS second order: the unrolled gradient dL_val(w', alpha)/dalpha,
                 w' = w - xi dL_train/dw, with the Hessian term by central finite differences,
                 then the same SGD step on w.
  dcpnas_parent  DCPNASSearch.parent_step with the architecture active.
  dcpnas_ggn     DCPNASSearch.child_step (teacher forward, child weight step, parent tangent,
                 child architecture gradient with H_G ~ -F, decoupled update).
  dcpnas_exact   the same child step with the exact H_G v (double backprop).
  dcpnas_replay  the GGN child step with ``parent_outputs: replay``: the Parent's soft targets and
                 tangent recorded by its own step (one untimed Parent step first), no Parent pass.

  arch_grad_*    (--components) the child's architecture gradient alone, lam = 0 / GGN / exact,
                 to separate what the Hessian choice costs from the rest of the child step.

Derived per round: dcpnas_iter = (parent + ggn) / 2 (dcpnas_iter_replay with the replayed step), the
mean cost per batch of a search that alternates the two phases by epoch. Variants run round-robin
(A B C D E A B C D E ...) so load drifts on a shared machine hit all of them; medians and IQRs over
the timed rounds, in wall and in process CPU time. Peak memory: one extra step per variant after the timings (see
``peak_step_memory_mib``). Issue goals: dcpnas_ggn <= darts_2nd, dcpnas_ggn <= 2.0 x darts_1st
(issue 15; issue 2 asked 2.5 x; also checked for dcpnas_replay), dcpnas_exact >= 3 x dcpnas_ggn.

    .venv/bin/python bench/search_step.py [--threads 1] [--repeats 7] [--components] [--out results.json]
    .venv/bin/python bench/search_step.py --device cuda --bf16 --batch 64
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcpnas.binary import REAL
from dcpnas.ops import OpContext
from dcpnas.registry import SPACES
from dcpnas.search import DCPNASSearch, SearchConfig
from dcpnas.spaces import get_space
from dcpnas.supernet import SuperNet, frozen_bn_stats
from dcpnas.tangent import child_arch_gradient, parent_tangent

Batch = tuple[Tensor, Tensor]
Step = Callable[[Batch, Batch], None]
VARIANTS = ("darts_1st", "darts_2nd", "dcpnas_parent", "dcpnas_ggn", "dcpnas_exact", "dcpnas_replay")
GOALS = (  # (name, numerator, denominator, comparison, bound)
    ("GGN child step <= DARTS 2nd order", "dcpnas_ggn", "darts_2nd", "<=", 1.0),
    ("GGN child step <= 2.0 x DARTS 1st order", "dcpnas_ggn", "darts_1st", "<=", 2.0),
    ("exact-Hessian child step >= 3 x GGN", "dcpnas_exact", "dcpnas_ggn", ">=", 3.0),
    ("replayed GGN child step <= 2.0 x DARTS 1st order", "dcpnas_replay", "darts_1st", "<=", 2.0),
)
MIB = 2**20


def search_config(
    channels: int,
    layers: int,
    space: str,
    num_classes: int = 10,
    hessian: str = "ggn",
    seed: int = 0,
    parent_outputs: str = "live",
) -> SearchConfig:
    """One config for every variant; warm-up 0 so the DCP-NAS steps include their architecture step."""
    return SearchConfig(
        space=space,
        num_classes=num_classes,
        init_channels=channels,
        layers=layers,
        epochs=1,
        warmup_epochs=0,
        hessian=hessian,
        seed=seed,
        parent_outputs=parent_outputs,
    )


def real_supernet(cfg: SearchConfig) -> SuperNet:
    """The Parent exactly as ``DCPNASSearch`` builds it (same seed, so the same initial weights)."""
    torch.manual_seed(cfg.seed)
    ctx = OpContext(style="bnn", binarize=REAL, affine=cfg.affine, search=True)
    return SuperNet(
        get_space(cfg.space),
        cfg.num_classes,
        cfg.init_channels,
        cfg.layers,
        ctx,
        cfg.stem,
        cfg.in_channels,
        cfg.partial_channels,
        alpha_init_std=cfg.alpha_init_std,
    )


def first_order_arch_grad(model: SuperNet, val: Batch) -> Tensor:
    """dL_val(w, alpha)/dalpha at the current weights (DARTS first order)."""
    x, y = val
    with frozen_bn_stats(model):
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), model.alpha)
    return grad


def unrolled_arch_grad(model: SuperNet, train: Batch, val: Batch, xi: float, r: float = 0.01) -> Tensor:
    """DARTS second order: dL_val(w', alpha)/dalpha - xi * (grad_a L_train(w+) - grad_a L_train(w-)) / 2 eps.

    w' = w - xi dL_train/dw; w+- = w +- eps dw' with dw' = dL_val(w', alpha)/dw' and eps = r / |dw'|.
    The virtual and perturbed weights are written into the parameters in place (multi-tensor ops)
    and the stashed w is restored bit for bit, so no model copy is made per step. BN uses batch
    statistics without updating running ones, so all four forwards are the same function.
    """
    (xt, yt), (xv, yv) = train, val
    params = list(model.weight_parameters())
    alpha = model.alpha
    stash = [p.detach().clone() for p in params]
    try:
        with frozen_bn_stats(model):
            gw = torch.autograd.grad(F.cross_entropy(model(xt, alpha=alpha.detach()), yt), params)
            with torch.no_grad():
                torch._foreach_add_(params, gw, alpha=-xi)
            *dw, dalpha = torch.autograd.grad(F.cross_entropy(model(xv), yv), [*params, alpha])
            eps = r / torch.linalg.vector_norm(torch.stack(torch._foreach_norm(dw))).item()
            hessian_term = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    torch._foreach_copy_(params, stash)
                    torch._foreach_add_(params, dw, alpha=sign * eps)
                hessian_term.append(torch.autograd.grad(F.cross_entropy(model(xt), yt), alpha)[0])
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, stash)
    return dalpha - xi * (hessian_term[0] - hessian_term[1]) / (2 * eps)


class Darts:
    """DARTS on the real supernet with the Parent's optimisers: SGD (momentum, wd, clip) on w, Adam on alpha."""

    def __init__(
        self,
        cfg: SearchConfig,
        second_order: bool,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = real_supernet(cfg).to(device, dtype)
        self.second_order = second_order
        self.grad_clip = cfg.grad_clip
        self.w_opt = torch.optim.SGD(
            self.model.weight_parameters(),
            cfg.parent_lr,
            momentum=cfg.parent_momentum,
            weight_decay=cfg.parent_weight_decay,
        )
        self.a_opt = torch.optim.Adam(
            [self.model.alpha], cfg.arch_lr, betas=cfg.arch_betas, weight_decay=cfg.arch_weight_decay
        )

    def arch_grad(self, train: Batch, val: Batch) -> Tensor:
        if not self.second_order:
            return first_order_arch_grad(self.model, val)
        # DARTS sets the virtual step size xi to the current weight learning rate.
        return unrolled_arch_grad(self.model, train, val, self.w_opt.param_groups[0]["lr"])

    def step(self, train: Batch, val: Batch) -> None:
        """Architecture step on the validation batch, then the weight step on the training batch (DARTS order)."""
        self.model.train()
        alpha = self.model.alpha
        alpha.grad = self.arch_grad(train, val)
        self.a_opt.step()
        alpha.grad = None
        x, y = train
        loss = F.cross_entropy(self.model(x, alpha=alpha.detach()), y)
        self.w_opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(list(self.model.weight_parameters()), self.grad_clip)
        self.w_opt.step()


def build_steps(
    channels: int, layers: int, space: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Step]:
    """Every variant with its own freshly initialised state (same seed), as ``step(train, val)``."""
    cfg = search_config(channels, layers, space)
    ggn = DCPNASSearch(cfg, dtype=dtype, device=device)
    exact = DCPNASSearch(search_config(channels, layers, space, hessian="exact"), dtype=dtype, device=device)
    parent = DCPNASSearch(cfg, dtype=dtype, device=device)
    replay = DCPNASSearch(search_config(channels, layers, space, parent_outputs="replay"), dtype=dtype, device=device)

    def replayed_child_step(train: Batch, val: Batch) -> None:
        if not len(replay.replay):  # the Parent step that records what every timed Child step 0 replays
            replay.parent_step(train, val)
        replay.child_step(train, val)

    return {
        "darts_1st": Darts(cfg, False, device, dtype).step,
        "darts_2nd": Darts(cfg, True, device, dtype).step,
        "dcpnas_parent": parent.parent_step,
        "dcpnas_ggn": ggn.child_step,
        "dcpnas_exact": exact.child_step,
        "dcpnas_replay": replayed_child_step,
    }


def arch_gradient_steps(
    channels: int,
    layers: int,
    space: str,
    val: Batch,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Step]:
    """The child's architecture gradient alone (lam = 0, GGN, exact) on ``val``, teacher and tangent fixed.

    Isolates what the Hessian choice costs from the rest of the child step.
    """
    search = DCPNASSearch(search_config(channels, layers, space), dtype=dtype, device=device)
    cfg, x = search.cfg, val[0]
    with frozen_bn_stats(search.parent):
        tangent, teacher, _ = parent_tangent(search.parent, *val)

    def arch_grad(lam: float, hessian: str) -> Step:
        def step(_train: Batch, _val: Batch) -> None:
            with frozen_bn_stats(search.child):
                child_arch_gradient(search.child, x, teacher, tangent, lam, cfg.discrepancy, hessian)

        return step

    return {
        "arch_grad_lam0": arch_grad(0.0, "ggn"),
        "arch_grad_ggn": arch_grad(cfg.lam, "ggn"),
        "arch_grad_exact": arch_grad(cfg.lam, "exact"),
    }


def make_batches(
    batch: int,
    image_size: int,
    num_classes: int = 10,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Batch, Batch]:
    """A training and a validation batch of random images; step cost does not depend on the values."""
    g = torch.Generator().manual_seed(1)

    def one() -> Batch:
        x = torch.randn(batch, 3, image_size, image_size, generator=g, dtype=dtype)
        return x.to(device), torch.randint(0, num_classes, (batch,), generator=g).to(device)

    return one(), one()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    steps: dict[str, Step],
    train: Batch,
    val: Batch,
    warmup: int,
    repeats: int,
    device: torch.device,
    bf16: bool = False,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per step of each variant, interleaved A B C .. A B C .. so load drifts hit all alike.

    Two clocks: ``wall`` (what a user waits) and ``cpu``, this process's CPU time, which other jobs
    on a shared machine inflate far less (with one thread and no GPU it is the work done).
    """
    samples: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in steps}, "cpu": {n: [] for n in steps}}
    for r in range(warmup + repeats):
        for name, step in steps.items():
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                step(train, val)
            _sync(device)
            if r >= warmup:
                samples["wall"][name].append(time.perf_counter() - w0)
                samples["cpu"][name].append(time.process_time() - c0)
    return samples


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def peak_step_memory_mib(step: Step, train: Batch, val: Batch, device: torch.device, bf16: bool = False) -> float:
    """Peak memory one step needs above what is live when it starts.

    CUDA: ``max_memory_allocated`` (tensors). CPU: growth of the resident set's high-water mark
    (tensors, autograd graph, Python objects), with glibc told to mmap every block >= 64 KiB so a
    freed tensor leaves the resident set at once, free heap trimmed and the mark reset before the
    step (Linux ``/proc/self/clear_refs``). Changes the allocator, so run it after the timings.
    """
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step(train, val)
            torch.cuda.synchronize(device)
            return (torch.cuda.max_memory_allocated(device) - base) / MIB
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _proc_status_kib("VmRSS:")
        step(train, val)
        return (_proc_status_kib("VmHWM:") - base) / 1024


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median, quartiles and IQR per variant, plus the derived per-batch mean of a full DCP-NAS iteration."""
    samples = dict(samples)
    if "dcpnas_parent" in samples and "dcpnas_ggn" in samples:
        samples["dcpnas_iter"] = [(p + c) / 2 for p, c in zip(samples["dcpnas_parent"], samples["dcpnas_ggn"])]
    if "dcpnas_parent" in samples and "dcpnas_replay" in samples:
        pairs = zip(samples["dcpnas_parent"], samples["dcpnas_replay"])
        samples["dcpnas_iter_replay"] = [(p + c) / 2 for p, c in pairs]
    out = {}
    for name, xs in samples.items():
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
        out[name] = {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(xs)}
    return out


def check_goals(samples: dict[str, list[float]], summary: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Each goal's ratio of medians, and the median and IQR of the per-round ratios.

    Variants of one round ran back to back, so the per-round ratio cancels most of the load drift
    between rounds; its spread says how far the ratio of medians can be trusted.
    """
    rows = []
    for name, num, den, op, bound in GOALS:
        ratio = summary[num]["median"] / summary[den]["median"]
        paired = summarize({"r": [a / b for a, b in zip(samples[num], samples[den])]})["r"]
        rows.append(
            {
                "goal": name,
                "ratio": ratio,
                "met": ratio <= bound if op == "<=" else ratio >= bound,
                "paired_median": paired["median"],
                "paired_q1": paired["q1"],
                "paired_q3": paired["q3"],
            }
        )
    return rows


def machine() -> dict[str, Any]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def markdown(result: dict[str, Any]) -> str:
    wall, cpu, mem = result["summary"]["wall"], result["summary"]["cpu"], result["peak_mib"]
    lines = [
        "| variant | wall median s | wall IQR s | CPU median s | CPU IQR s | x darts_1st wall | x darts_1st CPU "
        "| peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in wall:
        w, c = wall[name], cpu[name]
        peak = f"{mem[name]:.0f}" if name in mem else "-"
        lines.append(
            f"| {name} | {w['median']:.3f} | {w['iqr']:.3f} | {c['median']:.3f} | {c['iqr']:.3f} "
            f"| {w['median'] / wall['darts_1st']['median']:.2f} | {c['median'] / cpu['darts_1st']['median']:.2f} "
            f"| {peak} |"
        )
    lines += [
        "",
        "| goal | wall: ratio of medians | met | per-round median [IQR] | CPU: ratio of medians | met "
        "| per-round median [IQR] |",
        "|---|---:|---|---:|---:|---|---:|",
    ]
    yn = {True: "yes", False: "no"}
    for gw, gc in zip(result["goals"]["wall"], result["goals"]["cpu"]):
        cells = [
            f"{g['ratio']:.2f} | {yn[g['met']]} | {g['paired_median']:.2f} [{g['paired_q1']:.2f}, {g['paired_q3']:.2f}]"
            for g in (gw, gc)
        ]
        lines.append(f"| {gw['goal']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--space", default="dcpnas", choices=SPACES.names())
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (meant for CUDA)")
    ap.add_argument("--components", action="store_true", help="also time the child's architecture gradient alone")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = {**machine(), "threads": torch.get_num_threads(), "load_before": os.getloadavg()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    train, val = make_batches(args.batch, args.image_size, device=device)
    steps = build_steps(args.channels, args.layers, args.space, device)
    if args.components:
        steps.update(arch_gradient_steps(args.channels, args.layers, args.space, val, device))
    samples = time_round_robin(steps, train, val, args.warmup, args.repeats, device, args.bf16)
    info["load_after"] = os.getloadavg()
    peak = (
        {} if args.no_memory else {n: peak_step_memory_mib(s, train, val, device, args.bf16) for n, s in steps.items()}
    )
    summary = {clock: summarize(xs) for clock, xs in samples.items()}
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": info,
        "samples": samples,
        "summary": summary,
        "goals": {clock: check_goals(samples[clock], summary[clock]) for clock in samples},
        "peak_mib": peak,
    }
    print(json.dumps({"config": result["config"], "machine": info}))
    print(markdown(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
