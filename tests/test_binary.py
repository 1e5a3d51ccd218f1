"""1-bit primitives (method §2.3, Eqs. 4.22, 4.23, 4.34, 4.35) against their definitions."""

from __future__ import annotations

import torch
from torch.autograd import forward_ad as fwAD

from dcpnas.binary import BinaryConv2d, approx_sign, reconstruction_loss, sign_ste

X = torch.tensor([-2.0, -1.0, -0.75, -0.25, 0.0, 0.25, 0.75, 1.0, 1.5], dtype=torch.float64)


def grad_of(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    fn(x).sum().backward()
    return x.grad


def jvp_of(fn, x: torch.Tensor) -> torch.Tensor:
    with fwAD.dual_level():
        return fwAD.unpack_dual(fn(fwAD.make_dual(x, torch.ones_like(x)))).tangent


def test_sign_is_strictly_binary() -> None:
    for fn in (sign_ste, approx_sign):
        out = fn(X)
        assert set(out.tolist()) == {-1.0, 1.0}
        assert out[X == 0].item() == 1.0


def test_clipped_ste_gradient_and_jvp() -> None:
    expected = (X.abs() <= 1).double()  # Eq. 4.35: 1_{|w| <= 1}
    torch.testing.assert_close(grad_of(sign_ste, X), expected)
    torch.testing.assert_close(jvp_of(sign_ste, X), expected)


def test_approx_sign_gradient_and_jvp() -> None:
    # Bi-Real ApproxSign: 2+2x on [-1,0), 2-2x on [0,1), 0 elsewhere.
    expected = torch.tensor([0.0, 0.0, 0.5, 1.5, 2.0, 1.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(grad_of(approx_sign, X), expected)
    torch.testing.assert_close(jvp_of(approx_sign, X), expected)


def make_conv(**kw) -> BinaryConv2d:
    torch.manual_seed(0)
    return BinaryConv2d(3, 4, 3, padding=1, bias=False, **kw).double()


def test_forward_is_beta_times_sign_conv() -> None:
    conv = make_conv(binary_input=True)
    with torch.no_grad():
        conv.beta.mul_(torch.arange(1, 5, dtype=torch.float64).view(-1, 1, 1, 1))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(
        torch.where(x >= 0, 1.0, -1.0).double(), conv.beta * torch.sign(conv.weight), padding=1
    )
    torch.testing.assert_close(conv(x), ref)
    torch.testing.assert_close(conv.beta.flatten()[0], conv.weight[0].abs().mean() * 1.0)  # init mean|w_c|


def test_weight_gradient_is_beta_scaled_clipped_ste() -> None:
    conv = make_conv()
    with torch.no_grad():
        conv.weight.mul_(8)  # push some weights outside [-1, 1]
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    conv(x).pow(2).sum().backward()
    wb = (conv.beta * torch.sign(conv.weight)).detach().requires_grad_()
    torch.nn.functional.conv2d(x, wb, padding=1).pow(2).sum().backward()
    expected = wb.grad * conv.beta.detach() * (conv.weight.abs() <= 1)
    assert (conv.weight.abs() > 1).any()
    torch.testing.assert_close(conv.weight.grad, expected)


def test_reconstruction_gradients_match_closed_form() -> None:
    conv = make_conv()
    mu = 0.2
    (mu * reconstruction_loss(conv)).backward()
    w, beta = conv.weight.detach(), conv.beta.detach()
    b = torch.sign(w)
    # method §3, Eq. 4.34 note: d(mu L_R)/dw = 2 mu (w - beta b); d/dbeta_c = -2 mu sum_c (w - beta b) b
    torch.testing.assert_close(conv.weight.grad, 2 * mu * (w - beta * b))
    torch.testing.assert_close(conv.beta.grad, (-2 * mu * ((w - beta * b) * b).sum(dim=(1, 2, 3), keepdim=True)))
    assert reconstruction_loss(conv).item() == torch.sum((w - beta * b) ** 2).item()


def test_real_weight_conv_has_no_scale() -> None:
    conv = make_conv(binary_weights=False, binary_input=True)
    assert conv.beta is None and "beta" not in dict(conv.named_parameters())
    assert reconstruction_loss(conv).item() == 0.0
