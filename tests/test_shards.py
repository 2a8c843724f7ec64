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
    (shards / "photos.tar").mkdir(exist_ok=True)  # an image folder named like a tar is a folder
    assert not is_shard_spec(shards / "photos.tar")
    with pytest.raises(DataError, match=r"000004.tar does not exist \(and 5 more\)"):
        resolve_shards(f"{shards}/sh/{{000000..000009}}.tar")
    with pytest.raises(DataError, match=r"\*.tar does not exist; wildcards are not expanded: name the shards as"):
        resolve_shards(f"{shards}/sh/*.tar")
    for url in ("http://host/{000000..000003}.tar", "pipe:curl -s x/000000.tar", "s3://bucket/000000.tar"):
        with pytest.raises(DataError, match=r"shard URLs are not read: dinokit trains from local tar shards"):
            resolve_shards(url)


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


def test_resuming_shards_mid_epoch_with_another_worker_count_says_what_changes(shards, tmp_path, monkeypatch):
    """With shards the batch composition depends on the worker count: a resume in the middle of an epoch with
    another count (e.g. auto on a machine with other CPUs) warns that the rest of that epoch repeats and leaves out
    images, and names the count that resumes exactly; at an epoch boundary any count is fine (quiet)."""
    out = tmp_path / "out"
    spec = f"{shards}/sh/{{000000..000003}}.tar"
    args = ["train", "--data", spec, "--output-dir", str(out), *TINY_VIT, "--batch-size-per-gpu", "4"]
    monkeypatch.setenv("DINOKIT_FAULT", "term_after_iteration:2")  # a graceful stop in the middle of epoch 0
    assert main([*args, "--epochs", "1", "--num-workers", "0"]) == 143
    monkeypatch.delenv("DINOKIT_FAULT")
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["loader_workers"] == 0 and ckpt["step_in_epoch"] == 2
    with pytest.warns(UserWarning, match="1 loader worker now, 0 when .*some images come twice and as many not at "
                                         "all.*--num-workers 0 resumes exactly"):
        assert main([*args, "--epochs", "1", "--num-workers", "1"]) == 0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main([*args, "--epochs", "2", "--num-workers", "0"]) == 0  # resumed at an epoch boundary: quiet
    assert not any("loader worker" in str(w.message) for w in record)


def _jpeg(seed, size=(40, 36)):
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write(out, blobs, maxcount=4):
    """Shards of ``blobs`` (keys 000000000, ...; label = position), JPEG entries unless a blob is not one."""
    with ShardWriter(out, maxcount=maxcount) as w:
        for i, blob in enumerate(blobs):
            w.write(f"{i:09d}", {"jpg": blob, "json": json.dumps({"path": f"{i}.jpg", "label": i}).encode()})
    paths, counts, _ = resolve_shards(out)
    return paths, counts


def _crops(impl):
    from dinokit.augmentation import DINOAugmentation
    from dinokit.fast_augment import FastMultiCrop
    from dinokit.shards import SeededTransform

    kw = dict(global_crop_size=16, local_crop_size=8, local_crops_number=2)
    aug = FastMultiCrop(**kw) if impl == "fast" else DINOAugmentation(**kw)
    transform = SeededTransform(aug, lazy_open=impl == "fast")  # the fast path opens the bytes lazily (draft)

    def map_fn(sample):
        return sample["key"], sample["index"], sample["seed"], transform(sample)

    return map_fn


def _same(a, b):
    return a[:3] == b[:3] and all(torch.equal(x, y) for x, y in zip(a[3], b[3], strict=True))


CORRUPT = b"\0" * 600  # a payload zeroed in place after sharding


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_a_corrupt_first_image_takes_the_next_readable_one_and_nothing_else_changes(tmp_path, impl):
    """The very first image a worker meets is unreadable: it is not fatal, the sample keeps its place, index and
    seed and gets the next readable image of the stream (here past a second corrupt one): exactly the crops of a
    stream whose entry 0 holds that image; every other sample is unchanged."""
    blobs = [_jpeg(i) for i in range(8)]
    clean = _write(tmp_path / "clean", blobs)
    bad = _write(tmp_path / "bad", [CORRUPT, CORRUPT, *blobs[2:]])
    # what the bad shards must give: entry 0 (and 1, the next corrupt one) replaced by image 2
    expected = _write(tmp_path / "expected", [blobs[2], blobs[2], *blobs[2:]])

    def run(paths_counts, **kw):
        stream = ShardStream(*paths_counts, 4, seed=3, shuffle=False, map_fn=_crops(impl), **kw)
        return list(stream)

    with pytest.warns(UserWarning) as record:
        got = run(bad)
    messages = [str(w.message) for w in record if "cannot decode image" in str(w.message)]
    assert len(messages) == 2 and "<_io.BytesIO" not in " ".join(messages)
    assert messages[0].startswith(f"dinokit: cannot decode image {bad[0][0]}:000000000.jpg: ")
    assert messages[0].endswith(f"using the next readable image {bad[0][0]}:000000002.jpg instead")
    reference, want = run(clean), run(expected)
    assert [g[:3] for g in got] == [r[:3] for r in reference]  # keys, indices and seeds: every sample in place
    assert all(_same(g, w) for g, w in zip(got, want, strict=True))
    assert all(_same(g, r) for g, r in zip(got[2:], reference[2:], strict=True))
    assert not _same(got[0], reference[0])


def test_corrupt_images_are_replaced_the_same_way_after_a_mid_epoch_resume(tmp_path):
    """2 workers, a shuffle buffer: the substitute is the next readable image of the worker's shuffled stream
    (wrapping around to its start when the corrupt images end it), chosen without looking at what was decoded
    before, so a resume at any batch gives the uninterrupted epoch's remaining batches exactly; the replaced
    samples are counted (shared flags, from the workers) and the others are those of the clean shards."""
    blobs = [_jpeg(i) for i in range(16)]
    corrupt = {0, 5, 6, 11, 15}
    clean = _write(tmp_path / "clean", blobs)
    bad = _write(tmp_path / "bad", [CORRUPT if i in corrupt else b for i, b in enumerate(blobs)])

    def epoch(paths_counts, start=0):
        def map_fn(sample):
            return sample["key"], sample["label"], sample["seed"], np.asarray(sample["image"]()).tobytes()

        stream = ShardStream(*paths_counts, 2, seed=1, buffer_size=3, map_fn=map_fn)
        stream.set_epoch(2, start)
        loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2, collate_fn=as_list)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(loader), stream

    full, stream = epoch(bad)
    assert stream.count_skipped() == len(corrupt)
    # this shuffle puts a corrupt image first in worker 1's stream (batch 1) and last in worker 0's (batch 6),
    # which wraps around to the worker's first image: every resume point inside the epoch is checked below
    assert full[1][0][0] == "000000005" and full[6][-1][0] == "000000015" and full[6][-1][3] == full[0][0][3]
    assert len(full) == 8 and sorted(s[0] for b in full for s in b) == [f"{i:09d}" for i in range(16)]
    for start in range(1, 8):
        assert epoch(bad, start)[0] == full[start:], start
    readable = {s[3]: s[1] for b in epoch(clean)[0] for s in b}  # image -> its label
    for (key, label, seed, image), (key2, _, seed2, image2) in zip(
            [s for b in full for s in b], [s for b in epoch(clean)[0] for s in b], strict=True):
        assert (key, seed) == (key2, seed2)
        if int(key) in corrupt:  # an image (and label) of another, readable entry
            assert readable[image] == label and label not in corrupt
        else:
            assert image == image2


def test_a_worker_with_no_readable_image_raises(tmp_path):
    paths_counts = _write(tmp_path / "sh", [CORRUPT] * 4)
    with pytest.raises(DataError, match=r"000000000.jpg: .*no image of this worker's part of the epoch is readable"):
        list(ShardStream(*paths_counts, 2, shuffle=False))


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_training_goes_on_past_a_corrupt_image_in_a_shard(tmp_path, impl):
    """``dinokit train`` on shards with an image zeroed in place after sharding (the tar headers intact), with
    both augmentation implementations: one warning naming the shard entry, the run completes, the epoch record
    counts the replaced image."""
    blobs = [_jpeg(i) for i in range(12)]
    _write(tmp_path / "sh", blobs)
    tar_path = tmp_path / "sh" / "000001.tar"
    with tarfile.open(tar_path) as tar:
        member = tar.getmember("000000005.jpg")
    raw = bytearray(tar_path.read_bytes())
    raw[member.offset_data:member.offset_data + member.size] = bytes(member.size)
    tar_path.write_bytes(bytes(raw))
    out = tmp_path / f"out_{impl}"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main(["train", "--data", str(tmp_path / "sh"), "--output-dir", str(out), *TINY_VIT,
                     "--batch-size-per-gpu", "4", "--epochs", "1", "--augment-impl", impl]) == 0
    replaced = [str(w.message) for w in record if "cannot decode image" in str(w.message)]
    assert len(replaced) == 1 and "000001.tar:000000005.jpg" in replaced[0] and "BytesIO" not in replaced[0]
    assert "using the next readable image" in replaced[0]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in records if r.get("type") == "epoch"] == [1]


def test_auto_workers_resume_a_shard_epoch_with_the_count_it_began_with(shards, tmp_path, monkeypatch, capsys):
    """--num-workers auto resolving to another count on resume (another machine) would cut the rest of the epoch
    differently; auto takes the saved count instead (when the CPUs allow it), so the run ends exactly as the
    uninterrupted one."""
    from dinokit import trainer as T

    monkeypatch.setattr(T, "cpus_per_process", lambda: 2)  # auto would be 2 workers
    spec = f"{shards}/sh/{{000000..000003}}.tar"

    def args(out, workers):
        return ["train", "--data", spec, "--output-dir", str(out), *TINY_VIT, "--batch-size-per-gpu", "4",
                "--epochs", "1", "--num-workers", workers]

    assert main(args(tmp_path / "whole", "0")) == 0
    monkeypatch.setenv("DINOKIT_FAULT", "term_after_iteration:2")
    assert main(args(tmp_path / "cut", "0")) == 143
    monkeypatch.delenv("DINOKIT_FAULT")
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main(args(tmp_path / "cut", "-1")) == 0
    assert not any("loader worker" in str(w.message) for w in record)
    assert "0 loader workers as when checkpoint.pth was saved (--num-workers auto would give 2)" in \
        capsys.readouterr().err
    whole = torch.load(tmp_path / "whole" / "checkpoint.pth", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)
    assert whole["iteration"] == cut["iteration"] == 6
    for net in ("student", "teacher"):  # bitwise: the loader's own generator leaves the global RNG (drop path) alone
        assert all(torch.equal(whole[net][k], cut[net][k]) for k in whole[net]), net


def test_shard_never_replaces_a_users_index_nor_writes_into_its_input(tmp_path, capsys):
    """An index.json of the user's in --out was replaced (and the folder then read as shards), and --out inside
    --data was accepted (the shards became a class folder of the images they came from)."""
    data = make_image_folder(tmp_path / "imgs", n_per_class=2)
    mine = tmp_path / "o" / "index.json"
    mine.parent.mkdir()
    mine.write_text('{"annotations": "mine"}')
    for out, msg in ((tmp_path / "o", "index.json exists and would be replaced"), (data, "is inside --data"),
                     (data / "shards", "is inside --data")):
        assert main(["shard", "--data", str(data), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
    assert mine.read_text() == '{"annotations": "mine"}' and not (data / "shards").exists()
    assert not list(data.rglob("*.tar"))


def test_a_folder_named_like_the_fashion_mnist_keyword_is_not_silently_replaced(tmp_path, monkeypatch):
    from dinokit.data import build_dataset

    make_image_folder(tmp_path / "fashion-mnist", n_per_class=1)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="names both the installed Fashion-MNIST and the folder .*write "
                                        "./fashion-mnist for the folder"):
        build_dataset("fashion-mnist")
    assert len(build_dataset("./fashion-mnist")) == 2


def test_a_failed_or_interrupted_shard_run_leaves_nothing_and_can_be_run_again(tmp_path, monkeypatch, capsys):
    """All files unreadable left an empty index.json; Ctrl-C left partial .tar files, and the same command was then
    refused ("already holds .tar files")."""
    import dinokit.shards as S

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.png").write_text("hi")
    assert main(["shard", "--data", str(bad), "--out", str(tmp_path / "o1")]) == 2
    assert "none of the images" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    data = make_image_folder(tmp_path / "imgs", n_per_class=3)
    out = tmp_path / "o2"
    real, calls = S._encode, [0]

    def interrupted(path):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(S, "_encode", interrupted)
    assert main(["shard", "--data", str(data), "--out", str(out), "--maxcount", "2"]) == 130
    assert not out.exists()
    monkeypatch.undo()
    assert main(["shard", "--data", str(data), "--out", str(out), "--maxcount", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "000001.tar", "000002.tar", "index.json"]


def test_a_shard_run_on_a_full_disk_names_the_folder_and_cleans_up(tmp_path, monkeypatch, capsys):
    """It said only "dinokit shard: error: No space left on device"."""
    import dinokit.shards as S

    data = make_image_folder(tmp_path / "imgs", n_per_class=3)
    real, calls = S._encode, [0]

    def full(path):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(28, "No space left on device")
        return real(path)

    monkeypatch.setattr(S, "_encode", full)
    out = tmp_path / "o"
    assert main(["shard", "--data", str(data), "--out", str(out), "--maxcount", "2"]) == 1
    assert capsys.readouterr().err == f"dinokit shard: error: cannot write {out}: No space left on device\n"
    assert not out.exists()


def test_a_shard_run_killed_with_sigterm_cleans_up_as_after_ctrl_c(tmp_path):
    """``kill`` (SIGTERM) ended the process without Python's cleanup: the partial .tar files stayed and the same
    command then refused the folder. Every command but train (which stops itself with a checkpoint) now turns
    SIGTERM into the interruption its cleanup handles, and exits 143."""
    import signal
    import subprocess
    import sys
    import time

    data = make_image_folder(tmp_path / "imgs", n_per_class=4)
    out = tmp_path / "out"
    slow = ("import sys, time; import dinokit.shards as S; real = S._encode\n"
            "def slow(path):\n    time.sleep(0.3); return real(path)\n"
            "S._encode = slow\nfrom dinokit.cli import main\n"
            f"sys.exit(main(['shard', '--data', {str(data)!r}, '--out', {str(out)!r}, '--maxcount', '2']))\n")
    proc = subprocess.Popen([sys.executable, "-c", slow], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(out.glob("*.tar")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(out.glob("*.tar")), "no shard was started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "dinokit shard: terminated (SIGTERM)", err
    assert not out.exists()


def test_an_output_folder_that_is_a_dangling_symlink_is_named(tmp_path, capsys):
    """mkdir through a link to nowhere said only "File exists" (train, shard, attention)."""
    from dinokit.errors import ConfigError
    from dinokit.trainer import Trainer

    from .test_trainer import tiny

    data = make_image_folder(tmp_path / "imgs", n_per_class=3)
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    assert main(["shard", "--data", str(data), "--out", str(link)]) == 2
    err = capsys.readouterr().err
    assert f"--out {link} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist" in err
    with pytest.raises(ConfigError, match="is a symbolic link to .*nowhere, which does not exist"):
        Trainer(tiny(data, link))


def test_a_unicode_path_on_an_ascii_console_does_not_fail_after_the_work(tmp_path):
    """PYTHONIOENCODING=ascii: the final "wrote ..." line raised UnicodeEncodeError (exit 1) after the shards
    were written."""
    import os
    import subprocess
    import sys

    data = make_image_folder(tmp_path / "imgs", n_per_class=2)
    out = tmp_path / "schärds"
    r = subprocess.run([sys.executable, "-m", "dinokit", "shard", "--data", str(data), "--out", str(out)],
                       capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-1500:]
    assert b"sch\\xe4rds" in r.stdout and (out / "index.json").is_file()


def test_sigterm_is_taken_over_only_from_the_default_handler():
    """A launcher's or host program's SIGTERM handler (submitit's requeue, a service) was replaced during a
    command; with Python's default it becomes the interruption the commands clean up after."""
    import signal

    from dinokit.cli import Terminated, _sigterm_interrupts

    def host(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, host)
    try:
        with _sigterm_interrupts(True):
            assert signal.getsignal(signal.SIGTERM) is host
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with _sigterm_interrupts(True):
            with pytest.raises(Terminated):
                signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, old)
