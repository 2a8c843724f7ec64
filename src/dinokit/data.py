"""Data sets for DINO pretraining and evaluation.

* :class:`ImageFolderDataset`: a folder of images, with or without class sub-folders. The reference
  (Caron et al. 2021, ``main_dino.py``) reads ``torchvision.datasets.ImageFolder``; with class sub-folders
  this data set lists the same files in the same order with the same labels, and it also accepts a flat folder
  of unlabelled images (labels ``-1``), which is what self-supervised pretraining really needs.
  Loading is robust: EXIF orientation applied, every PIL mode converted to RGB (16-bit images are rescaled,
  not clipped), and an unreadable file is skipped with one warning instead of crashing the epoch.
* Fashion-MNIST from its IDX files (:func:`load_idx`, :func:`load_fashion_mnist`) and
  :class:`TensorImageDataset` for in-memory uint8 images (the fast batched augmentation path collates these
  raw).
* :func:`build_dataset`: one string spec (``DIR``, ``fashion-mnist``, ``fashion-mnist:DIR``) to a data set.

``python -m dinokit.data download-fashion-mnist DIR`` fetches Fashion-MNIST through torchvision (needs
internet).
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import ConfigError, DataError, DinokitError

__all__ = [
    "IMAGE_EXTENSIONS", "FASHION_MNIST_CLASSES", "DEFAULT_FASHION_MNIST_DIRS", "to_rgb", "as_rgb", "load_image",
    "ImageFolderDataset", "TensorImageDataset", "load_idx", "save_idx", "load_fashion_mnist", "build_dataset",
    "count_skipped", "download_fashion_mnist",
]

#: File name endings (compared case-insensitively) that are treated as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
)

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

#: Where ``build_dataset("fashion-mnist")`` looks, in order (Debian's ``dataset-fashion-mnist`` first).
DEFAULT_FASHION_MNIST_DIRS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist", "./data/fashion-mnist")

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Files skipped in this process (any data set); see count_skipped().
_SKIPPED: set[str] = set()


def count_skipped() -> int:
    """Number of distinct unreadable image files skipped so far **in this process** (DataLoader workers keep
    their own count; this is a diagnostic, not an exact total across workers)."""
    return len(_SKIPPED)


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------------------------------------
# decoding


def _to_uint8_gray(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale a high-bit-depth single-channel array to 0..255 (PIL's own conversion clips instead)."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if a.size == 0:
        return a.astype(np.uint8)
    lo, hi = float(a.min()), float(a.max())
    if mode.startswith("I;16"):
        out = a / 257.0  # fixed 16-bit range: 65535 -> 255
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        out = a * 255.0  # float image in [0, 1]
    elif lo >= 0.0 and hi <= 255.0:
        out = a  # 32-bit container holding 8-bit values
    elif lo >= 0.0 and hi <= 65535.0:
        out = a / 257.0  # 16-bit values (e.g. a 16-bit PNG/TIFF opened as mode "I")
    else:
        out = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)  # arbitrary range: min-max
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB, as the reference's ``ImageFolder`` loader does
    (``convert("RGB")``), but without its pitfalls:

    * 16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) images are **rescaled** to 0..255 (16-bit
      divides by 257; ``I``/``F`` keep 8-bit-valued data as is, treat values up to 65535 as 16-bit and
      min-max-scale anything else; ``F`` in [0, 1] is multiplied by 255). PIL's conversion would clip them to
      white/black.
    * Palette images with transparency go through RGBA (avoids PIL's warning); alpha is dropped like
      ``convert("RGB")`` does (the reference behaviour), grey, CMYK, YCbCr, ... use PIL's conversions.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8_gray(np.asarray(img), mode), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode in ("PA", "RGBa"):
        img = img.convert("RGBA")
    elif mode == "La":  # premultiplied grey + alpha: PIL cannot convert it directly
        img = Image.fromarray(np.ascontiguousarray(np.asarray(img)[..., 0]), "L")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise DataError(f"cannot convert an image of PIL mode {mode!r} to RGB: {err}") from err


def as_rgb(img: Image.Image) -> Image.Image:
    """A PIL image as :func:`load_image` reads a file: EXIF orientation applied (a broken EXIF block keeps it as
    stored) and converted by :func:`to_rgb` (16-bit and float images rescaled, not clipped to white). Never the
    caller's object: a new image is returned (also detached from the file an opened image reads)."""
    try:
        oriented = ImageOps.exif_transpose(img)  # a copy, also when there is nothing to rotate
    except Exception:  # a broken EXIF block must not lose the image; keep it un-rotated
        oriented = img
    out = to_rgb(oriented)
    return out.copy() if out is img else out


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` with PIL, decode it fully, apply its EXIF orientation and convert it to RGB
    (:func:`to_rgb`).

    Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is kept: an image above it is treated
    as unreadable, like a corrupt, truncated, empty or non-image file. All of these raise :class:`DataError`
    naming the file.
    """
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # force the decode now so truncated files fail here, not later
                img = as_rgb(im)
    except DataError as err:
        raise DataError(f"{path}: {err}") from err
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    if img.width == 0 or img.height == 0:
        raise DataError(f"cannot read image {path}: it has zero size")
    return img


# ---------------------------------------------------------------------------------------------------------
# folders of images


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under ``root``, with or without class sub-folders; ``dataset[i] -> (transform(img), label)``.

    Listing (deterministic):

    * files directly in ``root`` come first (sorted by name) with label ``-1``;
    * then every top-level sub-folder is a class (``classes`` = their sorted names, label = index), walked
      recursively exactly like ``torchvision.datasets.ImageFolder`` (``sorted(os.walk(...))``, files sorted),
      so with class sub-folders the order and labels are the same as torchvision's.

    Only files ending in :data:`IMAGE_EXTENSIONS` (any case) are listed. ``labels`` is an int64 tensor;
    ``has_labels`` is True when every image sits in a class folder.

    Unreadable files (corrupt, truncated, zero bytes, not an image, above the decompression-bomb limit): the
    first time a file fails in a process, a ``UserWarning`` names it; it is recorded in ``skipped`` (and in
    the process-wide :func:`count_skipped`) and the item returned instead is the next readable one in listing
    order (wrapping around), so an epoch never crashes and the substitution is deterministic. If no file is
    readable at all, :class:`DataError` is raised. ``transform=None`` returns the RGB PIL image.

    ``unreadable="leave_out"`` (evaluation) substitutes the same way, to keep batches whole, but the warning
    says the file is left out: the caller drops the rows of the files :meth:`readable` marks False (see
    :func:`dinokit.eval.knn.drop_unreadable`), so no image is counted twice or under another file's label.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, unreadable: str = "substitute"):
        if unreadable not in ("substitute", "leave_out"):
            raise ValueError(f"unreadable must be 'substitute' or 'leave_out', got {unreadable!r}")
        self.root = Path(root).expanduser()
        self.transform = transform
        self.unreadable = unreadable
        if not self.root.exists():
            raise DataError(f"image directory {self.root} does not exist")
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a directory (expected a folder of images)")
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
            self.classes: list[str] = [e.name for e in entries if e.is_dir()]
            samples: list[tuple[str, int]] = [
                (e.path, -1) for e in entries if not e.is_dir() and _is_image_file(e.name)
            ]
            def unlistable(err: OSError):  # os.walk skipped such a folder silently: a class or part of one lost
                raise err

            repeated: list[str] = []

            def inode(path) -> tuple[int, int]:
                st = os.stat(path)
                return st.st_dev, st.st_ino

            # the root and every class folder belong where they are: reached again through a link inside a class
            # (a loop up to the root), their images would come twice, once under the wrong label
            tops = {inode(self.root)} | {inode(self.root / c) for c in self.classes}
            for label, name in enumerate(self.classes):
                walked, seen = [], set(tops - {inode(self.root / name)})
                for dirpath, dirnames, fnames in os.walk(self.root / name, followlinks=True, onerror=unlistable):
                    dirnames.sort()  # which of two links to one folder is kept: the same on every machine
                    key = inode(dirpath)
                    if key in seen:  # a symbolic-link loop (or a second link to a folder)
                        dirnames[:] = []  # multiplied the data set, without end for loops that branch
                        repeated.append(dirpath)
                        continue
                    seen.add(key)
                    walked.append((dirpath, fnames))
                for dirpath, fnames in sorted(walked):  # the order of sorted(os.walk(...)), as torchvision
                    for fname in sorted(fnames):
                        if _is_image_file(fname):
                            samples.append((os.path.join(dirpath, fname), label))
            if repeated:
                warnings.warn(f"dinokit: {len(repeated)} folder(s) under {self.root} reached again through symbolic "
                              f"links (e.g. {repeated[0]}): each is listed once", UserWarning, stacklevel=2)
        except OSError as err:
            where = err.filename or self.root
            raise DataError(f"cannot list {where} (under the image directory {self.root}): "
                            f"{err.strerror or err}") from err
        if not samples:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        self.samples: list[tuple[str, int]] = samples
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.labels = torch.tensor([lab for _, lab in samples], dtype=torch.int64)
        self.has_labels = bool((self.labels >= 0).all())
        self.skipped: set[str] = set()
        self._bad: set[int] = set()
        # one flag per file in shared memory, so skips in DataLoader workers are counted in the main process
        self._bad_shared = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def count_skipped(self) -> int:
        """Distinct unreadable files this data set object has skipped, in this process or in its DataLoader
        workers."""
        return max(len(self.skipped), int(self._bad_shared.sum()))

    def readable(self, index: int | None = None) -> torch.Tensor | bool:
        """``[N]`` bool: False for the files found unreadable so far (in this process or its DataLoader
        workers), True for the others — after a full pass, exactly the readable files; with ``index``, that
        file's flag alone (a bool, without building the whole vector)."""
        return ~self._bad_shared if index is None else not bool(self._bad_shared[index])

    def _mark_bad(self, index: int, err: Exception) -> None:
        path = self.samples[index][0]
        self._bad.add(index)
        known = bool(self._bad_shared[index])  # found by another DataLoader worker already: warned there
        self._bad_shared[index] = True
        self.skipped.add(path)
        if path not in _SKIPPED and not known:
            _SKIPPED.add(path)
            what = "using the next image instead" if self.unreadable == "substitute" else "it is left out"
            warnings.warn(f"dinokit: skipping unreadable image {path} ({err}); {what}", UserWarning, stacklevel=3)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The RGB image and label at ``index``, or of the next readable file (see the class docstring)."""
        return self.read(index, load_image)

    def read(self, index: int, reader: Callable[[str], Any]) -> tuple[Any, int]:
        """``(reader(path), label)`` for the file at ``index``, or for the next file ``reader`` can read, with
        :meth:`load`'s skipping. ``reader`` raises :class:`DataError` for an unreadable file, as
        :func:`load_image` does (e.g. a transform that decodes paths itself, such as
        :class:`dinokit.fast_augment.FastMultiCrop` with JPEG draft decoding)."""
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:
                continue
            path, label = self.samples[j]
            try:
                return reader(path), label
            except DataError as err:
                self._mark_bad(j, err)
        raise DataError(f"none of the {n} image files under {self.root} could be read")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, label


# ---------------------------------------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST)

_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed, detected from its content) into a native-endian numpy array.

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, then each dimension as a big-endian uint32. A bad magic number,
    a truncated file or trailing bytes raise :class:`DataError` naming the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except OSError as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"IDX file {path} is a corrupt or truncated gzip file: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated (header needs {header} bytes, file has {len(raw)})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise DataError(f"IDX file {path} is {what}: shape {shape} needs {expected} data bytes, "
                        f"found {len(raw) - header}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def save_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``). Inverse of
    :func:`load_idx`."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None or not 1 <= array.ndim <= 255:
        raise ConfigError(f"cannot store a {array.dtype} array with {array.ndim} dimensions as IDX")
    body = (bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
            + array.astype(_IDX_DTYPES[code]).tobytes())
    path = Path(path)
    path.write_bytes(gzip.compress(body) if path.name.endswith(".gz") else body)
    return path


def _find_idx(root: Path, stem: str) -> Path | None:
    for d in (root, root / "FashionMNIST" / "raw", root / "raw"):
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def load_fashion_mnist(root: str | os.PathLike, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60000 images, "test": 10000) from the IDX files in ``root``
    (``train-images-idx3-ubyte.gz`` etc., gzipped or not; torchvision's ``FashionMNIST/raw`` layout also
    works). Returns ``(images uint8 [N, 28, 28], labels int64 [N])``."""
    if split not in _FMNIST_FILES:
        raise ConfigError(f"unknown Fashion-MNIST split {split!r} (expected 'train' or 'test')")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST directory {root} does not exist (get the data with "
                        f"`python -m dinokit.data download-fashion-mnist {root}` or `make data`)")
    paths = []
    for stem in _FMNIST_FILES[split]:
        p = _find_idx(root, stem)
        if p is None:
            raise DataError(f"Fashion-MNIST file {stem}.gz not found in {root} (get the data with "
                            f"`python -m dinokit.data download-fashion-mnist {root}`)")
        paths.append(p)
    images, labels = load_idx(paths[0]), load_idx(paths[1])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{paths[0]}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{paths[1]}: expected {len(images)} labels, got shape {labels.shape}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


class TensorImageDataset(torch.utils.data.Dataset):
    """In-memory uint8 images ``[N, H, W]`` or ``[N, C, H, W]`` (C = 1, 3 or 4) with optional labels.

    ``dataset[i] -> (x, label)``: with a ``transform``, ``x = transform(rgb PIL image)`` (grey images are
    replicated to RGB, like the folder data set's loader); with ``transform=None``, ``x`` is the raw uint8
    tensor (what the batched augmentation collates). ``images``, ``labels`` (int64, -1 when unknown),
    ``has_labels`` and ``classes`` are attributes.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 transform: Callable | None = None, classes: list[str] | tuple[str, ...] | None = None):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim not in (3, 4) or (images.ndim == 4
                                                                      and images.shape[1] not in (1, 3, 4)):
            raise DataError("TensorImageDataset needs uint8 images [N, H, W] or [N, C, H, W] with C in "
                            f"1/3/4, "
                            f"got {images.dtype} {tuple(images.shape)}")
        if labels is None:
            labels = torch.full((len(images),), -1, dtype=torch.int64)
        labels = torch.as_tensor(labels).to(torch.int64).reshape(-1)
        if len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform
        self.classes = list(classes) if classes is not None else []
        self.has_labels = bool(len(labels)) and bool((labels >= 0).all())

    def __len__(self) -> int:
        return len(self.images)

    def to_pil(self, index: int) -> Image.Image:
        x = self.images[index]
        if x.ndim == 3:
            x = x[0] if x.shape[0] == 1 else x[:3].permute(1, 2, 0)
        return Image.fromarray(x.contiguous().numpy()).convert("RGB")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        label = int(self.labels[index])
        if self.transform is None:
            return self.images[index], label
        return self.transform(self.to_pil(index)), label


# ---------------------------------------------------------------------------------------------------------
# spec -> data set


def build_dataset(spec: str | os.PathLike, transform: Callable | None = None, split: str = "train",
                  unreadable: str = "substitute"):
    """Data set from a string spec (``unreadable``: see :class:`ImageFolderDataset`):

    * ``DIR``: :class:`ImageFolderDataset` (``split`` is ignored: pass the train and val folders separately);
    * ``fashion-mnist:DIR``: Fashion-MNIST ``split`` ("train"/"test") from the IDX files in ``DIR``;
    * ``fashion-mnist``: the same from the first of :data:`DEFAULT_FASHION_MNIST_DIRS` that has the files.

    Every result has ``labels`` (int64, -1 where unknown) and ``has_labels``.
    """
    s = os.fspath(spec).strip()
    if not s:
        raise DataError("empty data spec: pass a folder of images, fashion-mnist or fashion-mnist:<dir>")
    head, sep, rest = s.partition(":")
    fashion_mnist = head.lower().replace("_", "-") in ("fashion-mnist", "fashionmnist")
    if fashion_mnist and not sep and Path(s).exists():
        raise DataError(f"--data {s} names both the installed Fashion-MNIST and the folder {Path(s).resolve()}: "
                        f"write ./{s} for the folder, or fashion-mnist:DIR for the IDX files in DIR")
    if fashion_mnist:
        if split not in _FMNIST_FILES:
            raise ConfigError(f"unknown Fashion-MNIST split {split!r} (expected 'train' or 'test')")
        if rest.strip():
            root = Path(rest.strip()).expanduser()
        else:
            root = next((Path(d) for d in DEFAULT_FASHION_MNIST_DIRS
                         if _find_idx(Path(d), _FMNIST_FILES[split][0]) is not None), None)
            if root is None:
                raise DataError("Fashion-MNIST not found in " + " or ".join(DEFAULT_FASHION_MNIST_DIRS)
                                + ": run `make data` or `python -m dinokit.data download-fashion-mnist "
                                  "data/fashion-mnist`, or pass fashion-mnist:<dir>")
        images, labels = load_fashion_mnist(root, split)
        return TensorImageDataset(images, labels, transform=transform, classes=FASHION_MNIST_CLASSES)
    if sep and len(head) > 1 and "/" not in head and "\\" not in head and not Path(s).exists():
        raise DataError(f"unknown data spec {s!r}: expected a folder of images, fashion-mnist or "
                        "fashion-mnist:<dir>")
    return ImageFolderDataset(s, transform=transform, unreadable=unreadable)


# ---------------------------------------------------------------------------------------------------------
# download (fallback for machines with internet)


def download_fashion_mnist(dest: str | os.PathLike) -> Path:
    """Download Fashion-MNIST with ``torchvision.datasets.FashionMNIST(download=True)`` and copy the four
    ``*-ubyte.gz`` files into ``dest``. Raises :class:`DataError` when offline."""
    import tempfile

    from torchvision.datasets import FashionMNIST

    dest = Path(dest).expanduser()
    wanted = [stem for pair in _FMNIST_FILES.values() for stem in pair]
    if all((dest / (stem + ".gz")).is_file() for stem in wanted):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for train in (True, False):
                    FashionMNIST(tmp, train=train, download=True)
        except Exception as err:  # URLError, HTTPError, RuntimeError("Error downloading ..."), socket errors
            raise DataError(f"could not download Fashion-MNIST ({type(err).__name__}: {err}). Without "
                            "internet, install Debian's dataset-fashion-mnist package or copy "
                            "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                            f"t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz into {dest}") from err
        raw = Path(tmp) / "FashionMNIST" / "raw"
        dest.mkdir(parents=True, exist_ok=True)
        for stem in wanted:
            if (raw / (stem + ".gz")).is_file():
                shutil.copyfile(raw / (stem + ".gz"), dest / (stem + ".gz"))
            else:
                (dest / (stem + ".gz")).write_bytes(gzip.compress((raw / stem).read_bytes()))
    return dest


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dinokit.data", description="dinokit data utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download-fashion-mnist", help="download Fashion-MNIST IDX files (needs internet)")
    p.add_argument("dir", help="destination folder for the four *-ubyte.gz files")
    args = parser.parse_args(argv)
    try:
        dest = download_fashion_mnist(args.dir)
    except DinokitError as err:
        print(f"dinokit: error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"Fashion-MNIST: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
