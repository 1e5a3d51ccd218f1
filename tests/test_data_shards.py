"""Shard format: round trips through memory:// and file://, atomic commits, checksums, and bad-input errors."""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest
from conftest_data import encode, pixels

from pipeline.data.shards import MANIFEST, SCHEMA_VERSION, ShardWriter, open_dataset
from pipeline.data.stream import ShardStream
from pipeline.errors import UserError


@pytest.fixture(params=["memory", "file"])
def uri(request, tmp_path) -> str:
    return f"memory://rt-{uuid.uuid4().hex}" if request.param == "memory" else f"file://{tmp_path}/ds"


def write_example(uri: str) -> dict[str, tuple[int, bytes]]:
    rows = {f"{split}/{i}": (i % 3, encode(pixels(12, 9, i))) for split in ("train", "val") for i in range(9)}
    with ShardWriter(uri, ["x", "y", "z"], shard_bytes=2500, row_group_rows=2, source={"format": "test"}) as w:
        for key, (label, data) in rows.items():
            w.add(key.split("/")[0], key, label, data)
        w.skip("train", "broken.jpg", "OSError: truncated")
    return rows


def test_round_trip(uri):
    rows = write_example(uri)
    ds = open_dataset(uri)
    assert ds.classes == ["x", "y", "z"] and ds.manifest.source == {"format": "test"}
    train = ds.split("train")
    assert train.num_rows == 9 and len(train.shards) > 1 and train.class_counts == [3, 3, 3]
    assert all(sum(s.row_groups) == s.rows and max(s.row_groups) <= 2 for s in train.shards)
    assert train.skipped == [{"source": "broken.jpg", "reason": "OSError: truncated"}]
    ds.verify()
    keys, labels = ds.index("val")
    assert sorted(keys) == sorted(k for k in rows if k.startswith("val/"))
    assert [rows[k][0] for k in keys] == labels.tolist()
    read = {k: (int(y), b) for split in ("train", "val") for b, y, k in _samples(uri, split)}
    assert read == rows, "bytes and labels must come back exactly"
    fs, root = fsspec.core.url_to_fs(uri)
    assert not [p for p in fs.find(root) if ".tmp-" in p], "temporary files left behind"


def _samples(uri: str, split: str):
    s = ShardStream(uri, split, batch_size=None, shuffle=False, drop_last=False, return_keys=True)
    return list(s)


def test_failed_write_leaves_no_dataset(uri):
    with pytest.raises(RuntimeError), ShardWriter(uri, ["a"], shard_bytes=10) as w:
        w.add("train", "k1", 0, b"0123456789")  # one shard is committed...
        raise RuntimeError("crash")  # ...but the manifest never is
    with pytest.raises(UserError, match=r"no dataset at .*manifest.json not found"):
        open_dataset(uri)


def test_tampered_shard_fails_checksum(tmp_path):
    uri = f"file://{tmp_path}/ds"
    write_example(uri)
    shard = open_dataset(uri).split("train").shards[1]
    path = tmp_path / "ds" / shard.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"checksum mismatch in {uri}.*\n  {shard.path}: sha256"):
        open_dataset(uri).verify()
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(UserError, match=rf"shard {shard.path} of split 'train' in {uri} has {len(data) - 10} bytes"):
        open_dataset(uri)
    path.unlink()
    with pytest.raises(UserError, match=rf"shard {shard.path} .* is missing"):
        open_dataset(uri)


def test_manifest_errors(tmp_path):
    uri = f"file://{tmp_path}/ds"
    write_example(uri)
    manifest = tmp_path / "ds" / MANIFEST
    d = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**d, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UserError, match=rf"manifest {uri}/manifest.json has schema_version 2, newer .*upgrade dcpnas"):
        open_dataset(uri)
    manifest.write_text(json.dumps({**d, "splits": {"train": {"shards": "nope"}}}))
    with pytest.raises(UserError, match=f"malformed manifest {uri}/manifest.json"):
        open_dataset(uri)
    manifest.write_text("{not json")
    with pytest.raises(UserError, match="malformed manifest"):
        open_dataset(uri)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("nosuchproto://bucket/ds", "cannot reach 'nosuchproto://bucket/ds': Protocol not known"),
        ("/nonexistent/dcpnas/ds", "no dataset at /nonexistent/dcpnas/ds"),
    ],
)
def test_unreachable_uri(uri, message):
    with pytest.raises(UserError, match=message):
        open_dataset(uri)


def test_unknown_split_names_the_available_ones():
    uri = f"memory://s-{uuid.uuid4().hex}"
    write_example(uri)
    with pytest.raises(UserError, match=r"has no split 'test' \(has: \['train', 'val'\]\)"):
        open_dataset(uri).split("test")
