"""Class-balanced search splits: balanced per class, disjoint, seeded, identical across processes, hashed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.data.splits import SearchSplit, balanced_split
from pipeline.errors import UserError

FRACTIONS = st.sampled_from([{"weights": 0.5, "arch": 0.5}, {"weights": 0.1, "arch": 0.025}, {"a": 0.3, "b": 0.3}])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(0, 80), min_size=1, max_size=6), fractions=FRACTIONS, seed=st.integers(0, 2**31))
def test_parts_are_balanced_disjoint_and_seeded(sizes, fractions, seed):
    keys = [f"c{c}-{i}" for c, n in enumerate(sizes) for i in range(n)]
    labels = [c for c, n in enumerate(sizes) for _ in range(n)]
    split = balanced_split(keys, labels, fractions, seed)
    chosen = [k for part in split.parts.values() for k in part]
    assert len(chosen) == len(set(chosen)) and set(chosen) <= set(keys)
    for name, frac in fractions.items():
        per_class = Counter(int(k[1 : k.index("-")]) for k in split.parts[name])
        for c, n in enumerate(sizes):
            assert abs(per_class[c] - frac * n) < 1, f"part {name} is not balanced in class {c}"
            assert (split.class_counts[name] + [0] * len(sizes))[c] == per_class[c]  # listed up to the last label
    if abs(sum(fractions.values()) - 1) < 1e-9:
        assert len(chosen) == len(keys), "fractions summing to 1 use every key"
    shuffled = balanced_split(keys[::-1], labels[::-1], fractions, seed)
    assert shuffled.sha256 == split.sha256, "input order must not matter"


def test_seed_changes_the_split_and_imagenet_fractions():
    keys = [f"{c}/{i}" for c in range(10) for i in range(1300)]
    labels = [c for c in range(10) for _ in range(1300)]
    a = balanced_split(keys, labels, {"weights": 0.1, "arch": 0.025}, seed=0)
    assert [len(a.parts["weights"]), len(a.parts["arch"])] == [1300, 320]
    assert a.class_counts["arch"] == [32] * 10
    assert balanced_split(keys, labels, {"weights": 0.1, "arch": 0.025}, seed=1).parts != a.parts


CHILD = """
from pipeline.data.splits import balanced_split
keys = [f"k{i}" for i in range(997)]
print(balanced_split(keys, [i % 7 for i in range(997)], {"weights": 0.5, "arch": 0.5}, seed=11).sha256)
"""


def test_identical_in_another_process():
    here = balanced_split([f"k{i}" for i in range(997)], [i % 7 for i in range(997)], {"weights": 0.5, "arch": 0.5}, 11)
    env = {"PYTHONHASHSEED": "123"}  # a different str hash seed must not matter either
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == here.sha256


def test_save_load_and_tamper(tmp_path):
    split = balanced_split(["a", "b", "c", "d"], [0, 0, 1, 1], {"weights": 0.5, "arch": 0.5}, 3, source="ds#abc")
    uri = f"file://{tmp_path}/split.json"
    assert split.save(uri) == split.sha256
    loaded = SearchSplit.load(uri)
    assert loaded == split and loaded.sha256 == split.sha256
    d = json.loads((tmp_path / "split.json").read_text())
    d["parts"]["weights"], d["parts"]["arch"] = d["parts"]["arch"], d["parts"]["weights"]
    (tmp_path / "split.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match=f"split file {uri} was modified"):
        SearchSplit.load(uri)
    with pytest.raises(UserError, match="sum to <= 1"):
        balanced_split(["a"], [0], {"weights": 0.7, "arch": 0.7}, 0)
