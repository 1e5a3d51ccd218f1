"""The weight-sharing supernet: mixed ops on every edge, alphas kept apart from weights (method §2.1).

One ``SuperNet`` class serves as Parent (real ops) and Child (1-bit ops); both share a search
space so that their architecture parameters, shape (2, E, M), can be handed back and forth.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcpnas.autodiff import add, weighted_sum
from dcpnas.binary import BinaryConv2d
from dcpnas.ops import OpContext, Pool, Zero, create_op, preprocess
from dcpnas.spaces import SearchSpace


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def op_norm_terms(op: nn.Module) -> tuple[float, list[nn.Conv2d]]:
    """R(w_m) = ||w_m||^2 of Eq. 4.53 as a constant plus the squared norms of the op's kernels.

    Parameter-free ops use the book's equivalent kernels: identity 1, KxK pooling K^2 (1/K^2)^2.
    """
    if isinstance(op, Zero):
        return 0.0, []
    if isinstance(op, nn.Identity):
        return 1.0, []
    if isinstance(op, Pool):
        return 1.0 / op.kernel**2, []
    return 0.0, [m for m in op.modules() if isinstance(m, nn.Conv2d)]


def kernel_sq_norms(convs: list[nn.Conv2d]) -> Tensor:
    """||w||^2 of each conv's effective kernel (binary: beta o sign(w)), one fused norm for all."""
    with torch.no_grad():
        kernels = [m.effective_weight() if isinstance(m, BinaryConv2d) else m.weight for m in convs]
        return torch.stack(torch._foreach_norm(kernels)).double().pow(2)


def op_weight_norm(op: nn.Module) -> float:
    """R(w_m) of one op, as a number (inspection and tests; the search uses ``SuperNet.op_weight_norms``)."""
    const, convs = op_norm_terms(op)
    return const + (float(kernel_sq_norms(convs).sum()) if convs else 0.0)


class MixedOp(nn.Module):
    """Softmax-weighted sum of all candidate ops (Eq. 4.28), optionally on 1/K of the channels."""

    def __init__(self, c: int, stride: int, space: SearchSpace, ctx: OpContext, partial_channels: int = 1) -> None:
        super().__init__()
        if c % partial_channels:
            raise ValueError(f"partial_channels={partial_channels} must divide the channel count {c}")
        self.k = partial_channels
        self.stride = stride
        self.ops = nn.ModuleList(create_op(name, c // partial_channels, stride, ctx) for name in space.ops)
        self.active = [i for i, name in enumerate(space.ops) if name != "none"]

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        # 'none' contributes exactly zero; skipping it saves a pass, its alpha still enters the softmax.
        xa = x[:, : x.shape[1] // self.k] if self.k > 1 else x
        out = weighted_sum(weights[self.active], [self.ops[i](xa) for i in self.active])
        if self.k == 1:
            return out
        rest = x[:, x.shape[1] // self.k :]
        rest = F.max_pool2d(rest, 2, 2, ceil_mode=True) if self.stride == 2 else rest
        return channel_shuffle(torch.cat([out, rest], dim=1), self.k)


class SearchCell(nn.Module):
    """A DAG cell: two preprocessed inputs, ``steps`` nodes each summing mixed ops of all earlier states."""

    def __init__(
        self,
        space: SearchSpace,
        c_pp: int,
        c_p: int,
        c: int,
        reduction: bool,
        reduction_prev: bool,
        ctx: OpContext,
        partial_channels: int = 1,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.steps = space.steps
        self.pre0 = preprocess(c_pp, c, reduction_prev, ctx)
        self.pre1 = preprocess(c_p, c, False, ctx)
        self.edges = nn.ModuleList(
            MixedOp(c, 2 if reduction and src < 2 else 1, space, ctx, partial_channels) for src, _ in space.edges()
        )

    def forward(self, s0: Tensor, s1: Tensor, weights: Tensor) -> Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        offset = 0
        for _ in range(self.steps):
            states.append(add([self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states)]))
            offset += len(states) - 1
        return torch.cat(states[-self.steps :], dim=1)


class SuperNet(nn.Module):
    """Stem, ``layers`` search cells (reductions at 1/3 and 2/3 depth), GAP and a linear head.

    ``alpha`` (2, E, M) is the only architecture parameter; pass ``alpha=`` to ``forward`` to
    evaluate the same weights at another architecture point (finite differences, forward-mode
    AD, detached weight steps).
    """

    def __init__(
        self,
        space: SearchSpace,
        num_classes: int,
        init_channels: int = 16,
        layers: int = 8,
        ctx: OpContext | None = None,
        stem: str = "cifar",
        in_channels: int = 3,
        partial_channels: int = 1,
        stem_multiplier: int = 3,
        alpha_init_std: float = 1e-3,
    ) -> None:
        super().__init__()
        ctx = ctx or OpContext(search=True)
        self.space = space
        c = init_channels
        if stem == "cifar":
            c_stem = stem_multiplier * c
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c_stem, 3, padding=1, bias=False), nn.BatchNorm2d(c_stem))
            c_pp, c_p, reduction_prev = c_stem, c_stem, False
        elif stem == "imagenet":
            # PC-DARTS ImageNet search stem: three stride-2 convs, 224 -> 28.
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, c // 2, 3, 2, 1, bias=False),
                nn.BatchNorm2d(c // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(c // 2, c, 3, 2, 1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, 2, 1, bias=False),
                nn.BatchNorm2d(c),
            )
            c_pp, c_p, reduction_prev = c, c, False
        else:
            raise ValueError(f"unknown stem '{stem}'; known: cifar, imagenet")
        self.cells = nn.ModuleList()
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            c = c * 2 if reduction else c
            self.cells.append(SearchCell(space, c_pp, c_p, c, reduction, reduction_prev, ctx, partial_channels))
            reduction_prev = reduction
            c_pp, c_p = c_p, space.steps * c
        self.head = nn.Linear(c_p, num_classes)
        self.alpha = nn.Parameter(alpha_init_std * torch.randn(2, space.num_edges, space.num_ops))
        self._norm_plan: tuple[Tensor, Tensor, list[nn.Conv2d]] | None = None  # built on first use

    def forward(self, x: Tensor, alpha: Tensor | None = None) -> Tensor:
        weights = torch.softmax(self.alpha if alpha is None else alpha, dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights[int(cell.reduction)])
        return self.head(F.adaptive_avg_pool2d(s1, 1).flatten(1))

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        return (p for name, p in self.named_parameters() if name != "alpha")

    def op_weight_norms(self) -> Tensor:
        """R[t, e, m]: weight norm of op m on edge e, summed over all cells of type t (method §6.4).

        One fused norm over every kernel and one scatter-add: no host round trip per op or cell.
        """
        if self._norm_plan is None or self._norm_plan[0].device != self.alpha.device:
            const = torch.zeros(self.alpha.numel(), dtype=torch.float64)
            convs, index = [], []
            for cell in self.cells:
                for e, edge in enumerate(cell.edges):
                    for m, op in enumerate(edge.ops):
                        at = (int(cell.reduction) * self.alpha.shape[1] + e) * self.alpha.shape[2] + m
                        c, op_convs = op_norm_terms(op)
                        const[at] += c
                        convs += op_convs
                        index += [at] * len(op_convs)
            self._norm_plan = (const.to(self.alpha.device), torch.tensor(index, device=self.alpha.device), convs)
        const, index, convs = self._norm_plan
        return const.index_add(0, index, kernel_sq_norms(convs)).view(self.alpha.shape)


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Normalise with batch statistics but leave running statistics untouched.

    Architecture steps evaluate the same batch several times (gradient, JVP, teacher); they
    must see one function of alpha and must not drift the running averages.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True
