"""Discrete networks compiled from a Genotype: the DARTS CIFAR macro and the DCP-NAS ImageNet macro.

Method §9.1 (ImageNet, from the retraining repo), §9.4 (CIFAR, DARTS macro with the binary ops).
The op style picks the op internals (``darts``: real ReLU-conv-BN ops, to reproduce DARTS;
``bnn``: the repo's BN-conv-BN-PReLU ops) and the stage picks what is 1-bit
(:meth:`dcpnas.binary.Binarize.stage`). Stem, auxiliary head and classifier are always real.

Forward returns the logits, or ``(logits, aux_logits)`` when the network was built with
``auxiliary=True`` and is in training mode (the DARTS convention).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from dcpnas.binary import Binarize
from dcpnas.genotype import Genotype, load_genotype
from dcpnas.ops import OpContext, create_op, preprocess
from dcpnas.registry import NETWORKS

# Named widths (init channels, cells). ImageNet from method §9.1 (S is the repo's main.py default [A]);
# CIFAR has no published DCP-NAS sizes, these are the method §9.4 suggestions [A].
SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "imagenet": {"s": (48, 10), "m": (72, 10), "l": (108, 10)},
    "cifar": {"s": (16, 20), "m": (24, 20), "l": (36, 20)},
}


def drop_path(x: Tensor, prob: float) -> Tensor:
    """Zero whole samples with probability ``prob`` and rescale the rest (DARTS' drop-path)."""
    keep = 1.0 - prob
    mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x / keep * mask


class Cell(nn.Module):
    """One genotype cell: preprocess both inputs, apply the chosen ops, sum per node, concat."""

    def __init__(
        self,
        genotype: Genotype,
        c_prev_prev: int,
        c_prev: int,
        c: int,
        reduction: bool,
        reduction_prev: bool,
        ctx: OpContext,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = preprocess(c_prev_prev, c, reduction_prev, ctx)
        self.preprocess1 = preprocess(c_prev, c, False, ctx)
        edges = genotype.reduce if reduction else genotype.normal
        self.concat = tuple(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.indices = tuple(src for _, src in edges)
        self.ops = nn.ModuleList(create_op(op, c, 2 if reduction and src < 2 else 1, ctx) for op, src in edges)
        self.multiplier = len(self.concat)

    def forward(self, s0: Tensor, s1: Tensor, drop_prob: float = 0.0) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for k in range(0, len(self.ops), 2):
            node = 0
            for op, src in zip(self.ops[k : k + 2], self.indices[k : k + 2]):
                h = op(states[src])
                if self.training and drop_prob > 0 and not isinstance(op, nn.Identity):
                    h = drop_path(h, drop_prob)
                node = node + h
            states.append(node)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS auxiliary classifier after the 2nd reduction (CIFAR: 8x8 input, pool stride 3;
    ImageNet: 14x14, stride 2, no BN after the 768-channel conv, as in DARTS)."""

    def __init__(self, c: int, num_classes: int, imagenet: bool) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AvgPool2d(5, stride=2 if imagenet else 3, padding=0, count_include_pad=False),
            nn.Conv2d(c, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            *(() if imagenet else (nn.BatchNorm2d(768),)),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # Adaptive pooling is a no-op at the DARTS input sizes and lets larger inputs through.
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class _Network(nn.Module):
    """Shared macro: stem(s), a stack of cells with reductions at 1/3 and 2/3, GAP + Linear."""

    imagenet = False
    name = ""

    def __init__(
        self,
        C: int,
        num_classes: int,
        layers: int,
        genotype: Genotype | str,
        auxiliary: bool = False,
        stage: str = "real",
        style: str = "bnn",
        in_channels: int = 3,
        drop_path: float = 0.0,
        binarize_depthwise_input: bool = False,
    ) -> None:
        super().__init__()
        self.genotype = (load_genotype(genotype) if isinstance(genotype, str) else genotype).validate()
        # Everything needed to rebuild this network: saved next to its weights (see ``model_file``).
        self.spec = {
            "network": self.name,
            "C": C,
            "num_classes": num_classes,
            "layers": layers,
            "genotype": self.genotype.to_dict(),
            "auxiliary": auxiliary,
            "stage": stage,
            "style": style,
            "in_channels": in_channels,
            "binarize_depthwise_input": binarize_depthwise_input,
        }
        self.stage, self.style, self.layers = stage, style, layers
        self.drop_path_prob = drop_path  # a plain attribute so training loops can ramp it
        ctx = OpContext(style, Binarize.stage(stage, binarize_depthwise_input))
        c_prev_prev, c_prev, c_curr, reduction_prev = self._build_stem(C, in_channels)
        self.cells = nn.ModuleList()
        self.aux_index = 2 * layers // 3
        c_aux = c_prev
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            cell = Cell(self.genotype, c_prev_prev, c_prev, c_curr, reduction, reduction_prev, ctx)
            self.cells.append(cell)
            c_prev_prev, c_prev, reduction_prev = c_prev, cell.multiplier * c_curr, reduction
            if i == self.aux_index:
                c_aux = c_prev
        self.auxiliary_head = AuxiliaryHead(c_aux, num_classes, self.imagenet) if auxiliary else None
        self.num_features = c_prev
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def _build_stem(self, C: int, in_channels: int) -> tuple[int, int, int, bool]:
        """Create the stem modules; return (c_prev_prev, c_prev, c_curr, reduction_prev) for cell 0."""
        raise NotImplementedError

    def _stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        s0, s1 = self._stem(x)
        aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                aux = self.auxiliary_head(s1)
        logits = self.classifier(torch.flatten(self.global_pooling(s1), 1))
        return logits if aux is None else (logits, aux)


class NetworkCIFAR(_Network):
    """DARTS CIFAR macro: conv3x3(in -> 3C) + BN stem at full resolution (method §9.4)."""

    name = "cifar"
    input_size = 32

    def _build_stem(self, C: int, in_channels: int) -> tuple[int, int, int, bool]:
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 3 * C, 3, padding=1, bias=False), nn.BatchNorm2d(3 * C))
        return 3 * C, 3 * C, C, False

    def _stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.stem(x)
        return s, s


class NetworkImageNet(_Network):
    """DARTS / DCP-NAS ImageNet macro: two stems 224 -> 112 -> 56 -> 28; cell 0 factorizes input 0."""

    imagenet = True
    name = "imagenet"
    input_size = 224

    def _build_stem(self, C: int, in_channels: int) -> tuple[int, int, int, bool]:
        self.stem0 = nn.Sequential(
            nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C)
        )
        return C, C, C, True

    def _stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s0 = self.stem0(x)
        # DARTS' (and the repo's) stem1 opens with an in-place ReLU, which also rectifies s0 for cell 0.
        return torch.relu(s0), self.stem1(s0)


def _preset(
    C: int, layers: int, genotype: Genotype | str = "ddpnas_mcn_2", num_classes: int = 1000, **kwargs: Any
) -> nn.Module:
    """A DCP-NAS ImageNet size preset; defaults to the DCP-NAS-L cell (method §8)."""
    return NetworkImageNet(C, num_classes, layers, genotype, **kwargs)


NETWORKS.add("cifar", NetworkCIFAR)
NETWORKS.add("imagenet", NetworkImageNet)
for _size, (_c, _layers) in SIZES["imagenet"].items():
    NETWORKS.add(f"dcpnas_{_size}", partial(_preset, _c, _layers))


def create_network(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered network: ``cifar`` / ``imagenet`` (full signature) or ``dcpnas_s|m|l`` (sized)."""
    return NETWORKS.get(name)(**kwargs)


MODEL_FORMAT = 1


def model_file(model: _Network) -> dict[str, Any]:
    """A self-describing model: the network's spec and its weights (plain types, loadable with weights_only)."""
    return {"format": MODEL_FORMAT, "spec": model.spec, "state_dict": model.state_dict()}


def network_from_file(content: dict[str, Any], **overrides: Any) -> _Network:
    """Rebuild the network of :func:`model_file` output and load its weights (strictly).

    ``overrides`` change the spec before building, e.g. ``stage="binary_all"`` to start step 2 from
    a step-1 file: then use :func:`inherit_weights` instead of a strict load.
    """
    if content.get("format") != MODEL_FORMAT or "spec" not in content:
        raise ValueError(f"not a dcpnas model file (format {content.get('format')!r}, expected {MODEL_FORMAT})")
    spec = {**content["spec"], **overrides}
    name = spec.pop("network")
    spec["genotype"] = Genotype.from_dict(spec["genotype"])
    model = create_network(name, **spec)
    if overrides:
        inherit_weights(model, content["state_dict"])
    else:
        model.load_state_dict(content["state_dict"])
    return model


@torch.no_grad()
def inherit_weights(model: nn.Module, state_dict: dict[str, Tensor]) -> list[str]:
    """Load weights trained in another binarisation stage (e.g. step 1 -> step 2, method §9.3).

    Weight names are the same in every stage; only the scales ``beta`` of binary-weight convs may be
    missing. Those are set to mean|w| per output channel of the *loaded* weights (XNOR's closed form),
    not left at the constructor's random-weight value. Returns the names of the initialised scales.
    """
    from dcpnas.binary import BinaryConv2d

    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches: another width or genotype
        raise ValueError(f"weights do not fit this network: {str(e).splitlines()[1].strip()}") from None
    wrong = [k for k in missing if not k.endswith(".beta")]
    if wrong or unexpected:
        raise ValueError(f"weights do not fit this network: missing {wrong[:5]}, unexpected {list(unexpected)[:5]}")
    modules = dict(model.named_modules())
    for key in missing:
        conv = modules[key.removesuffix(".beta")]
        assert isinstance(conv, BinaryConv2d)
        conv.beta.copy_(conv.weight.abs().mean(dim=(1, 2, 3), keepdim=True))
    return list(missing)
