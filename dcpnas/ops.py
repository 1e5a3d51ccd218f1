"""Candidate operations of the cell, in two styles, registered by name (method §2.2, §9.2).

``darts``: the real-valued DARTS ops (ReLU-conv-BN), used to reproduce published DARTS numbers.
``bnn``: the DCP-NAS retraining ops (BN-conv-BN-PReLU with inner shortcuts), whose convs are
binarised according to a :class:`~dcpnas.binary.Binarize`; with ``REAL`` they form the Parent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcpnas.autodiff import add, avg_pool_3x3, prelu
from dcpnas.binary import REAL, Binarize, conv2d
from dcpnas.registry import OPS

BN_EPS = 1e-3  # the retraining repo's BN epsilon inside binary ops


@dataclass(frozen=True)
class OpContext:
    """How ops are built: style, binarisation, BN affinity, and whether they live in a supernet."""

    style: str = "bnn"
    binarize: Binarize = field(default_factory=lambda: REAL)
    affine: bool = True
    search: bool = False

    def __post_init__(self) -> None:
        if self.style not in ("bnn", "darts"):
            raise ValueError(f"unknown op style '{self.style}'; known: bnn, darts")
        if self.style == "darts" and self.binarize.any:
            raise ValueError("op style 'darts' is real-valued only; use style 'bnn' for binary ops")


def _bn(c: int, ctx: OpContext, eps: float = 1e-5) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=eps, affine=ctx.affine)


class PReLU(nn.PReLU):
    """``nn.PReLU`` (same parameters) with a fast forward-mode derivative, see ``dcpnas.autodiff``."""

    def forward(self, x: Tensor) -> Tensor:
        return prelu(x, self.weight)


class Zero(nn.Module):
    """The 'none' op: zeros (subsampled by the stride)."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class ReLUConvBN(nn.Module):
    """Preprocessing conv. darts: ReLU-conv-BN. bnn: BN-conv(binary weights, real input)-BN-PReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, ctx: OpContext) -> None:
        super().__init__()
        if ctx.style == "darts":
            self.op = nn.Sequential(
                nn.ReLU(inplace=False), conv2d(c_in, c_out, kernel, stride, padding), _bn(c_out, ctx)
            )
        else:
            self.op = nn.Sequential(
                _bn(c_in, ctx, BN_EPS),
                conv2d(c_in, c_out, kernel, stride, padding, binary_weights=ctx.binarize.weights),
                _bn(c_out, ctx, BN_EPS),
                PReLU(c_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two 1x1 stride-2 convs on offset grids, concatenated."""

    def __init__(self, c_in: int, c_out: int, ctx: OpContext) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even channel count, got {c_out}")
        bw = ctx.binarize.weights
        self.pre = nn.ReLU(inplace=False) if ctx.style == "darts" else _bn(c_in, ctx, BN_EPS)
        self.conv_1 = conv2d(c_in, c_out // 2, 1, 2, binary_weights=bw)
        self.conv_2 = conv2d(c_in, c_out // 2, 1, 2, binary_weights=bw)
        eps = 1e-5 if ctx.style == "darts" else BN_EPS
        self.post = _bn(c_out, ctx, eps) if ctx.style == "darts" else nn.Sequential(_bn(c_out, ctx, eps), PReLU(c_out))

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        # Odd sizes: pad so both branches produce the same spatial size.
        y = nn.functional.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        return self.post(torch.cat([self.conv_1(x), self.conv_2(y[:, :, 1:, 1:])], dim=1))


class DilConv(nn.Module):
    """Depthwise k x k (dilated) conv followed by a pointwise conv.

    bnn: BN - dw conv (binary weights, real or binary input) - BN - PReLU - pw conv (binary
    weights and binary input) - BN - (+x when shape-preserving) - PReLU  (method §9.2).
    """

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int, ctx: OpContext
    ) -> None:
        super().__init__()
        b = ctx.binarize
        dw = conv2d(
            c_in,
            c_in,
            kernel,
            stride,
            padding,
            dilation,
            groups=c_in,
            binary_weights=b.weights,
            binary_input=b.depthwise_input,
        )
        pw = conv2d(c_in, c_out, 1, binary_weights=b.weights, binary_input=b.activations)
        if ctx.style == "darts":
            self.op = nn.Sequential(nn.ReLU(inplace=False), dw, pw, _bn(c_out, ctx))
            self.act = None
        else:
            self.op = nn.Sequential(
                _bn(c_in, ctx, BN_EPS), dw, _bn(c_in, ctx, BN_EPS), PReLU(c_in), pw, _bn(c_out, ctx, BN_EPS)
            )
            self.act = PReLU(c_out)
        self.shortcut = ctx.style == "bnn" and stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        y = self.op(x)
        if self.shortcut:
            y = add([y, x])
        return self.act(y) if self.act is not None else y


class SepConv(nn.Sequential):
    """Two stacked depthwise-separable blocks; the first carries the stride."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, ctx: OpContext) -> None:
        super().__init__(
            DilConv(c_in, c_in, kernel, stride, padding, 1, ctx),
            DilConv(c_in, c_out, kernel, 1, padding, 1, ctx),
        )


class Pool(nn.Module):
    """3x3 max/avg pooling; followed by BN in bnn style and inside DARTS supernets."""

    def __init__(self, kind: str, c: int, stride: int, ctx: OpContext) -> None:
        super().__init__()
        self.kernel, self.kind, self.stride = 3, kind, stride
        if ctx.style == "bnn":
            self.bn = _bn(c, ctx, BN_EPS)
        else:
            self.bn = nn.BatchNorm2d(c, affine=False) if ctx.search else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(x, 3, self.stride, 1) if self.kind == "max" else avg_pool_3x3(x, self.stride)
        return self.bn(x) if self.bn is not None else x


def skip_connect(c: int, stride: int, ctx: OpContext) -> nn.Module:
    return nn.Identity() if stride == 1 else FactorizedReduce(c, c, ctx)


OPS.add("none", lambda c, stride, ctx: Zero(stride))
OPS.add("skip_connect", skip_connect)
OPS.add("max_pool_3x3", lambda c, stride, ctx: Pool("max", c, stride, ctx))
OPS.add("avg_pool_3x3", lambda c, stride, ctx: Pool("avg", c, stride, ctx))
OPS.add("sep_conv_3x3", lambda c, stride, ctx: SepConv(c, c, 3, stride, 1, ctx))
OPS.add("sep_conv_5x5", lambda c, stride, ctx: SepConv(c, c, 5, stride, 2, ctx))
OPS.add("dil_conv_3x3", lambda c, stride, ctx: DilConv(c, c, 3, stride, 2, 2, ctx))
OPS.add("dil_conv_5x5", lambda c, stride, ctx: DilConv(c, c, 5, stride, 4, 2, ctx))


def create_op(name: str, c: int, stride: int, ctx: OpContext) -> nn.Module:
    """Build a registered candidate op with ``c`` channels in and out."""
    return OPS.get(name)(c, stride, ctx)


def preprocess(c_in: int, c_out: int, reduce_input: bool, ctx: OpContext) -> nn.Module:
    """A cell input's preprocessing: factorized reduce if the previous cell halved, else a 1x1 conv."""
    return FactorizedReduce(c_in, c_out, ctx) if reduce_input else ReLUConvBN(c_in, c_out, 1, 1, 0, ctx)
