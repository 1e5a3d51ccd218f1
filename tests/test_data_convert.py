"""Converters and the `dcpnas data` CLI on generated fixture trees (ImageNet layouts, CIFAR-10, digits, idx)."""

from __future__ import annotations

import argparse
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest_data import (
    odd_images,
    write_cifar,
    write_devkit,
    write_fashion_mnist,
    write_flat_val,
    write_folder,
    write_idx,
    write_loc_csv,
)
from PIL import Image

import pipeline.data.convert as convert_mod
from pipeline.commands import data as cli
from pipeline.data.convert import Options, convert
from pipeline.data.idx import fashion_mnist
from pipeline.data.shards import open_dataset
from pipeline.data.sources import cifar10, digits, imagefolder, imagenet
from pipeline.data.stream import ShardStream
from pipeline.errors import UserError

CLASSES = ["n01440764", "n01443537", "n01484850"]
VAL = ["n01484850", "n01440764", "n01443537", "n01440764", "n01484850"]
SMALL = Options(shard_bytes=4000, workers=1, progress=False)


def imagenet_tree(root: Path, val: str) -> Path:
    write_folder(root / "train", CLASSES, 5)
    for name, data in odd_images().items():
        (root / "train" / CLASSES[1] / name).write_bytes(data)
    if val == "folder":
        write_folder(root / "val", CLASSES, 2, seed=777)
        return root
    write_flat_val(root, VAL)
    if val == "devkit":
        write_devkit(root, [CLASSES[2], CLASSES[0], CLASSES[1]], VAL)  # devkit ids are not in wnid order
    else:
        write_loc_csv(root / "LOC_val_solution.csv", VAL)
    return root


def rows(uri: str, split: str) -> dict[str, tuple[int, bytes]]:
    stream = ShardStream(uri, split, batch_size=None, shuffle=False, drop_last=False, return_keys=True)
    return {k: (y, b) for b, y, k in stream}


@pytest.mark.parametrize("val", ["devkit", "loc", "folder"])
def test_imagenet_layouts_and_awkward_files(tmp_path, val):
    src = imagenet_tree(tmp_path / "src", val)
    out = f"file://{tmp_path}/out"
    manifest = convert(imagenet(str(src)), out, SMALL)
    train = manifest.splits["train"]
    assert manifest.classes == CLASSES and len(train.shards) > 1
    assert train.class_counts == [5, 8, 5], "cmyk, gray and png-in-JPEG kept; truncated and garbage skipped"
    reasons = {s["source"]: s["reason"] for s in train.skipped}
    assert set(reasons) == {f"{CLASSES[1]}/truncated.JPEG", f"{CLASSES[1]}/garbage.JPEG"}
    assert "not an image format" in reasons[f"{CLASSES[1]}/garbage.JPEG"]
    assert [n["source"] for n in train.normalized] == [f"{CLASSES[1]}/cmyk.JPEG"]

    stored = rows(out, "train")
    odd = odd_images()
    for name in ("gray.JPEG", "png.JPEG"):  # decodable RGB/L JPEG and PNG are stored byte for byte
        assert stored[f"{CLASSES[1]}/{name}"][1] == odd[name]
    cmyk = Image.open(io.BytesIO(stored[f"{CLASSES[1]}/cmyk.JPEG"][1]))
    assert (cmyk.format, cmyk.mode) == ("JPEG", "RGB")
    reference = np.asarray(Image.open(io.BytesIO(odd["cmyk.JPEG"])).convert("RGB"), np.float32)
    assert np.abs(np.asarray(cmyk, np.float32) - reference).mean() < 3
    for key, (label, data) in stored.items():
        assert key.startswith(CLASSES[label] + "/")
        assert Image.open(io.BytesIO(data)).convert("RGB").size in {(48, 36), (40, 30)}

    val_rows = rows(out, "val")
    if val == "folder":
        assert sorted(y for y, _ in val_rows.values()) == [0, 0, 1, 1, 2, 2]
    else:
        assert {k: CLASSES[y] for k, (y, _) in val_rows.items()} == {
            f"ILSVRC2012_val_{i + 1:08d}.JPEG": w for i, w in enumerate(VAL)
        }


def test_resume_keeps_finished_shards(tmp_path, monkeypatch):
    src = imagenet_tree(tmp_path / "src", "loc")
    out = tmp_path / "out"
    real, calls = convert_mod._build_shard, []

    def crash_on_third(task):
        calls.append(task.index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run dies part-way
        return real(task)

    monkeypatch.setattr(convert_mod, "_build_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert(imagenet(str(src)), str(out), SMALL)
    assert not (out / "manifest.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/shard-*.parquet")}
    assert len(finished) == 2
    (out / "train" / "shard-00009.parquet.tmp-dead").write_bytes(b"half a shard")

    monkeypatch.setattr(convert_mod, "_build_shard", real)
    manifest = convert(imagenet(str(src)), str(out), SMALL)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished, "finished shards must not be rebuilt"
    assert not list(out.rglob("*.tmp-*")) and not (out / "_convert").exists()
    fresh = convert(imagenet(str(src)), str(tmp_path / "fresh"), SMALL)
    assert manifest.to_json() == fresh.to_json()
    open_dataset(str(out)).verify()
    assert convert(imagenet(str(src)), str(out), SMALL) == manifest, "a finished conversion is a no-op"


def test_process_pool_gives_the_same_shards(tmp_path):
    src = imagenet_tree(tmp_path / "src", "devkit")
    one = convert(imagenet(str(src)), str(tmp_path / "one"), SMALL)
    two = convert(imagenet(str(src)), str(tmp_path / "two"), Options(shard_bytes=4000, workers=2, progress=False))
    assert one.to_json() == two.to_json()


def test_resize_short_side_reencodes(tmp_path):
    write_folder(tmp_path / "src", ["a", "b"], 3)
    manifest = convert(imagefolder(str(tmp_path / "src")), f"memory://{tmp_path}", Options(resize_short_side=18))
    assert len(manifest.splits["train"].normalized) == 6
    for _, data in rows(f"memory://{tmp_path}", "train").values():
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and min(img.size) == 18 and img.size[0] == 24


def test_cifar10_round_trip_is_pixel_exact(tmp_path):
    images, labels = write_cifar(tmp_path)
    uri = f"memory://cifar-{tmp_path.name}"
    manifest = convert(cifar10(str(tmp_path)), uri, SMALL)
    assert manifest.classes == [f"class{i}" for i in range(10)]
    assert manifest.splits["train"].num_rows == 30 and manifest.splits["test"].num_rows == 6
    for key, (label, data) in rows(uri, "train").items():
        batch, i = key.split("/")
        n = (int(batch[-1]) - 1) * 6 + int(i)
        assert label == labels[n] and np.array_equal(np.asarray(Image.open(io.BytesIO(data))), images[n])


def test_cifar10_refuses_code_in_pickles(tmp_path):
    write_cifar(tmp_path)
    evil = pickle.dumps({b"label_names": [b"x"], b"boom": print})  # any global but numpy's is refused
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(evil)
    with pytest.raises(UserError, match=r"batches.meta is not a CIFAR-10 python batch: builtins.print"):
        cifar10(str(tmp_path))


def test_digits_split_and_lossless(tmp_path):
    from pipeline.data.digits import load_digits_rgb

    uri = f"memory://digits-{tmp_path.name}"
    manifest = convert(digits(), uri, Options(progress=False))
    images, labels = load_digits_rgb()
    train, test = manifest.splits["train"], manifest.splits["test"]
    assert train.num_rows + test.num_rows == len(labels) == 1797
    counts = np.bincount(labels)
    assert all(abs(train.class_counts[c] - 0.8 * counts[c]) < 1 for c in range(10))
    for key, (label, data) in rows(uri, "test").items():
        assert label == labels[int(key)] and np.array_equal(np.asarray(Image.open(io.BytesIO(data))), images[int(key)])


def test_bad_inputs_name_what_and_where(tmp_path):
    with pytest.raises(UserError, match=f"ImageFolder root {tmp_path}/missing not found"):
        imagefolder(str(tmp_path / "missing"))
    with pytest.raises(UserError, match=f"ImageNet train folder {tmp_path}/train not found"):
        imagenet(str(tmp_path))

    write_folder(tmp_path / "empty", ["a", "b"], 2)
    for f in (tmp_path / "empty" / "b").iterdir():
        f.unlink()
    (tmp_path / "empty" / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=f"class folder {tmp_path}/empty/b has no images"):
        imagefolder(str(tmp_path / "empty"))

    src = imagenet_tree(tmp_path / "inet", "loc")
    write_loc_csv(src / "LOC_val_solution.csv", VAL[:-1])  # one image has no label
    with pytest.raises(UserError, match=r"val labels .*LOC_val_solution.csv do not match .* 1 without a label"):
        imagenet(str(src))
    write_loc_csv(src / "LOC_val_solution.csv", [*VAL, "n01440764"])  # a label without an image
    with pytest.raises(UserError, match=r"1 labels without an image \['ILSVRC2012_val_00000006'\]"):
        imagenet(str(src))
    write_loc_csv(src / "LOC_val_solution.csv", [*VAL[:-1], "n09999999"])
    with pytest.raises(UserError, match=r"1 classes not in train/ \['n09999999'\]"):
        imagenet(str(src))
    (src / "LOC_val_solution.csv").unlink()
    with pytest.raises(UserError, match=f"{src}/val is flat and no label file was found: pass --val-labels"):
        imagenet(str(src))

    write_folder(tmp_path / "split" / "train", ["a"], 1)
    write_folder(tmp_path / "split" / "val", ["a", "zzz"], 1)
    with pytest.raises(UserError, match=r"/split/val has class folders that the training classes lack: \['zzz'\]"):
        imagefolder(str(tmp_path / "split"))

    write_folder(tmp_path / "one", ["a"], 2)
    convert(imagefolder(str(tmp_path / "one")), str(tmp_path / "taken"), SMALL)
    write_folder(tmp_path / "one", ["a"], 3)
    with pytest.raises(UserError, match="already holds a dataset converted from other inputs"):
        convert(imagefolder(str(tmp_path / "one")), str(tmp_path / "taken"), SMALL)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="dcpnas")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_convert_and_inspect(tmp_path, capsys):
    src = imagenet_tree(tmp_path / "src", "devkit")
    out = f"file://{tmp_path}/out"
    assert (
        run_cli("data", "convert", "imagenet", str(src), out, "--shard-size", "4kB", "--workers", "1", "--quiet") == 0
    )
    assert "train: 18 rows in" in capsys.readouterr().out
    assert run_cli("data", "inspect", out) == 0
    text = capsys.readouterr().out
    assert "n01443537 class n01443537          8         1" in text  # the devkit's words name the class
    assert f"skipped [train] {CLASSES[1]}/truncated.JPEG" in text and "checksums: all" in text
    assert run_cli("data", "inspect", out, "--json", "--no-verify") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["val"]["class_counts"] == [2, 1, 2] and report["classes"] == CLASSES
    assert report["class_names"] == [f"class {c}" for c in CLASSES]

    shard = next((tmp_path / "out" / "train").glob("*.parquet"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"(?s)checksum mismatch in {out}.*{shard.name}"):
        run_cli("data", "inspect", out)
    assert run_cli("data", "convert", "digits", f"memory://{tmp_path}/d", "--quiet") == 0
    with pytest.raises(SystemExit):
        run_cli("data", "convert", "digits", "x", "--shard-size", "lots")


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_round_trip_is_pixel_exact(tmp_path, gz):
    arrays = write_fashion_mnist(tmp_path / "src", gz=gz)
    out = f"file://{tmp_path}/out"
    assert run_cli("data", "convert", "fashion-mnist", str(tmp_path / "src"), out, "--quiet") == 0
    ds = open_dataset(out)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and len(ds.classes) == 10
    assert ds.manifest.splits["train"].class_counts == [2, 2] + [1] * 8
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[prefix]
        stored = rows(out, split)
        assert len(stored) == len(labels)
        for key, (label, data) in stored.items():
            i = int(key.removeprefix(f"{prefix}/"))
            img = Image.open(io.BytesIO(data))
            assert img.mode == "L" and label == labels[i] and np.array_equal(np.asarray(img), images[i])


def test_fashion_mnist_bad_files_are_named(tmp_path):
    src = tmp_path / "src"
    images, labels = write_fashion_mnist(src, gz=False)["train"]
    (src / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match=f"idx file {src}/t10k-labels-idx1-ubyte \\(or t10k-labels-idx1-ubyte.gz\\)"):
        fashion_mnist(str(src))
    write_idx(src / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))  # 5 test images
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte has 4 labels but t10k-images-idx3-ubyte has 5"):
        fashion_mnist(str(src))
    write_idx(src / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))
    write_idx(src / "train-images-idx3-ubyte", images[:, :, :, None])  # an idx4 file
    with pytest.raises(UserError, match=f"{src}/train-images-idx3-ubyte: wrong magic number 0x00000804"):
        fashion_mnist(str(src))
    raw = write_idx(src / "train-images-idx3-ubyte", images).read_bytes()
    (src / "train-images-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(UserError, match=f"{src}/train-images-idx3-ubyte: 9398 data bytes, but its header"):
        fashion_mnist(str(src))
    (src / "train-images-idx3-ubyte").unlink()
    gz = write_idx(src / "train-images-idx3-ubyte", images, gz=True)
    gz.write_bytes(gz.read_bytes()[:-30])
    with pytest.raises(UserError, match=f"{gz}: not a complete gzip file"):
        fashion_mnist(str(src))
    write_idx(src / "train-images-idx3-ubyte", images, gz=True)
    write_idx(src / "train-labels-idx1-ubyte", labels + 10)
    with pytest.raises(UserError, match="train-labels-idx1-ubyte: label 19 is not a Fashion-MNIST class"):
        fashion_mnist(str(src))


def test_imagenet_class_names_from_the_synset_mapping(tmp_path, capsys):
    src = imagenet_tree(tmp_path / "src", "folder")
    mapping = f"{CLASSES[2]} American lobster, Homarus americanus\n\n{CLASSES[0]} tench, Tinca tinca\n"
    (src / "LOC_synset_mapping.txt").write_text(mapping)  # CLASSES[1] left out: no name, still its wnid
    out = f"file://{tmp_path}/out"
    manifest = convert(imagenet(str(src)), out, SMALL)
    assert manifest.classes == CLASSES  # ids stay the sorted wnids
    assert manifest.class_names == ["tench, Tinca tinca", "", "American lobster, Homarus americanus"]
    assert open_dataset(out).manifest.class_names == manifest.class_names
    assert run_cli("data", "inspect", out, "--no-verify") == 0
    text = capsys.readouterr().out
    assert f"{CLASSES[0]} tench, Tinca tinca " in text and f"{CLASSES[2]} American lobster, Homarus americanus" in text
    assert convert(imagefolder(str(src)), f"file://{tmp_path}/plain", SMALL).class_names == []  # no names known
