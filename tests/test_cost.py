"""Cost accounting: params / binary weights / FLOPs / BOPs / OPs / memory (method §9.5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcpnas.binary import conv2d
from dcpnas.cost import Cost, count_cost, param_counts
from dcpnas.network import SIZES, NetworkCIFAR, create_network


def _toy(binary_weights: bool, binary_input: bool) -> nn.Module:
    # conv 3->4 (3x3, pad 1) on 8x8, then a 4->5 conv 1x1 that is binary as asked, then GAP + Linear(5->2).
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        conv2d(4, 5, 1, binary_weights=binary_weights, binary_input=binary_input),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 2),
    )


STAGES = ("real", "binary_act", "binary_all")
REAL_MACS = 64 * 4 * 3 * 9 + 5 * 2  # first conv + linear
BINARY_MACS = 64 * 5 * 4  # the 1x1 conv


@pytest.mark.parametrize(
    ("bw", "bi", "flops", "bops"),
    [
        (False, False, REAL_MACS + BINARY_MACS, 0),
        (False, True, REAL_MACS + BINARY_MACS, 0),  # real weights x sign(input): still float MACs
        (True, False, REAL_MACS + BINARY_MACS, 0),  # binary weights x real input: counted as FLOPs
        (True, True, REAL_MACS, BINARY_MACS),  # XNOR-popcount
    ],
)
def test_macs_go_to_flops_or_bops(bw: bool, bi: bool, flops: int, bops: int) -> None:
    model = _toy(bw, bi)
    model.input_size = 8
    cost = count_cost(model, (3, 3, 8, 8))  # per sample, whatever the batch
    assert (cost.flops, cost.bops) == (flops, bops)
    n_binary = 20 if bw else 0
    assert cost.binary_weights == n_binary
    assert cost.params == 3 * 4 * 9 + 4 * 5 + (5 if bw else 0) + 5 * 2 + 2  # a beta per output channel if bw
    assert cost.real_params == cost.params - n_binary
    assert cost.ops == pytest.approx(bops / 64 + flops)
    assert cost.memory_mbit == pytest.approx((n_binary + 32 * cost.real_params) / 1e6)
    assert count_cost(model) == cost  # default input: batch 1 at the model's input_size


def test_as_dict_has_the_derived_fields() -> None:
    d = Cost(params=10, binary_weights=4, real_params=6, flops=100, bops=640).as_dict()
    assert d == {
        "params": 10,
        "binary_weights": 4,
        "real_params": 6,
        "flops": 100,
        "bops": 640,
        "ops": 110.0,
        "memory_mbit": (4 + 32 * 6) / 1e6,
    }


def test_auxiliary_head_is_excluded_and_mode_restored() -> None:
    torch.manual_seed(0)
    plain = NetworkCIFAR(8, 10, 5, "ddpnas_mcn_2", stage="binary_all")
    aux = NetworkCIFAR(8, 10, 5, "ddpnas_mcn_2", stage="binary_all", auxiliary=True).train()
    assert count_cost(aux) == count_cost(plain)
    assert aux.training


def test_stages_move_macs_between_flops_and_bops() -> None:
    costs = {
        s: count_cost(NetworkCIFAR(8, 10, 5, "ddpnas_mcn_2", stage=s)) for s in ("real", "binary_act", "binary_all")
    }
    real, act, full = costs["real"], costs["binary_act"], costs["binary_all"]
    assert real.bops == act.bops == 0 and real.binary_weights == act.binary_weights == 0
    assert full.bops > 0 and full.flops + full.bops == real.flops == act.flops
    assert full.params == real.params + sum(  # binary_all adds one beta per output channel of each cell conv
        m.out_channels for m in NetworkCIFAR(8, 10, 5, "ddpnas_mcn_2").cells.modules() if isinstance(m, nn.Conv2d)
    )


def test_param_counts_need_no_forward() -> None:
    net = create_network("dcpnas_s", stage="binary_all")
    params, binary = param_counts(net)
    assert params == sum(p.numel() for p in net.parameters())
    assert 0 < binary < params


# Method §9.5 (an independent count): FLOPs = real-activation MACs in cells + stem and head.
SPEC_FLOPS_G = {"s": 0.17 + 0.06, "m": 0.37 + 0.12, "l": 0.81 + 0.27}


@pytest.mark.parametrize("size", ["s", pytest.param("m", marks=pytest.mark.slow), "l"])
def test_dcpnas_imagenet_cost(size: str) -> None:
    C = SIZES["imagenet"][size][0]
    cost = count_cost(create_network(f"dcpnas_{size}", stage="binary_all"))
    # Binary-activation convs are the pointwise 1x1 convs of sep/dil ops, each C_cell^2 * HW MACs, and
    # C_cell^2 * HW = C^2 * 28^2 in every cell: DDPNAS_MCN_2 has 6 per normal cell (x8) and 9 per
    # reduction cell (x2).
    assert cost.bops == (8 * 6 + 2 * 9) * C * C * 28 * 28
    assert cost.flops / 1e9 == pytest.approx(SPEC_FLOPS_G[size], rel=0.04)
    assert cost.ops == pytest.approx(cost.flops + cost.bops / 64)
