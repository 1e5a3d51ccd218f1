"""Genotype derivation, validation, serialisation, and the ``dcpnas genotype`` CLI."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dcpnas.genotype import CELL_TYPES, Genotype, GenotypeError, builtin_genotypes, load_genotype
from dcpnas.spaces import get_space
from pipeline.commands import genotype as genotype_cli
from pipeline.errors import UserError

BUILTINS = ["darts_v2", "ddpnas_chl_i6", "ddpnas_mcn_2", "tangent_1", "tangent_2"]
DARTS_V2_HASH = "2207881de15a2a653780935ac19ef43fd2d5b0883cc462fea1765ea2d6788239"


# ---- builtins and serialisation ---------------------------------------------------------------


def test_builtins_validate_and_match_the_spec() -> None:
    assert builtin_genotypes() == BUILTINS
    for name in BUILTINS:
        load_genotype(name).validate()
    mcn = load_genotype("ddpnas_mcn_2")  # method §8, the DCP-NAS-L cell
    assert mcn.space == "dcpnas" and mcn.normal_concat == mcn.reduce_concat == (2, 3, 4, 5)
    assert mcn.normal[:4] == (("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("dil_conv_3x3", 2), ("skip_connect", 0))
    assert mcn.reduce[-2:] == (("dil_conv_5x5", 2), ("sep_conv_5x5", 1))


def test_json_round_trip(tmp_path: Path) -> None:
    g = load_genotype("ddpnas_mcn_2")
    assert Genotype.from_json(g.to_json()) == g
    assert Genotype.from_json(g.to_json(indent=2)) == g
    assert load_genotype(g.save(tmp_path / "g.json")) == g
    assert json.loads(g.to_json())["schema_version"] == 1


def test_hash_is_stable_and_content_addressed() -> None:
    g = load_genotype("darts_v2")
    assert g.hash == DARTS_V2_HASH  # canonical JSON: changing it would orphan every logged genotype
    twin = Genotype.from_dict(json.loads(g.to_json(indent=4)))
    assert twin is not g and twin.hash == g.hash
    changed = replace(g, normal=(("sep_conv_5x5", 0), *g.normal[1:]))
    assert changed.hash != g.hash


def test_flat_params() -> None:
    g = load_genotype("darts_v2")
    flat = g.flat()
    expected = {"space"} | {
        f"{cell}/{kind}_{node}_{slot}"
        for cell in CELL_TYPES
        for kind in ("op", "input")
        for node in range(2, 6)
        for slot in (0, 1)
    }
    assert set(flat) == expected
    assert flat["space"] == "darts"
    assert (flat["normal/op_2_0"], flat["normal/input_2_1"]) == ("sep_conv_3x3", "1")
    assert (flat["reduce/op_5_1"], flat["reduce/input_5_1"]) == ("max_pool_3x3", "1")
    assert all(isinstance(v, str) for v in flat.values())


# ---- derivation from alphas -------------------------------------------------------------------

OPS = get_space("dcpnas").ops  # max, avg, skip, sep3, sep5, dil3, dil5, none


def _alpha() -> torch.Tensor:
    """Normal cell built by hand (rows in space.edges() order); reduce cell all zeros (ties)."""
    a = torch.zeros(2, 14, 8)
    col = {op: i for i, op in enumerate(OPS)}
    n = a[0]
    n[0, col["none"]], n[0, col["sep_conv_5x5"]] = 10.0, 1.0  # 0->2: 'none' is strongest but never chosen
    n[1, col["skip_connect"]] = 0.5  # 1->2
    n[2, :] = 2.9  # 0->3: strongest raw value but flat, so weak after softmax
    n[2, col["sep_conv_3x3"]] = 3.0
    n[3, :] = -5.0  # 1->3: lower raw value, but dominant after softmax
    n[3, col["dil_conv_3x3"]] = 2.0
    n[4, col["max_pool_3x3"]] = 2.5  # 2->3
    n[5, col["none"]], n[5, col["skip_connect"]] = 10.0, 0.1  # 0->4: 'none' must not rank the edge
    n[6, col["avg_pool_3x3"]] = 1.0  # 1->4
    n[7, col["dil_conv_5x5"]] = 1.0  # 2->4
    n[8, col["sep_conv_5x5"]] = 0.5  # 3->4
    n[11, col["max_pool_3x3"]] = 0.8  # 2->5
    n[13, col["sep_conv_3x3"]] = 1.0  # 4->5
    return a


def test_from_alphas_raw_ranking() -> None:
    g = Genotype.from_alphas(_alpha(), get_space("dcpnas"))
    assert g.normal == (
        ("sep_conv_5x5", 0), ("skip_connect", 1),
        ("sep_conv_3x3", 0), ("max_pool_3x3", 2),
        ("avg_pool_3x3", 1), ("dil_conv_5x5", 2),
        ("max_pool_3x3", 2), ("sep_conv_3x3", 4),
    )  # fmt: skip
    # All-zero rows tie: the lowest edges and the first selectable op win.
    assert g.reduce == tuple(("max_pool_3x3", src) for _ in range(4) for src in (0, 1))
    assert g.normal_concat == g.reduce_concat == (2, 3, 4, 5)
    assert all(op != "none" for op, _ in g.normal + g.reduce)
    g.validate()


def test_from_alphas_softmax_ranking_can_pick_other_edges() -> None:
    g = Genotype.from_alphas(_alpha(), get_space("dcpnas"), ranking="softmax")
    assert g.normal[2:4] == (("dil_conv_3x3", 1), ("max_pool_3x3", 2))
    raw = Genotype.from_alphas(_alpha(), get_space("dcpnas"))
    assert g.normal[:2] == raw.normal[:2] and g.normal[4:] == raw.normal[4:]


def test_from_alphas_rejects_wrong_shape_and_ranking() -> None:
    with pytest.raises(GenotypeError, match=r"\(2, 14, 8\)"):
        Genotype.from_alphas(torch.zeros(2, 14, 6), get_space("dcpnas"))
    with pytest.raises(GenotypeError, match="ranking 'argmax'"):
        Genotype.from_alphas(_alpha(), get_space("dcpnas"), ranking="argmax")


# ---- validation -------------------------------------------------------------------------------


def _with(g: Genotype, cell: str, k: int, edge: tuple) -> Genotype:
    edges = list(getattr(g, cell))
    edges[k] = edge
    return replace(g, **{cell: tuple(edges)})


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda g: _with(g, "normal", 3, ("conv_7x7", 1)), r"normal\[3\]: op 'conv_7x7'"),
        (lambda g: _with(g, "normal", 1, ("none", 1)), r"normal\[1\]: op 'none'"),
        (lambda g: _with(g, "reduce", 4, ("sep_conv_3x3", 4)), r"reduce\[4\]: node 4 cannot take input 4"),
        (lambda g: _with(g, "reduce", 0, ("sep_conv_3x3", -1)), r"reduce\[0\]: node 2 cannot take input -1"),
        (lambda g: replace(g, normal=g.normal[:6]), r"normal: 6 edges"),
        (lambda g: replace(g, reduce_concat=(2, 6)), r"reduce_concat \[2, 6\]"),
        (lambda g: replace(g, space="nope"), r"unknown search space 'nope'"),
    ],
)
def test_validate_names_the_offending_field(mutate: Callable[[Genotype], Genotype], message: str) -> None:
    with pytest.raises(GenotypeError, match=message):
        mutate(load_genotype("ddpnas_mcn_2")).validate()


def test_validate_against_another_space() -> None:
    with pytest.raises(GenotypeError, match="for space 'darts', not 'dcpnas'"):
        load_genotype("darts_v2").validate(get_space("dcpnas"))
    # A cell using 5x5 ops does not fit the 3x3-only space even after renaming the space.
    with pytest.raises(GenotypeError, match="sep_conv_5x5' is not in space 'dcpnas_3x3'"):
        replace(load_genotype("ddpnas_mcn_2"), space="dcpnas_3x3").validate()


def test_from_dict_checks_schema_and_fields() -> None:
    d = load_genotype("tangent_1").to_dict()
    with pytest.raises(GenotypeError, match="schema_version 2"):
        Genotype.from_dict({**d, "schema_version": 2})
    with pytest.raises(GenotypeError, match="schema_version None"):
        Genotype.from_dict({k: v for k, v in d.items() if k != "schema_version"})
    with pytest.raises(GenotypeError, match=r"missing field.*reduce_concat"):
        Genotype.from_dict({k: v for k, v in d.items() if k != "reduce_concat"})
    with pytest.raises(GenotypeError, match=r"\[op, input\] pairs"):
        Genotype.from_dict({**d, "normal": [["sep_conv_3x3"]]})


def test_load_genotype_errors(tmp_path: Path) -> None:
    with pytest.raises(GenotypeError, match=r"unknown genotype 'darts_v9'.*darts_v2"):
        load_genotype("darts_v9")
    with pytest.raises(GenotypeError, match="not found"):
        load_genotype(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(GenotypeError, match="not valid genotype JSON"):
        load_genotype(bad)


# ---- CLI --------------------------------------------------------------------------------------


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="dcpnas")
    genotype_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["genotype", *argv])
    return args.func(args)


def test_cli_show(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert _cli("show", "ddpnas_mcn_2") == 0
    out = capsys.readouterr().out
    assert "node 2: sep_conv_5x5 <- 1, max_pool_3x3 <- 0" in out and "reduce/op_5_1 = sep_conv_5x5" in out
    path = load_genotype("tangent_1").save(tmp_path / "t1.json")
    assert _cli("show", str(path), "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert Genotype.from_dict(shown["genotype"]) == load_genotype("tangent_1")
    assert shown["hash"] == load_genotype("tangent_1").hash and shown["flat"]["space"] == "dcpnas"


def test_cli_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert _cli("plot", "darts_v2", "--out", str(tmp_path / "png")) == 0
    written = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert written == ["darts_v2.png", "darts_v2_normal.png", "darts_v2_reduce.png"]
    assert all((tmp_path / "png" / n).stat().st_size > 5000 for n in written)
    assert str(tmp_path / "png" / "darts_v2.png") in capsys.readouterr().out


def test_cli_cost(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert _cli("cost", "ddpnas_mcn_2", "--network", "cifar", "--channels", "8", "--layers", "5", "--json") == 0
    c = json.loads(capsys.readouterr().out)
    assert (c["network"], c["C"], c["layers"], c["input_size"], c["stage"]) == ("cifar", 8, 5, 32, "binary_all")
    assert c["bops"] > 0 and c["binary_weights"] > 0
    path = load_genotype("darts_v2").save(tmp_path / "dv2.json")
    args = ("cost", str(path), "--network", "cifar", "--size", "l", "--layers", "20", "--style", "darts", "--stage")
    assert _cli(*args, "real") == 0
    out = capsys.readouterr().out
    assert "params                 3.349 M" in out and "BOPs                   0.000 G" in out


@pytest.mark.parametrize(
    ("argv", "error", "message"),
    [
        (("show", "no_such_cell"), GenotypeError, "unknown genotype 'no_such_cell'"),
        (("plot", "missing/g.json"), GenotypeError, "not found"),
        (("cost", "darts_v2", "--style", "darts", "--stage", "binary_all"), UserError, "real-valued only"),
        (("cost", "darts_v2", "--channels", "5", "--layers", "3"), UserError, "even channel count"),
    ],
)
def test_cli_bad_input_raises_user_errors(argv: tuple[str, ...], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        _cli(*argv)


def test_cli_main_exits_2_on_bad_ref(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import cli

    # Subcommands written elsewhere may not exist yet: stand in for the missing ones.
    for name in ("pipeline.stages.search.local", "pipeline.commands.data"):
        if importlib.util.find_spec(name) is None:
            monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(register=lambda sub: None))
    assert cli.main(["genotype", "show", "no_such_cell"]) == 2
    assert "genotype: error: unknown genotype 'no_such_cell'" in capsys.readouterr().err
    assert cli.main(["genotype", "show", "darts_v2"]) == 0
