"""Genotypes: the discrete cell derived from the architecture parameters (method §8).

A genotype is a versioned, hashable artifact: canonical JSON (sorted keys, no whitespace)
whose sha256 identifies it across runs, stages and MLflow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dcpnas.spaces import SearchSpace, get_space

SCHEMA_VERSION = 1
CELL_TYPES = ("normal", "reduce")


class GenotypeError(ValueError):
    """A genotype that is malformed or does not fit its search space."""


Edge = tuple[str, int]


@dataclass(frozen=True)
class Genotype:
    """Two cells, each a flat list of (op, input state) pairs, two per intermediate node.

    Input 0 / 1 are the (preprocessed) outputs of cells k-2 / k-1; input 2 + i is node i.
    """

    space: str
    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]

    # ---- derivation -------------------------------------------------------------------------
    @classmethod
    def from_alphas(cls, alpha: Tensor, space: SearchSpace, ranking: str = "raw") -> Genotype:
        """Keep, per node, the two incoming edges with the strongest non-``none`` op.

        ``ranking="raw"`` ranks edges by the raw alpha (the retraining repo's parser);
        ``"softmax"`` by the softmax weights (original DARTS). Ties resolve to the lower index.
        """
        if alpha.shape != (2, space.num_edges, space.num_ops):
            raise GenotypeError(
                f"alpha has shape {tuple(alpha.shape)}, space '{space.name}' needs "
                f"(2, {space.num_edges}, {space.num_ops})"
            )
        if ranking not in ("raw", "softmax"):
            raise GenotypeError(f"unknown ranking '{ranking}'; known: raw, softmax")
        a = alpha.detach().double().cpu()
        if ranking == "softmax":
            a = torch.softmax(a, dim=-1)
        keep = [i for i, o in enumerate(space.ops) if o != "none"]
        cells = []
        for cell in a:
            edges: list[Edge] = []
            start = 0
            for node in range(space.steps):
                rows = cell[start : start + node + 2][:, keep]
                strength, best = rows.max(dim=1)
                order = sorted(range(len(rows)), key=lambda j: (-strength[j].item(), j))[: space.inputs_per_node]
                edges += [(space.ops[keep[int(best[j])]], j) for j in sorted(order)]
                start += node + 2
            cells.append(tuple(edges))
        return cls(space.name, cells[0], space.concat, cells[1], space.concat)

    # ---- validation -------------------------------------------------------------------------
    def validate(self, space: SearchSpace | None = None) -> Genotype:
        """Raise :class:`GenotypeError` naming the first offending entry; return self."""
        try:
            space = space or get_space(self.space)
        except KeyError as e:
            raise GenotypeError(str(e.args[0])) from None
        if space.name != self.space:
            raise GenotypeError(f"genotype is for space '{self.space}', not '{space.name}'")
        n = space.inputs_per_node
        for kind in CELL_TYPES:
            edges, concat = getattr(self, kind), getattr(self, f"{kind}_concat")
            if len(edges) != n * space.steps:
                raise GenotypeError(f"{kind}: {len(edges)} edges, space '{space.name}' needs {n * space.steps}")
            for k, (op, src) in enumerate(edges):
                node = k // n + 2
                if op not in space.selectable_ops:
                    raise GenotypeError(
                        f"{kind}[{k}]: op '{op}' is not in space '{space.name}' "
                        f"(choices: {', '.join(space.selectable_ops)})"
                    )
                if not (isinstance(src, int) and 0 <= src < node):
                    raise GenotypeError(f"{kind}[{k}]: node {node} cannot take input {src!r} (valid: 0..{node - 1})")
            if not concat or any(c not in range(2, 2 + space.steps) for c in concat):
                raise GenotypeError(f"{kind}_concat {list(concat)} must name nodes in 2..{space.steps + 1}")
        return self

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "space": self.space,
            "normal": [[op, src] for op, src in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[op, src] for op, src in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Genotype:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise GenotypeError(
                f"genotype schema_version {version!r} is not supported (this build reads {SCHEMA_VERSION})"
            )
        missing = [k for k in ("space", *CELL_TYPES, "normal_concat", "reduce_concat") if k not in d]
        if missing:
            raise GenotypeError(f"genotype is missing field(s): {', '.join(missing)}")
        try:
            cells = {k: tuple((str(op), int(src)) for op, src in d[k]) for k in CELL_TYPES}
        except (TypeError, ValueError):
            raise GenotypeError("genotype cells must be lists of [op, input] pairs") from None
        return cls(d["space"], cells["normal"], tuple(d["normal_concat"]), cells["reduce"], tuple(d["reduce_concat"]))

    def to_json(self, indent: int | None = None) -> str:
        if indent is None:
            return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise GenotypeError(f"not valid genotype JSON: {e}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Genotype:
        return cls.from_json(Path(path).read_text())

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON: equal genotypes hash equal wherever they come from."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def flat(self) -> dict[str, str]:
        """MLflow-param form: ``normal/op_2_0 = sep_conv_3x3``, ``normal/input_2_0 = 1``, ..."""
        out = {"space": self.space}
        for kind in CELL_TYPES:
            for k, (op, src) in enumerate(getattr(self, kind)):
                node, slot = k // 2 + 2, k % 2
                out[f"{kind}/op_{node}_{slot}"] = op
                out[f"{kind}/input_{node}_{slot}"] = str(src)
        return out

    def count(self, op: str, cell: str = "normal") -> int:
        return sum(o == op for o, _ in getattr(self, cell))

    def describe(self) -> str:
        lines = [f"space: {self.space}   hash: {self.hash[:12]}"]
        for kind in CELL_TYPES:
            lines.append(f"{kind} cell (concat {list(getattr(self, f'{kind}_concat'))}):")
            edges = getattr(self, kind)
            for k in range(0, len(edges), 2):
                pair = ", ".join(f"{op} <- {src}" for op, src in edges[k : k + 2])
                lines.append(f"  node {k // 2 + 2}: {pair}")
        return "\n".join(lines)


_BUILTIN_DIR = Path(__file__).parent / "genotypes"


def builtin_genotypes() -> list[str]:
    """Names of the genotypes shipped with the package (DARTS V2 and the DCP-NAS cells)."""
    return sorted(p.stem for p in _BUILTIN_DIR.glob("*.json"))


def load_genotype(ref: str | Path) -> Genotype:
    """A genotype from a JSON path or a built-in name (``darts_v2``, ``ddpnas_mcn_2``, ...)."""
    path = Path(ref)
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise GenotypeError(f"genotype file not found: {path}")
        return Genotype.load(path).validate()
    builtin = _BUILTIN_DIR / f"{ref}.json"
    if not builtin.exists():
        raise GenotypeError(f"unknown genotype '{ref}'; built-in: {', '.join(builtin_genotypes())}")
    return Genotype.load(builtin).validate()
