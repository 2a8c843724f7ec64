"""WebDataset tar shards: ``dinokit shard`` writes them, :class:`dinokit.shards.ShardStream` streams them split
over ranks and DataLoader workers (every image exactly once per epoch), and ``dinokit train`` trains on them."""

from __future__ import annotations

import json
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.cli import main
from dinokit.errors import DataError
from dinokit.shards import ShardStream, ShardWriter, expand_braces, is_shard_spec, resolve_shards

from .helpers import TINY_VIT, make_image_folder


def keys_only(sample):
    return sample["key"], sample["index"], sample["label"], sample["seed"]


def as_list(batch):
    return batch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    folder = make_image_folder(root / "imgs", n_per_class=12)  # 24 PNG images, classes a and b
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(folder / "b" / "extra.bmp")  # re-encoded as PNG
    (folder / "a" / "broken.jpg").write_bytes(b"not a jpeg")  # skipped with a warning
    with pytest.warns(UserWarning, match="broken.jpg"):
        assert main(["shard", "--data", str(folder), "--out", str(root / "sh"), "--maxcount", "7"]) == 0
    return root


def test_brace_expansion_and_specs(shards):
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert is_shard_spec("x/{000000..000009}.tar") and is_shard_spec(shards / "sh")
    assert not is_shard_spec(shards / "imgs") and not is_shard_spec("fashion-mnist:/data")
    with pytest.raises(DataError, match=r"000004.tar does not exist \(and 5 more\)"):
        resolve_shards(f"{shards}/sh/{{000000..000009}}.tar")


def test_shard_writes_webdataset_tars_with_an_index(shards):
    sh = shards / "sh"
    index = json.loads((sh / "index.json").read_text())
    assert index["total"] == 25 and index["skipped"] == 1 and index["classes"] == ["a", "b"]
    assert [s["count"] for s in index["shards"]] == [7, 7, 7, 4]
    seen = {}
    for s in index["shards"]:
        with tarfile.open(sh / s["name"]) as tar:
            names = tar.getnames()
            for name in names:
                key, ext = name.split(".", 1)
                seen.setdefault(key, {})[ext] = tar.extractfile(name).read()
    assert len(seen) == 25 and all(set(v) == {"png", "json"} for v in seen.values())
    by_path = {json.loads(v["json"])["path"]: v for v in seen.values()}
    # PNG bytes are stored as they are; the BMP became a PNG; labels and class names come from the sub-folders
    assert by_path["a/img000.png"]["png"] == (shards / "imgs" / "a" / "img000.png").read_bytes()
    assert by_path["b/extra.bmp"]["png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(by_path["b/img003.png"]["json"]) == {"path": "b/img003.png", "label": 1, "class": "b"}
    paths, counts, meta = resolve_shards(f"{sh}/{{000000..000003}}.tar")
    assert counts == [7, 7, 7, 4] and meta["total"] == 25


def _epoch(paths, counts, rank, world, workers, epoch=0, start=0, batch=3, n=None):
    stream = ShardStream(paths, counts, batch, seed=0, rank=rank, world=world, map_fn=keys_only, buffer_size=5)
    stream.set_epoch(epoch, start)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers, collate_fn=as_list,
                                         drop_last=True)
    return [[s[0] for s in b] for b in loader], stream


def test_at_most_once_when_the_total_does_not_divide(shards):
    """25 images, 2 ranks x 2 workers, batch 3: ceil(25/2) = 13 per rank -> 4 iterations (12 images) per rank;
    24 distinct images per epoch, none twice, and a different one left out in another epoch."""
    paths, counts, _ = resolve_shards(shards / "sh")
    used = []
    for epoch in (0, 1):
        seen: list[str] = []
        for rank in (0, 1):
            batches, stream = _epoch(paths, counts, rank, 2, 2, epoch)
            assert len(batches) == stream.batches_per_epoch == 4
            seen += [k for b in batches for k in b]
        assert len(seen) == 24 and max(Counter(seen).values()) == 1
        used.append(set(seen))
    assert used[0] != used[1]


def test_exactly_once_when_the_total_divides(shards, tmp_path):
    """24 images, 2 ranks x 2 workers x batch 3: every key exactly once, in both epochs, in a new order."""
    main(["shard", "--data", str(make_image_folder(tmp_path / "imgs", n_per_class=12)), "--out",
          str(tmp_path / "sh"), "--maxcount", "5"])
    paths, counts, _ = resolve_shards(f"{tmp_path}/sh/{{000000..000004}}.tar")
    assert sum(counts) == 24
    all_keys = set()
    for p in paths:
        with tarfile.open(p) as tar:
            all_keys |= {n.split(".")[0] for n in tar.getnames()}
    epochs = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            batches, _ = _epoch(paths, counts, rank, 2, 2, epoch)
            seen += [k for b in batches for k in b]
        assert sorted(seen) == sorted(all_keys)  # exactly once
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_mid_epoch_resume_continues_the_same_epoch(shards):
    paths, counts, _ = resolve_shards(shards / "sh")
    full, _ = _epoch(paths, counts, 1, 2, 2, epoch=3)
    for start in (1, 2, 3):
        rest, _ = _epoch(paths, counts, 1, 2, 2, epoch=3, start=start)
        assert rest == full[start:]
    one_worker, _ = _epoch(paths, counts, 1, 2, 0, epoch=3)
    assert sorted(k for b in one_worker for k in b) == sorted(k for b in full for k in b)


def test_seeds_and_labels_do_not_depend_on_rank_or_workers(shards):
    paths, counts, _ = resolve_shards(shards / "sh")
    stream = ShardStream(paths, counts, 5, seed=7, map_fn=keys_only, shuffle=False)
    items = list(stream)
    assert [i[1] for i in items] == list(range(25))
    labels = {k: lab for k, _, lab, _ in items}
    assert set(labels.values()) == {0, 1}
    stream2 = ShardStream(paths, counts, 3, seed=7, rank=1, world=2, map_fn=keys_only)
    for key, index, label, seed in stream2:
        assert items[index][3] == seed and labels[key] == label


def test_train_on_shards(shards, tmp_path):
    out = tmp_path / "out"
    spec = f"{shards}/sh/{{000000..000003}}.tar"
    assert main(["train", "--data", spec, "--output-dir", str(out), *TINY_VIT, "--batch-size-per-gpu", "4",
                 "--epochs", "2", "--num-workers", "0"]) == 0
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["iteration"] == 12  # floor(25 / 4) = 6 iterations per epoch
    assert main(["train", "--data", str(shards / "sh"), "--output-dir", str(tmp_path / "o2"), *TINY_VIT,
                 "--batch-size-per-gpu", "8", "--epochs", "1", "--num-workers", "2", "--augment-impl", "fast"]) == 0
    assert torch.load(tmp_path / "o2" / "checkpoint.pth", weights_only=True)["iteration"] == 3


def test_a_corrupt_image_in_a_shard_is_replaced_not_fatal(tmp_path):
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, format="PNG")
    with ShardWriter(tmp_path / "sh", maxcount=10) as w:
        w.write("000000000", {"png": buf.getvalue()})
        w.write("000000001", {"jpg": b"corrupted after sharding"})
    paths, counts, _ = resolve_shards(tmp_path / "sh")
    with pytest.warns(UserWarning, match="000000001.jpg"):
        items = list(ShardStream(paths, counts, 2, shuffle=False))
    assert [i["key"] for i in items] == ["000000000", "000000001"]
    assert np.array_equal(np.asarray(items[1]["image"]), np.asarray(items[0]["image"]))


def test_shard_cli_errors(tmp_path, capsys):
    assert main(["shard", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    a_file = tmp_path / "f"
    a_file.write_text("mine")
    # the output is checked before the data is even looked at
    for out, msg in ((a_file, "is a file, not a folder"), (a_file / "sub", "is not a folder")):
        assert main(["shard", "--data", str(tmp_path / "missing"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err
    assert a_file.read_text() == "mine"
    if Path("/proc/self").is_dir():  # a file system that refuses new folders whatever the permissions say
        data = make_image_folder(tmp_path / "imgs", n_per_class=1)
        assert main(["shard", "--data", str(data), "--out", "/proc/s1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "/proc/s1" in err
    assert main(["train", "--data", f"{tmp_path}/{{000000..000001}}.tar", "--output-dir", str(tmp_path / "t"),
                 *TINY_VIT]) == 2
    assert "000000.tar does not exist" in capsys.readouterr().err


def test_resuming_shards_with_another_worker_count_says_the_batch_order_changes(shards, tmp_path, capsys):
    """With shards the batch composition depends on the worker count: a resume with another count (e.g. auto on
    a machine with other CPUs) warns and names the count that keeps the uninterrupted run's order."""
    out = tmp_path / "out"
    spec = f"{shards}/sh/{{000000..000003}}.tar"
    args = ["train", "--data", spec, "--output-dir", str(out), *TINY_VIT, "--batch-size-per-gpu", "4"]
    assert main([*args, "--epochs", "1", "--num-workers", "0"]) == 0
    assert torch.load(out / "checkpoint.pth", weights_only=True)["loader_workers"] == 0
    with pytest.warns(UserWarning, match="1 loader worker now, 0 when .*--num-workers 0 keeps the order"):
        assert main([*args, "--epochs", "2", "--num-workers", "1"]) == 0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main([*args, "--epochs", "3", "--num-workers", "1"]) == 0  # same count as the last save: quiet
    assert not any("loader worker" in str(w.message) for w in record)
