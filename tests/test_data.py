"""Data sets: folder listing (torchvision order), robust decoding of every image mode, skipping of unreadable
files, IDX / Fashion-MNIST reading, data-set specs and the download fallback."""

from __future__ import annotations

import gzip
import io
import os
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit.data as D
from dinokit.data import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    TensorImageDataset,
    build_dataset,
    count_skipped,
    load_fashion_mnist,
    load_idx,
    load_image,
    save_idx,
    to_rgb,
)
from dinokit.errors import ConfigError, DataError


def _rgb(w=12, h=10, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _good_folder(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _rgb(seed=i).save(root / f"good{i}.png")
    return root


# ---------------------------------------------------------------------------------------------------------
# folder listing


def test_extensions_cover_common_formats():
    for ext in (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"):
        assert ext in IMAGE_EXTENSIONS
    assert D._is_image_file("A.JPG") and D._is_image_file("b.TiFf") and not D._is_image_file("notes.txt")


def test_order_and_labels_equal_torchvision_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    layout = {"dog": ["b.png", "a.JPG", "z/c.png", "y/x/d.jpeg"], "cat": ["k.png", "B.png", "a.bmp"],
              "bird": ["m.ppm"], "empty_class": []}
    for cls, files in layout.items():
        (tmp_path / cls).mkdir()
        for i, f in enumerate(files):
            (tmp_path / cls / f).parent.mkdir(parents=True, exist_ok=True)
            _rgb(seed=i).save(tmp_path / cls / f, format="PNG" if f.lower().endswith("png") else None)
    (tmp_path / "cat" / "readme.txt").write_text("not an image")
    ours = ImageFolderDataset(tmp_path)
    ref = ImageFolder(str(tmp_path), allow_empty=True)
    assert ours.classes == ref.classes == ["bird", "cat", "dog", "empty_class"]
    assert ours.class_to_idx == ref.class_to_idx
    assert [(Path(p), y) for p, y in ours.samples] == [(Path(p), y) for p, y in ref.samples]
    assert ours.labels.dtype == torch.int64 and ours.labels.tolist() == ref.targets
    assert ours.has_labels and len(ours) == 8


def test_flat_folder_without_classes_has_unknown_labels(tmp_path):
    for name in ("b.png", "a.png", "C.jpg"):
        _rgb().save(tmp_path / name)
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == [] and not ds.has_labels
    assert [Path(p).name for p, _ in ds.samples] == ["C.jpg", "a.png", "b.png"]  # sorted by name
    assert ds.labels.tolist() == [-1, -1, -1]
    img, label = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == -1


def test_root_files_come_first_with_label_minus_one(tmp_path):
    _rgb().save(tmp_path / "loose.png")
    (tmp_path / "cls").mkdir()
    _rgb().save(tmp_path / "cls" / "x.png")
    ds = ImageFolderDataset(tmp_path)
    assert ds.labels.tolist() == [-1, 0] and ds.classes == ["cls"] and not ds.has_labels


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no_images"])
def test_bad_roots_raise_data_error_naming_the_path(tmp_path, case):
    root = tmp_path / "data"
    if case == "file":
        root.write_text("x")
    elif case == "empty":
        root.mkdir()
    elif case == "no_images":
        (root / "cls").mkdir(parents=True)
        (root / "cls" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="data"):
        ImageFolderDataset(root)


def test_transform_is_applied(tmp_path):
    from dinokit.augmentation import eval_transform

    ds = ImageFolderDataset(_good_folder(tmp_path), transform=eval_transform(32))
    x, label = ds[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and label == -1


# ---------------------------------------------------------------------------------------------------------
# decoding every mode


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "1", "I;16", "I", "CMYK", "RGB"])
def test_every_mode_loads_as_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (9, 13), dtype=np.uint16))
    elif mode == "I":
        img = Image.fromarray(rng.integers(0, 65536, (9, 13)).astype(np.int32), "I")
    elif mode == "P":
        img = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        img = base.convert(mode)
    ext = {"CMYK": ".jpg", "I": ".tif", "I;16": ".png"}.get(mode, ".png")
    path = _save(img, tmp_path / f"img_{mode.replace(';', '')}{ext}")
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (13, 9)


def test_palette_with_transparency_and_gif(tmp_path):
    img = _rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    img.info["transparency"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's "Palette images with Transparency" warning must not appear
        assert load_image(_save(img, tmp_path / "t.png")).mode == "RGB"
        assert load_image(_save(img, tmp_path / "t.gif")).mode == "RGB"


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    a = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    out = np.asarray(load_image(_save(Image.fromarray(a), tmp_path / "16.png")))
    assert out[0, :, 0].tolist() == [0, 4, 128, 255]  # /257, not min(v, 255)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    # in-memory conversions of high-bit-depth modes
    assert to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")).getpixel((1, 0)) == (128,) * 3
    assert to_rgb(Image.fromarray(np.array([[0, 100, 255]], np.int32), "I")).getpixel((1, 0)) == (100,) * 3
    assert to_rgb(Image.fromarray(np.array([[-5, 0, 5]], np.int32), "I")).getpixel((2, 0)) == (255,) * 3
    la = Image.fromarray(np.full((2, 2, 2), 77, np.uint8), "LA").convert("La")
    assert to_rgb(la).mode == "RGB"


def test_tiny_image_and_exif_rotation(tmp_path):
    assert load_image(_save(Image.new("RGB", (1, 1), (1, 2, 3)), tmp_path / "one.png")).getpixel((0, 0)) == (1, 2, 3)
    img = Image.new("RGB", (30, 10), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (30, 10)
    assert load_image(path).size == (10, 30)


# ---------------------------------------------------------------------------------------------------------
# unreadable files are skipped, with one warning naming them


def _bad_file(tmp_path: Path, kind: str, monkeypatch) -> Path:
    path = tmp_path / f"bad_{kind}.jpg"
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "truncated":
        buf = io.BytesIO()
        _rgb(64, 64).save(buf, format="JPEG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind in ("bomb_error", "bomb_warning"):
        path = path.with_suffix(".png")
        Image.new("L", (100, 100) if kind == "bomb_error" else (40, 40)).save(path)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100x100 > 2x limit: error; 40x40: warning
    return path


@pytest.mark.parametrize("kind", ["zero_bytes", "text", "truncated", "bomb_error", "bomb_warning"])
def test_unreadable_file_is_skipped_with_one_warning(tmp_path, kind, monkeypatch):
    _good_folder(tmp_path, 2)  # good0.png, good1.png
    bad = _bad_file(tmp_path, kind, monkeypatch)  # bad_* sorts before good*
    ds = ImageFolderDataset(tmp_path)
    assert Path(ds.samples[0][0]) == bad
    with pytest.raises(DataError, match=bad.name):
        load_image(bad)
    before = count_skipped()
    with pytest.warns(UserWarning, match=bad.name):
        img, label = ds[0]
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), np.asarray(load_image(ds.samples[1][0])))
    assert ds.count_skipped() == 1 and str(bad) in ds.skipped and count_skipped() == before + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # second time: no new warning, same substitute
        img2, _ = ds[0]
    assert np.array_equal(np.asarray(img), np.asarray(img2)) and ds.count_skipped() == 1


@pytest.mark.parametrize("kind", ["zero_bytes", "text", "truncated", "bomb_error", "bomb_warning"])
def test_unreadable_file_is_skipped_when_the_transform_decodes_paths(tmp_path, kind, monkeypatch):
    """``read`` hands paths to a transform that opens them itself (FastMultiCrop) and skips what it cannot
    read exactly like ``load``: same warning, same substitute, same count."""
    from dinokit.fast_augment import FastMultiCrop

    _good_folder(tmp_path, 2)
    bad = _bad_file(tmp_path, kind, monkeypatch)
    ds = ImageFolderDataset(tmp_path)
    aug = FastMultiCrop(global_crop_size=16, local_crop_size=8, local_crops_number=1)

    def reader(path):
        torch.manual_seed(0)
        return aug(path)

    with pytest.warns(UserWarning, match=bad.name):
        crops, label = ds.read(0, reader)
    ref = reader(ds.samples[1][0])
    assert label == ds.samples[1][1] and all(torch.equal(a, b) for a, b in zip(crops, ref))
    assert ds.count_skipped() == 1 and str(bad) in ds.skipped


def test_last_file_unreadable_wraps_around_and_all_unreadable_raises(tmp_path):
    _good_folder(tmp_path, 1)  # good0.png
    (tmp_path / "zz.png").write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path)
    with pytest.warns(UserWarning, match="zz.png"):
        img, _ = ds[1]
    assert np.array_equal(np.asarray(img), np.asarray(load_image(tmp_path / "good0.png")))

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    for i in range(2):
        (only_bad / f"x{i}.jpg").write_bytes(b"")
    ds = ImageFolderDataset(only_bad)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 2"):
        ds[0]


# ---------------------------------------------------------------------------------------------------------
# IDX and Fashion-MNIST


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    arr = (np.random.default_rng(0).standard_normal((3, 4, 5)) * 50).astype(dtype)
    path = save_idx(tmp_path / f"a.idx{suffix}", arr)
    if suffix:
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    out = load_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == arr.shape and np.array_equal(out, arr)


def test_idx_header_validation(tmp_path):
    good = save_idx(tmp_path / "good.idx", np.arange(12, dtype=np.uint8).reshape(3, 4)).read_bytes()
    cases = {
        "truncated": good[:-1],
        "trailing": good + b"\0",
        "short_header": good[:6],
        "bad_magic": b"\x01\x00" + good[2:],
        "bad_type": good[:2] + b"\x07" + good[3:],
        "empty": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=name):
            load_idx(tmp_path / name)
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(good)[:-6])
    with pytest.raises(DataError, match="trunc.gz"):
        load_idx(tmp_path / "trunc.gz")
    with pytest.raises(DataError, match="does not exist"):
        load_idx(tmp_path / "missing.idx")


def _fake_fmnist(root: Path, gz: bool = True, n: int = 5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, m in (("train", n), ("t10k", n - 2)):
        sfx = ".gz" if gz else ""
        save_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (m, 28, 28), dtype=np.uint8))
        save_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", np.arange(m, dtype=np.uint8) % 10)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist(tmp_path, gz):
    root = _fake_fmnist(tmp_path / "fm", gz=gz)
    x, y = load_fashion_mnist(root, "train")
    assert x.shape == (5, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.tolist() == [0, 1, 2, 3, 4]
    assert load_fashion_mnist(root, "test")[0].shape == (3, 28, 28)
    with pytest.raises(ConfigError, match="split"):
        load_fashion_mnist(root, "val")
    with pytest.raises(DataError, match="does not exist"):
        load_fashion_mnist(tmp_path / "nope")
    (root / ("t10k-labels-idx1-ubyte" + (".gz" if gz else ""))).unlink()
    with pytest.raises(DataError, match="t10k-labels"):
        load_fashion_mnist(root, "test")


def test_load_fashion_mnist_checks_label_count(tmp_path):
    root = _fake_fmnist(tmp_path)
    save_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="labels"):
        load_fashion_mnist(root)


@pytest.mark.skipif(not Path(D.DEFAULT_FASHION_MNIST_DIRS[0], "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed")
def test_real_fashion_mnist_test_split():
    ds = build_dataset("fashion-mnist", split="test")
    assert ds.images.shape == (10000, 28, 28) and ds.has_labels
    assert sorted(ds.labels.unique().tolist()) == list(range(10)) and len(ds.classes) == 10


def test_tensor_image_dataset(tmp_path):
    imgs = torch.randint(0, 256, (4, 6, 7), dtype=torch.uint8)
    ds = TensorImageDataset(imgs)
    assert not ds.has_labels and ds.labels.tolist() == [-1] * 4
    x, y = ds[2]
    assert torch.equal(x, imgs[2]) and y == -1
    seen = []
    ds = TensorImageDataset(imgs, torch.arange(4), transform=lambda im: seen.append(im) or im.size)
    assert ds.has_labels and ds[1] == ((7, 6), 1)
    assert seen[0].mode == "RGB" and np.array_equal(np.asarray(seen[0])[..., 2], imgs[1].numpy())
    for c in (1, 3, 4):
        ds = TensorImageDataset(torch.randint(0, 256, (2, c, 5, 5), dtype=torch.uint8), transform=lambda im: im)
        assert ds[0][0].mode == "RGB" and ds[0][0].size == (5, 5)
    with pytest.raises(DataError, match="uint8"):
        TensorImageDataset(torch.zeros(2, 5, 5))
    with pytest.raises(DataError, match="labels"):
        TensorImageDataset(imgs, torch.zeros(3))


# ---------------------------------------------------------------------------------------------------------
# specs


def test_build_dataset_specs(tmp_path, monkeypatch):
    root = _fake_fmnist(tmp_path / "fm")
    ds = build_dataset(f"fashion-mnist:{root}")
    assert isinstance(ds, TensorImageDataset) and len(ds) == 5 and ds.has_labels and len(ds.classes) == 10
    assert len(build_dataset(f"fashion-mnist:{root}", split="test")) == 3
    monkeypatch.setattr(D, "DEFAULT_FASHION_MNIST_DIRS", (str(tmp_path / "none"), str(root)))
    assert len(build_dataset("fashion-mnist")) == 5
    monkeypatch.setattr(D, "DEFAULT_FASHION_MNIST_DIRS", (str(tmp_path / "none"),))
    with pytest.raises(DataError, match="none"):
        build_dataset("fashion-mnist")
    with pytest.raises(ConfigError, match="split"):
        build_dataset(f"fashion-mnist:{root}", split="val")
    folder = _good_folder(tmp_path / "imgs")
    ds = build_dataset(str(folder), split="test")  # split is ignored for folders
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 3 and ds.labels.tolist() == [-1] * 3
    for bad in ("imagenet:/x", "", str(tmp_path / "missing")):
        with pytest.raises(DataError):
            build_dataset(bad)


# ---------------------------------------------------------------------------------------------------------
# download fallback (no network in tests)


class _FakeFashionMNIST:
    def __init__(self, root, train=True, download=False):
        raw = Path(root) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        prefix = "train" if train else "t10k"
        save_idx(raw / f"{prefix}-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(  # only the extracted file: gets re-gzipped
            gzip.decompress(save_idx(raw / "tmp.gz", np.zeros(2, np.uint8)).read_bytes()))


class _OfflineFashionMNIST:
    def __init__(self, *a, **k):
        raise urllib.error.URLError("no network")


def test_download_fashion_mnist(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _FakeFashionMNIST)
    dest = tmp_path / "fm"
    assert D.main(["download-fashion-mnist", str(dest)]) == 0
    x, y = load_fashion_mnist(dest, "train")
    assert x.shape == (2, 28, 28) and y.shape == (2,)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        f"{s}-{k}-idx{d}-ubyte.gz" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1)))

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _OfflineFashionMNIST)
    assert D.main(["download-fashion-mnist", str(tmp_path / "other")]) == DataError.exit_code
    err = capsys.readouterr().err
    assert err.startswith("dinokit: error: could not download Fashion-MNIST") and "no network" in err


def test_a_class_folder_that_cannot_be_listed_is_an_error_not_left_out(tmp_path, monkeypatch):
    """os.walk skipped an unreadable sub-folder without a word: training and k-NN ran on part of the data (a class
    lost: k-NN said "1 classes", 100%)."""
    import os

    from dinokit.data import ImageFolderDataset

    from .helpers import make_image_folder

    root = make_image_folder(tmp_path / "imgs", n_per_class=2)
    hidden = sorted(p for p in root.iterdir() if p.is_dir())[1]
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == os.fspath(hidden):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=f"cannot list {hidden} \\(under the image directory .*\\): Permission denied"):
        ImageFolderDataset(root)


def test_an_unreadable_file_is_warned_once_not_once_per_loader_worker(tmp_path):
    """Each DataLoader worker warned of the same file (111 deleted files gave 222 warnings with 2 workers). A worker
    holds a copy of the data set sharing its flags, and a process-local record of the warnings given."""
    import copy

    import dinokit.data as D

    from .helpers import make_image_folder

    root = make_image_folder(tmp_path / "imgs", n_per_class=2)
    bad = sorted(root.rglob("*.png"))[0]
    bad.write_bytes(b"")
    ds = D.ImageFolderDataset(root)
    worker = copy.copy(ds)  # the same shared-memory flags, as a forked or spawned worker has
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        ds.load(0)
    D._SKIPPED.discard(str(bad))  # the other process has not warned
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        worker.load(0)


def test_a_symbolic_link_loop_lists_each_folder_once(tmp_path):
    """One image plus sub/up -> .. gave 41 samples silently (os.walk follows the loop until the path is too
    long); two back-links per folder grow exponentially."""
    from dinokit.data import ImageFolderDataset

    from .helpers import make_image_folder

    root = make_image_folder(tmp_path / "imgs", n_per_class=2)
    cls = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (cls / "sub").mkdir()
    (cls / "sub" / "up").symlink_to("..")
    with pytest.warns(UserWarning, match="reached again through symbolic links .*: each is listed once"):
        ds = ImageFolderDataset(root)
    assert len(ds) == len(list(root.rglob("*.png")))


def test_a_link_from_a_class_up_to_the_root_does_not_relabel_other_classes(tmp_path):
    """a/up -> .. walked b/ again inside a/: b's images came twice, once labelled a."""
    from dinokit.data import ImageFolderDataset

    from .helpers import make_image_folder

    root = make_image_folder(tmp_path / "imgs", n_per_class=2)
    first = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (first / "up").symlink_to("..")
    with pytest.warns(UserWarning, match="reached again through symbolic links"):
        ds = ImageFolderDataset(root)
    assert len(ds) == len(list(root.rglob("*.png"))) and len({p for p, _ in ds.samples}) == len(ds)
    assert all(ds.classes[label] == os.path.relpath(p, root).split(os.sep)[0] for p, label in ds.samples)
