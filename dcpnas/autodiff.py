"""Elementwise ops with explicit forward-mode derivatives.

Forward-mode AD (used for the GGN's J v, method §5.2) dispatches torch's built-in pointwise
ops through Python reference decompositions on CPU, 30-50x slower than the op itself
(measured: ``add`` 9 us plain vs 350 us dual). The supernet's hot pointwise ops are written as
autograd Functions with ``jvp`` (and differentiable ``backward`` for the exact-Hessian path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _WeightedSum(torch.autograd.Function):
    """sum_k w[k] * y_k: the mixed op of Eq. 4.28 and the node sums of Eq. 4.27."""

    @staticmethod
    def forward(ctx, w: Tensor, *ys: Tensor) -> Tensor:
        ctx.save_for_backward(w, *ys)
        ctx.save_for_forward(w, *ys)
        out = ys[0] * w[0]
        for k in range(1, len(ys)):
            out = out + ys[k] * w[k]
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        w, *ys = ctx.saved_tensors
        gw = torch.stack([(g * y).sum() for y in ys]) if ctx.needs_input_grad[0] else None
        return (gw, *(g * w[k] for k in range(len(ys))))

    @staticmethod
    def jvp(ctx, dw: Tensor | None, *dys: Tensor | None) -> Tensor:
        w, *ys = ctx.saved_tensors
        out = None
        for k, y in enumerate(ys):
            terms = ([dw[k] * y] if dw is not None else []) + ([w[k] * dys[k]] if dys[k] is not None else [])
            for t in terms:
                out = t if out is None else out + t
        return out if out is not None else torch.zeros_like(ys[0])


def weighted_sum(w: Tensor, ys: list[Tensor]) -> Tensor:
    return _WeightedSum.apply(w, *ys)


def add(ys: list[Tensor]) -> Tensor:
    """Sum of same-shaped tensors (cheap under forward-mode AD, unlike chained ``+``)."""
    return ys[0] if len(ys) == 1 else torch.stack(ys).sum(0)


def _prelu_slope_mul(g: Tensor, x: Tensor, a: Tensor) -> Tensor:
    """g * d prelu(x, a)/dx: g where x >= 0, a_c * g elsewhere (lerp returns its end points exactly)."""
    return torch.lerp(a.to(g.dtype).view(1, -1, 1, 1) * g, g, (x >= 0).to(g.dtype))


class _PReLU(torch.autograd.Function):
    """x if x >= 0 else a_c * x, per channel c of an NCHW tensor, in the promoted dtype of x and a.

    Written as relu(x) + a * min(x, 0) and with derivatives free of ``torch.where``, which is not
    vectorised on this CPU build (where: 1.1 ms, relu: 28 us on 32x16x16x16 floats; this forward
    91 us against 790 us for the select). Values and first and second derivatives are bitwise those
    of the select. Not ``F.prelu``: autocast lowers it to bf16, and the JVP's tangent must keep the
    primal's dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor) -> Tensor:
        ctx.save_for_backward(x, a)
        ctx.save_for_forward(x, a)
        return torch.addcmul(F.relu(x), a.view(1, -1, 1, 1), x.clamp(max=0))

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor | None]:
        x, a = ctx.saved_tensors
        # -relu(-x), not clamp(x, max=0): the exact-Hessian path differentiates this, and only
        # relu has the select's derivative 0 at x = 0.
        ga = -(g * F.relu(-x)).sum(dim=(0, 2, 3)) if ctx.needs_input_grad[1] else None
        return _prelu_slope_mul(g, x, a), ga

    @staticmethod
    def jvp(ctx, dx: Tensor | None, da: Tensor | None) -> Tensor:
        x, a = ctx.saved_tensors
        dtype = torch.promote_types(x.dtype, a.dtype)
        out = _prelu_slope_mul(dx.to(dtype), x, a) if dx is not None else torch.zeros_like(x, dtype=dtype)
        if da is not None:
            out = out + da.view(1, -1, 1, 1) * x.clamp(max=0)
        return out


def prelu(x: Tensor, a: Tensor) -> Tensor:
    return _PReLU.apply(x, a)


class _AvgPool3x3(torch.autograd.Function):
    """3x3 average pooling, padding 1, excluding padded cells: linear, so its JVP is itself."""

    @staticmethod
    def forward(ctx, x: Tensor, stride: int) -> Tensor:
        ctx.stride = stride
        ctx.save_for_backward(x)
        return F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.avg_pool2d_backward(g, x, [3, 3], [ctx.stride] * 2, [1, 1], False, False, None), None

    @staticmethod
    def jvp(ctx, dx: Tensor, _: None) -> Tensor:
        return F.avg_pool2d(dx, 3, ctx.stride, 1, count_include_pad=False)


def avg_pool_3x3(x: Tensor, stride: int) -> Tensor:
    return _AvgPool3x3.apply(x, stride)
