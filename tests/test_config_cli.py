"""Configuration, the search command and the purity of the method library."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


# The demo search at the size its accuracies were measured at (the packaged demo uses less data, for make run).
DEMO_SEARCH = ["--set", "search.epochs=4", "--set", "search.warmup_epochs=2"]
DEMO_SEARCH += ["--set", "data.weight_fraction=0.5", "--set", "data.arch_fraction=0.5"]


def test_method_library_imports_no_orchestration() -> None:
    forbidden = {"ray", "mlflow", "deepspeed", "pipeline", "pyarrow", "fsspec"}
    for path in (ROOT / "dcpnas").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_overrides_are_typed_and_hash_is_stable() -> None:
    a = load_config(None, ["search.lam=1e-3", "search.arch_betas=[0.9, 0.99]", "search.decoupled=false"])
    assert a.search.lam == 1e-3 and a.search.arch_betas == (0.9, 0.99) and a.search.decoupled is False
    same = ["search.decoupled=false", "search.arch_betas=[0.9,0.99]", "search.lam=0.001"]
    assert a.hash == load_config(None, same).hash
    assert a.hash != load_config(None).hash
    assert a.search_config().lam == 1e-3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.lamb=1", "search.lamb: Extra inputs are not permitted"),
        ("search.epochs=many", "search.epochs: Input should be a valid integer"),
        ("serach.lam=1", "serach: Extra inputs are not permitted"),
        ("search.space=nospace", "unknown search space 'nospace'"),
        ("search.discrepancy=l3", "search.discrepancy: 'l3' is not one of fro, l1, cos"),
        ("data.batch_size=0", "data.batch_size: Input should be greater than 0"),
        ("search.lam", "--set expects key=value"),
    ],
)
def test_bad_config_names_the_field(override: str, message: str, capsys) -> None:
    assert main(["search", "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_config_file(capsys) -> None:
    assert main(["search", "--config", "/nonexistent/x.yaml"]) == 2
    assert "config file not found: /nonexistent/x.yaml" in capsys.readouterr().err


def test_config_file_errors_name_the_file(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("search:\n  epochs: [1\n")
    with pytest.raises(UserError, match=r"bad\.yaml is not valid YAML"):
        load_config(bad)


@pytest.mark.slow
def test_demo_search_on_digits_finds_a_valid_genotype_and_learns(tmp_path, capsys) -> None:
    """The packaged demo on the real digits: 1-bit Child supernet far above chance (10 %)."""
    assert main(["search", "--out", str(tmp_path), *DEMO_SEARCH]) == 0
    run = tmp_path / "demo"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4
    final = metrics[-1]
    assert final["child/val_acc"] > 0.8, final  # measured 0.91 after 4 epochs; chance is 0.1
    assert final["parent/val_acc"] > 0.9, final  # measured 0.98
    assert "child/discrepancy" in final and final["child/discrepancy"] > 0
    from dcpnas.genotype import Genotype

    genotype = Genotype.load(run / "genotype.json").validate()
    assert genotype.hash == final["genotype_hash"]
    for png in ("normal.png", "reduce.png", "alphas.png"):
        assert (run / png).stat().st_size > 1000
    # re-running the same command resumes from the finished checkpoint and changes nothing
    assert main(["search", "--out", str(tmp_path), *DEMO_SEARCH]) == 0
    assert Genotype.load(run / "genotype.json").hash == genotype.hash
    assert "resumed from" in capsys.readouterr().out
    # a different config refuses to resume from that checkpoint
    assert main(["search", "--out", str(tmp_path), "--set", "search.epochs=5", "--set", "search.warmup_epochs=2"]) == 2
