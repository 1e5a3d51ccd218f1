"""Discrete networks, the candidate ops they are built from and every registered space's supernet (method §2.2, §9)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcpnas.binary import Binarize, BinaryConv2d
from dcpnas.cost import param_counts
from dcpnas.genotype import Genotype, load_genotype
from dcpnas.network import SIZES, NetworkCIFAR, NetworkImageNet, create_network
from dcpnas.ops import OpContext, create_op
from dcpnas.registry import NETWORKS, OPS, SPACES, UnknownNameError
from dcpnas.spaces import get_space
from dcpnas.supernet import SuperNet

STYLE_STAGES = [("darts", "real"), ("bnn", "real"), ("bnn", "binary_act"), ("bnn", "binary_all")]


def _params(model: nn.Module) -> int:
    return param_counts(model)[0]


# ---- candidate ops ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPS.names())
@pytest.mark.parametrize(("style", "stage"), STYLE_STAGES)
@pytest.mark.parametrize("stride", [1, 2])
def test_op_builds_and_keeps_or_halves_the_shape(name: str, style: str, stage: str, stride: int) -> None:
    op = create_op(name, 8, stride, OpContext(style, Binarize.stage(stage)))
    out = op(torch.randn(2, 8, 10, 10))
    assert out.shape == (2, 8, 10 // stride, 10 // stride)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", OPS.names())
def test_op_stage_decides_where_the_betas_are(name: str) -> None:
    convs = [m for m in create_op(name, 8, 2, OpContext("bnn")).modules() if isinstance(m, nn.Conv2d)]
    act = create_op(name, 8, 2, OpContext("bnn", Binarize.stage("binary_act")))
    assert not any("beta" in n for n, _ in act.named_parameters())
    full = create_op(name, 8, 2, OpContext("bnn", Binarize.stage("binary_all")))
    binary = [m for m in full.modules() if isinstance(m, BinaryConv2d)]
    # Every conv of the op becomes a binary-weight conv with its own beta.
    assert len(binary) == len(convs)
    assert all(m.binary_weights and isinstance(m.beta, nn.Parameter) for m in binary)
    assert sum("beta" in n for n, _ in full.named_parameters()) == len(convs)


def test_darts_style_refuses_binary_stages() -> None:
    g = load_genotype("darts_v2")
    with pytest.raises(ValueError, match="real-valued only"):
        NetworkCIFAR(8, 10, 5, g, style="darts", stage="binary_all")


# ---- published sizes --------------------------------------------------------------------------


def test_darts_v2_cifar_has_the_published_3_3m_params() -> None:
    g = load_genotype("darts_v2")
    net = NetworkCIFAR(36, 10, 20, g, auxiliary=True, style="darts")
    # DARTS' train.py log prints 3.349342M (auxiliary head excluded); the construction matches exactly.
    assert _params(net) == 3_349_342
    assert sum(p.numel() for p in net.auxiliary_head.parameters()) > 0


def test_darts_v2_imagenet_has_the_published_4_7m_params() -> None:
    net = NetworkImageNet(48, 1000, 14, load_genotype("darts_v2"), auxiliary=True, style="darts")
    assert _params(net) == 4_718_752  # DARTS train_imagenet.py log: 4.718752M


@pytest.mark.parametrize(("size", "binary_millions"), [("s", 2.51), ("m", 5.56), ("l", 12.37)])
def test_dcpnas_sizes_match_the_spec_count(size: str, binary_millions: float) -> None:
    net = create_network(f"dcpnas_{size}", stage="binary_all")
    C, layers = SIZES["imagenet"][size]
    assert net.num_features == 16 * C == net.classifier.in_features
    assert len(net.cells) == layers and [c.reduction for c in net.cells].count(True) == 2
    _, binary = param_counts(net)
    assert binary == pytest.approx(binary_millions * 1e6, rel=0.01)
    # The spec says every cell conv has binary weights in the repo network; stem and classifier are real.
    cell_convs = [m for m in net.cells.modules() if isinstance(m, nn.Conv2d)]
    assert cell_convs and all(isinstance(m, BinaryConv2d) and m.binary_weights for m in cell_convs)
    assert not any(isinstance(m, BinaryConv2d) for m in [*net.stem0.modules(), *net.stem1.modules()])


def test_dcpnas_l_uses_the_ddpnas_mcn_2_cell_by_default() -> None:
    net = create_network("dcpnas_l")
    assert net.genotype == load_genotype("ddpnas_mcn_2")
    assert net.num_features == 1728


def test_unknown_network_names_the_registered_ones() -> None:
    with pytest.raises(UnknownNameError, match="dcpnas_l"):
        create_network("dcpnas_xl")


# ---- forward behaviour ------------------------------------------------------------------------


def test_cifar_forward_returns_aux_logits_only_in_training() -> None:
    net = NetworkCIFAR(8, 10, 5, "ddpnas_mcn_2", auxiliary=True, stage="binary_all")
    x = torch.randn(2, 3, 32, 32)
    logits, aux = net.train()(x)
    assert logits.shape == aux.shape == (2, 10)
    out = net.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


def test_imagenet_forward_on_a_small_input_and_aux_head() -> None:
    net = NetworkImageNet(8, 7, 3, "tangent_2", auxiliary=True, stage="binary_act", in_channels=1)
    logits, aux = net.train()(torch.randn(2, 1, 224, 224))
    assert logits.shape == aux.shape == (2, 7)
    # Adaptive pooling lets other resolutions through (no aux head in eval mode).
    assert net.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 7)


def test_cells_halve_resolution_and_concat_four_nodes() -> None:
    net = NetworkCIFAR(4, 10, 6, "ddpnas_mcn_2", style="bnn")
    shapes = []
    s0 = s1 = net.stem(torch.randn(1, 3, 16, 16))
    for cell in net.cells:
        s0, s1 = s1, cell(s0, s1)
        shapes.append(tuple(s1.shape[1:]))
    assert shapes == [(16, 16, 16), (16, 16, 16), (32, 8, 8), (32, 8, 8), (64, 4, 4), (64, 4, 4)]


@pytest.mark.parametrize("stage", ["binary_act", "binary_all"])
def test_binary_stages_change_the_output_for_the_same_weights(stage: str) -> None:
    torch.manual_seed(0)
    real = NetworkCIFAR(8, 10, 3, "ddpnas_mcn_2", stage="real").eval()
    binary = NetworkCIFAR(8, 10, 3, "ddpnas_mcn_2", stage=stage).eval()
    missing, unexpected = binary.load_state_dict(real.state_dict(), strict=False)
    assert not unexpected and all(k.endswith(".beta") for k in missing)
    assert bool(missing) == (stage == "binary_all")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(real(x), binary(x), atol=1e-4)
        # Same weights, same stage: identical outputs (the difference above is the binarisation).
        assert torch.equal(binary(x), binary(x))


def test_binarize_depthwise_input_binarizes_only_in_binary_stages() -> None:
    def depthwise(net: nn.Module) -> list[BinaryConv2d]:
        return [m for m in net.modules() if isinstance(m, BinaryConv2d) and m.groups > 1]

    on = NetworkCIFAR(8, 10, 3, "ddpnas_mcn_2", stage="binary_all", binarize_depthwise_input=True)
    off = NetworkCIFAR(8, 10, 3, "ddpnas_mcn_2", stage="binary_all")
    assert depthwise(on) and all(m.binary_input for m in depthwise(on))
    assert not any(m.binary_input for m in depthwise(off))
    real = NetworkCIFAR(8, 10, 3, "ddpnas_mcn_2", stage="real", binarize_depthwise_input=True)
    assert not any(isinstance(m, BinaryConv2d) for m in real.modules())


def test_drop_path_is_random_in_training_and_off_in_eval() -> None:
    torch.manual_seed(0)
    net = NetworkCIFAR(8, 10, 3, "darts_v2", style="darts", drop_path=0.5)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(net.train()(x), net(x))
        net.eval()
        assert torch.equal(net(x), net(x))


# ---- every registered space and network -------------------------------------------------------


def space_genotype(space: str) -> Genotype:
    """A genotype of ``space`` derived from a seeded random alpha, so that any of the space's ops may appear."""
    s = get_space(space)
    alpha = torch.randn(2, s.num_edges, s.num_ops, generator=torch.Generator().manual_seed(0))
    return Genotype.from_alphas(alpha, s)


def network_cases() -> list[Any]:
    """Every registered network with a genotype of every space. Networks whose size is an argument run tiny; the
    dcpnas_* presets fix a full ImageNet size (seconds a case), so they run with the slow tests."""
    cases = []
    for network in NETWORKS.names():
        sized = "C" in inspect.signature(NETWORKS.get(network)).parameters
        marks = () if sized else pytest.mark.slow
        cases += [pytest.param(network, space, sized, id=f"{network}-{space}", marks=marks) for space in SPACES]
    return cases


@pytest.mark.parametrize("space", SPACES.names())
def test_every_space_builds_a_supernet_that_gives_logits_and_a_genotype(space: str) -> None:
    s = get_space(space)
    torch.manual_seed(0)
    net = SuperNet(s, num_classes=3, init_channels=4, layers=3, alpha_init_std=0.3)
    logits = net(torch.randn(2, 3, 8, 8))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert Genotype.from_alphas(net.alpha, s).validate().space == space


@pytest.mark.parametrize(("network", "space", "sized"), network_cases())
def test_every_network_builds_from_a_genotype_of_every_space_and_trains(network: str, space: str, sized: bool) -> None:
    torch.manual_seed(0)
    size = {"C": 4, "layers": 3} if sized else {}
    net = create_network(network, num_classes=3, genotype=space_genotype(space), stage="binary_all", **size)
    logits = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
