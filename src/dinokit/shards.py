"""Sharded streaming data: WebDataset-format tar shards for data sets too large for a folder walk.

Format (readable by the ``webdataset`` package, written with the standard library's ``tarfile``): uncompressed
tar files ``000000.tar``, ``000001.tar``, ... Each sample is a run of consecutive members sharing a key (the file
name up to its first dot): ``<key>.jpg`` or ``<key>.png`` (the original encoded bytes; other formats are
re-encoded as PNG) and ``<key>.json`` (``{"path": ..., "label": int, "class": str}``; ``label`` and ``class``
only when the source folder had class sub-folders). ``index.json`` next to the shards lists every shard with
its sample count, so the total is known without reading the data.

Reading (:class:`ShardStream`, an ``IterableDataset``), for epoch ``e`` on rank ``r`` of ``W``, with batch
``B`` and ``K`` DataLoader workers:

1. the shards are listed in a seeded order (``seed + e``; the spec's order without shuffling) and their
   samples concatenated: a sequence of ``N`` samples, padded to ``W * ceil(N / W)`` by wrapping around (as
   ``DistributedSampler`` pads);
2. rank ``r`` takes the contiguous slice ``[r * ceil(N/W), (r + 1) * ceil(N/W))`` and keeps its first
   ``floor(ceil(N/W) / B)`` batches: **the number of iterations per epoch is ``floor(ceil(N/W) / B)``**, the
   same as for a folder (and the reference's sampler); the remainder (< B per rank) is left out that epoch;
3. the rank's batches are split into ``K`` contiguous chunks (the first ``nb mod K`` one batch longer), one per
   worker, so each worker streams a contiguous range of at most a few shards; inside a chunk a shuffle buffer
   (seeded by ``seed, e, r, chunk``) mixes the samples. Batch ``p`` of the epoch comes from chunk ``p mod K``,
   which is the order in which ``DataLoader`` interleaves its workers.

So every sample is seen exactly once per epoch across ranks and workers when ``N`` is a multiple of ``W * B``
(otherwise at most once, plus the padding duplicates), each worker reads only its own byte ranges, and a
mid-epoch resume (``set_epoch(e, start_batch)``) continues the same epoch exactly: the chunks are
re-assigned to workers so that the ``DataLoader`` interleaving continues where it stopped, and skipped samples
are not decoded. The batch composition depends on ``num_workers`` (resume with the same value). Augmentation
seeds depend only on ``(seed, epoch, global index)``, as for folders.

Unreadable images (a shard corrupted after it was written): as for folders, the sample's image is replaced by the
*next readable image of the worker's stream* (its chunk in shuffled order, wrapping around to the chunk's start),
with a warning naming the shard and the entry; the sample keeps its place, index and augmentation seed, and takes
the substitute's label. The substitute depends only on the stream, not on what was decoded before, so it is the
same after a mid-epoch resume (and a corrupt first image needs no earlier one); the epoch keeps its length and the
other samples are unchanged. Only a worker whose whole chunk is unreadable raises :class:`DataError`.

Data specs: ``'DIR/{000000..000099}.tar'`` (brace ranges keep zero padding; ``{a,b}`` lists work too), a single
``.tar`` path, or a directory holding ``index.json`` written by ``dinokit shard``.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import tarfile
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .checkpoint import write_text_atomic
from .errors import ConfigError, DataError, is_runtime_write_error, write_failed

__all__ = ["INDEX_NAME", "expand_braces", "is_shard_spec", "resolve_shards", "ShardWriter", "write_shards",
           "ShardStream", "SeededTransform", "decode_image", "decoded", "build_shard_loader"]

INDEX_NAME = "index.json"
FORMAT = "dinokit-shards"
_IMAGE_EXTS = ("jpg", "jpeg", "png")
_REPLACED: set[str] = set()  # unreadable shard entries already reported in this process (one warning each)


# ---------------------------------------------------------------------------------------------------------
# specs


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """``"s/{000..002}.tar"`` -> ``["s/000.tar", "s/001.tar", "s/002.tar"]`` (zero padding kept from the first
    bound), ``"{a,b}"`` -> ``["a", "b"]``; several groups expand as a product, left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise ConfigError(f"empty brace range {{{body}}} in {pattern!r}")
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        items = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ConfigError(f"cannot expand {{{body}}} in {pattern!r}: use {{000..099}} or {{a,b}}")
    return [x for item in items for x in expand_braces(head + item + tail)]


def _read_index(directory: Path) -> dict[str, Any] | None:
    path = directory / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read shard index {path}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        return None
    return index


def is_shard_spec(spec: str | os.PathLike) -> bool:
    """True for ``*.tar`` paths (brace patterns included) and for directories holding a dinokit ``index.json``."""
    s = os.fspath(spec).strip()
    if not s:
        return False
    p = Path(s).expanduser()
    if p.is_dir():  # a shard folder has dinokit's index; an image folder may be named like a tar ("imgs.tar")
        return _read_index(p) is not None
    return s.endswith(".tar")


def _count_samples(path: Path) -> int:
    try:
        with tarfile.open(path, "r:") as tar:
            return len(_group_members(tar.getmembers()))
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"cannot read shard {path}: {e}") from None


def resolve_shards(spec: str | os.PathLike) -> tuple[list[Path], list[int], dict[str, Any]]:
    """Shard paths, their sample counts (from ``index.json`` where it lists them, else by reading the tar
    headers) and the index metadata (classes, ...) of the first shard's directory."""
    s = os.fspath(spec).strip()
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", s)
    if scheme and len(scheme.group(1)) > 1 and not Path(s).exists():  # http:, s3:, pipe: (not a drive letter)
        raise DataError(f"{scheme.group(1)}: shard URLs are not read: dinokit trains from local tar shards (copy "
                        f"them to a local or mounted folder and pass 'DIR/{{000000..NNNNNN}}.tar')")
    p = Path(s).expanduser()
    if p.is_dir():
        index = _read_index(p)
        if index is None:
            raise DataError(f"{p} has no {INDEX_NAME} written by `dinokit shard`; pass 'DIR/{{000000..NNNNNN}}.tar'")
        paths = [p / sh["name"] for sh in index["shards"]]
    else:
        paths = [Path(x).expanduser() for x in expand_braces(s)]
    missing = [x for x in paths if not x.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        glob = ("; wildcards are not expanded: name the shards as 'DIR/{000000..000009}.tar' or pass the folder "
                "`dinokit shard` wrote") if any(c in s for c in "*?[") else ""
        raise DataError(f"shard {missing[0]} does not exist{more}{glob}")
    indexes: dict[Path, dict[str, int]] = {}
    meta: dict[str, Any] = {}
    counts = []
    for x in paths:
        d = x.parent
        if d not in indexes:
            index = _read_index(d) or {}
            if not meta and index:
                meta = {k: v for k, v in index.items() if k != "shards"}
            indexes[d] = {sh["name"]: int(sh["count"]) for sh in index.get("shards", [])}
        n = indexes[d].get(x.name)
        counts.append(n if n is not None else _count_samples(x))
    if sum(counts) == 0:
        raise DataError(f"the shards of {s!r} hold no samples")
    return paths, counts, meta


# ---------------------------------------------------------------------------------------------------------
# writing


class ShardWriter:
    """Writes samples into ``out/000000.tar``, ``out/000001.tar``, ... starting a new shard after
    ``maxcount`` samples or ``maxsize`` bytes, then ``out/index.json`` on :meth:`close`. Members get fixed
    metadata (mtime 0, uid 0, mode 0o444) so the same input gives byte-identical shards."""

    def __init__(self, out: str | os.PathLike, maxcount: int = 1000, maxsize: int = 1 << 30,
                 meta: dict[str, Any] | None = None):
        if maxcount <= 0 or maxsize <= 0:
            raise ConfigError("maxcount and maxsize must be positive")
        self.out = Path(out).expanduser()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file in the way, a read-only or virtual file system (/proc), ...
            raise DataError(f"cannot create the shard folder {self.out}: {e.strerror or e}") from None
        self.maxcount, self.maxsize = maxcount, maxsize
        self.meta = dict(meta or {})
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._count = self._size = 0

    def _open(self) -> None:
        name = f"{len(self.shards):06d}.tar"
        self._tar = tarfile.open(self.out / name, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "count": 0})
        self._count = self._size = 0

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self.shards[-1]["bytes"] = (self.out / self.shards[-1]["name"]).stat().st_size
            self._tar = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if not key or "." in key or "/" in key:
            raise ValueError(f"invalid sample key {key!r} (no dots or slashes)")
        size = sum(len(b) + 512 for b in members.values())
        if self._tar is None or self._count >= self.maxcount or (self._count and self._size + size > self.maxsize):
            self._close_shard()
            self._open()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o444, 0, 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._size += size
        self.shards[-1]["count"] = self._count

    def close(self) -> dict[str, Any]:
        self._close_shard()
        index = {"format": FORMAT, "version": 1, "total": sum(s["count"] for s in self.shards), **self.meta,
                 "shards": self.shards}
        write_text_atomic(self.out / INDEX_NAME, json.dumps(index, indent=1) + "\n")
        return index

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._close_shard()


def _encode(path: str) -> tuple[str, bytes]:
    """(extension, bytes): JPEG and PNG files as they are, anything else re-encoded as PNG. The image is
    fully decoded first, so unreadable files raise :class:`DataError` here rather than during training."""
    from .data import load_image

    img = load_image(path)
    ext = Path(path).suffix.lower().lstrip(".")
    if ext in _IMAGE_EXTS:
        with open(path, "rb") as f:
            return ("jpg" if ext == "jpeg" else ext), f.read()
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "png", buf.getvalue()


def write_shards(data: str | os.PathLike, out: str | os.PathLike, maxcount: int = 1000, maxsize: int = 1 << 30,
                 shuffle: bool = True, seed: int = 0, progress: Callable[[int, int], None] | None = None
                 ) -> dict[str, Any]:
    """Write the images of folder ``data`` (class sub-folders optional) into shards under ``out``; returns
    the index (also written to ``out/index.json``, with ``skipped``: unreadable files left out). ``shuffle``
    writes them in a seeded random order: streaming only shuffles shards and within a buffer, so a
    class-sorted folder should be shuffled when sharded."""
    from .data import ImageFolderDataset

    ds = ImageFolderDataset(data)
    order = list(range(len(ds.samples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    root = ds.root.resolve()
    skipped: list[str] = []
    meta = {"source": str(root), "classes": ds.classes, "has_labels": ds.has_labels, "shuffled": shuffle,
            "seed": seed}
    folder = Path(out).expanduser()
    created = not folder.exists()
    writer = ShardWriter(out, maxcount=maxcount, maxsize=maxsize, meta=meta)
    indexed = False
    try:
        with writer:
            written = 0
            for k, i in enumerate(order):
                path, label = ds.samples[i]
                try:
                    ext, blob = _encode(path)
                except DataError as e:
                    warnings.warn(f"dinokit: skipping unreadable image {path} ({e})", UserWarning, stacklevel=2)
                    skipped.append(path)
                    continue
                info: dict[str, Any] = {"path": os.path.relpath(path, root)}
                if label >= 0:
                    info.update(label=int(label), **{"class": ds.classes[label]})
                writer.write(f"{written:09d}", {ext: blob, "json": json.dumps(info).encode()})
                written += 1
                if progress is not None:
                    progress(k + 1, len(order))
            writer.meta["skipped"] = len(skipped)
        indexed = True  # close() wrote this run's index
        if written == 0:
            raise DataError(f"none of the images under {data} could be read")
    except BaseException as e:  # an error or Ctrl-C: no partial shards (the same command then starts again)
        for name in [s["name"] for s in writer.shards] + ([INDEX_NAME] if indexed else []):
            (folder / name).unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
        if isinstance(e, OSError) and not e.filename and is_runtime_write_error(e):  # said only "No space left"
            raise write_failed(folder, e) from None
        raise
    return json.loads((folder / INDEX_NAME).read_text())


# ---------------------------------------------------------------------------------------------------------
# reading


def _group_members(members: list[tarfile.TarInfo]) -> list[dict[str, tarfile.TarInfo]]:
    """Consecutive regular members with the same key (name up to the first dot of the base name) -> one
    sample ``{ext: TarInfo}``; directories and other entries are ignored, as webdataset does."""
    samples: list[dict[str, tarfile.TarInfo]] = []
    last = None
    for m in members:
        if not m.isfile():
            continue
        d, base = os.path.split(m.name)
        if "." not in base:
            continue
        stem, ext = base.split(".", 1)
        key = os.path.join(d, stem)
        if key != last:
            samples.append({"__key__": key})  # type: ignore[dict-item]
            last = key
        samples[-1][ext.lower()] = m
    return samples


def _open_image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


_BUFFER_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def decode_image(data: bytes, name: str = "<bytes>"):
    """Encoded image bytes -> RGB PIL image (EXIF orientation applied, every mode converted as for folders)."""
    from PIL import Image

    from .data import as_rgb

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return as_rgb(im)
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL names its in-memory file: leave that out
        raise DataError(f"cannot decode image {name}: {type(e).__name__}: {_BUFFER_REPR.sub('', str(e))}") from e


class _Encoded:
    """A sample's encoded image: calling it decodes it (:func:`decode_image`, :class:`DataError` naming
    ``shard:entry`` if unreadable); :meth:`open` is the lazy ``Image.open`` (for JPEG draft decoding)."""

    __slots__ = ("blob", "name")

    def __init__(self, blob: bytes, name: str):
        self.blob, self.name = blob, name

    def __call__(self):
        return decode_image(self.blob, self.name)

    def open(self):
        return _open_image(self.blob)


class _Unreadable(DataError):
    """A sample's image could not be decoded (raised to :meth:`ShardStream._item`, which substitutes it)."""


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    from .trainer import _sample_seed as f  # one definition: folders and shards seed augmentation the same way

    return f(seed, epoch, index)


class SeededTransform:
    """Apply ``transform`` to a sample's image under the torch and python RNGs seeded with the sample seed
    (exactly what the folder path does), so crops do not depend on ranks, workers or resume points. With
    ``lazy_open`` the transform gets the ``Image.open`` result before decoding (``FastMultiCrop``'s JPEG draft
    decoding); if that fails it gets the fully decoded image (or the stand-in for a corrupt one)."""

    def __init__(self, transform: Callable, lazy_open: bool = False):
        self.transform, self.lazy_open = transform, lazy_open

    def __call__(self, sample: dict[str, Any]):
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            try:
                if self.lazy_open and "open" in sample:
                    self._seed(sample["seed"])
                    try:
                        return self.transform(sample["open"]())
                    except (OSError, ValueError, SyntaxError, EOFError, DataError):
                        pass
                # seeded afresh: a lazy attempt that failed half-way must not shift the fallback's crops
                self._seed(sample["seed"])
                return self.transform(sample["image"]())
            finally:
                random.setstate(py_state)

    @staticmethod
    def _seed(seed: int) -> None:
        torch.manual_seed(seed)
        random.seed(seed)


def decoded(sample: dict[str, Any]) -> dict[str, Any]:
    """The default ``map_fn``: the sample with its image decoded (a PIL image; picklable for workers)."""
    out = dict(sample)
    if "image" in out:
        out["image"] = out["image"]()
    return out


class ShardStream(torch.utils.data.IterableDataset):
    """Stream the samples of ``shards`` (with ``counts`` samples each) for one rank; see the module docstring
    for the epoch, rank and worker split. Each item is ``map_fn(sample)`` where ``sample`` is a dict with
    ``key``, ``index`` (global: position in the spec's shard order), ``seed`` (per-sample augmentation
    seed), ``label`` (-1 if none), ``shard``, ``image`` (a zero-argument callable decoding the image, so
    skipped or unused samples are never decoded) and ``open`` (the same bytes through a lazy ``Image.open``).
    An image that cannot be decoded when ``map_fn`` calls ``image`` is replaced by the next readable one of
    the worker's stream (see the module docstring); :meth:`count_skipped` counts them. Use it in a
    ``DataLoader`` with ``batch_size=batch_size`` and ``persistent_workers=False`` (workers must see
    :meth:`set_epoch`)."""

    def __init__(self, shards: list[str | os.PathLike], counts: list[int], batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1, shuffle: bool = True, buffer_size: int = 1000,
                 map_fn: Callable[[dict[str, Any]], Any] | None = None):
        if len(shards) != len(counts):
            raise ValueError("one count per shard")
        self.shards = [Path(s) for s in shards]
        self.counts = [int(c) for c in counts]
        self.offsets = [0]
        for c in self.counts[:-1]:
            self.offsets.append(self.offsets[-1] + c)
        self.n = sum(self.counts)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.shuffle, self.buffer_size = shuffle, max(1, buffer_size)
        self.map_fn = map_fn or decoded
        self.per_rank = math.ceil(self.n / world)
        self.batches_per_epoch = self.per_rank // batch_size
        self.epoch = 0
        self.start_batch = 0
        # one flag per sample in shared memory, so replacements in DataLoader workers are counted here too
        self._bad = torch.zeros(self.n, dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return self.n

    def count_skipped(self) -> int:
        """Distinct samples whose image was found unreadable (and replaced), in this process or its workers."""
        return int(self._bad.sum())

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    # -- planning (pure functions of the index; no I/O) -----------------------------------------------------
    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        return order

    def rank_segments(self, epoch: int, start: int, stop: int) -> list[tuple[int, int, int]]:
        """Positions ``[start, stop)`` of the padded epoch sequence as ``(shard, first, end)`` sample ranges."""
        order = [s for s in self.shard_order(epoch) if self.counts[s] > 0]
        segs: list[tuple[int, int, int]] = []
        pos = start
        while pos < stop:
            p = pos % self.n  # padding wraps around to the start of the sequence
            acc = 0
            for s in order:
                if p < acc + self.counts[s]:
                    first = p - acc
                    take = min(self.counts[s] - first, stop - pos, self.n - p)
                    segs.append((s, first, first + take))
                    pos += take
                    break
                acc += self.counts[s]
        return segs

    def chunks(self, num_chunks: int) -> list[tuple[int, int]]:
        """Batch ranges ``[b0, b1)`` of the rank's epoch, one per chunk (the first ``nb mod K`` one longer)."""
        nb, k = self.batches_per_epoch, num_chunks
        out, b = [], 0
        for w in range(k):
            n = nb // k + (1 if w < nb % k else 0)
            out.append((b, b + n))
            b += n
        return out

    def worker_plan(self, epoch: int, start_batch: int, worker: int, num_workers: int):
        """``(chunk, segments, skip)`` for DataLoader worker ``worker`` of ``num_workers``: batch ``p`` comes
        from chunk ``p mod K``; after a resume at ``start_batch = s`` DataLoader worker ``j`` (served first
        when ``j = 0``) takes chunk ``(j + s) mod K`` and skips the ``skip`` samples it delivered before."""
        k = num_workers
        chunk = (worker + start_batch) % k
        # chunk c holds the batches at positions p = c, c + K, ... in the DataLoader's interleaved order
        b0, b1 = self.chunks(k)[chunk]
        done = max(0, (start_batch - chunk + k - 1) // k)
        base = self.rank * self.per_rank
        segs = self.rank_segments(epoch, base + b0 * self.batch_size, base + b1 * self.batch_size)
        return chunk, segs, done * self.batch_size

    # -- streaming ---------------------------------------------------------------------------------------
    def _samples(self, segs: list[tuple[int, int, int]], epoch: int, handles: dict) -> Iterator[dict[str, Any]]:
        for s, first, end in segs:
            path = self.shards[s]
            try:
                tar = tarfile.open(path, "r:")
                members = _group_members(tar.getmembers())
            except (OSError, tarfile.TarError) as e:
                raise DataError(f"cannot read shard {path}: {e}") from None
            if len(members) < end:
                tar.close()
                raise DataError(f"shard {path} holds {len(members)} samples, the index says {self.counts[s]}")
            handle = [tar, end - first]  # open tar and how many of its samples are still buffered
            handles[id(handle)] = handle
            for j in range(first, end):
                index = self.offsets[s] + j
                yield {"key": members[j]["__key__"], "index": index, "shard": str(path), "_handle": handle,
                       "_members": members[j], "seed": _sample_seed(self.seed, epoch, index)}

    def _shuffled(self, it: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        if not self.shuffle or self.buffer_size <= 1:
            yield from it
            return
        buf: list[dict[str, Any]] = []
        for x in it:
            if len(buf) < self.buffer_size:
                buf.append(x)
                continue
            i = rng.randrange(len(buf))
            buf[i], x = x, buf[i]
            yield x
        rng.shuffle(buf)
        yield from buf

    def _stream(self, segs: list[tuple[int, int, int]], epoch: int, chunk: int, skip: int,
                handles: dict) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(position, sample)`` of the worker's stream (its chunk in shuffled order) from position ``skip`` on;
        the samples before it are passed over without reading their bytes."""
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{chunk}")
        for pos, sample in enumerate(self._shuffled(self._samples(segs, epoch, handles), rng)):
            sample = self._finish(sample, read=pos >= skip)
            if pos >= skip:
                yield pos, sample

    def _restream(self, segs: list[tuple[int, int, int]], epoch: int, chunk: int,
                  stop: int) -> Iterator[dict[str, Any]]:
        """The worker's stream read again from its start up to position ``stop`` (excluded): the wrap-around
        candidates for a substitute."""
        handles: dict[int, list] = {}
        try:
            for pos, sample in self._stream(segs, epoch, chunk, 0, handles):
                if pos >= stop:
                    return
                yield sample
        finally:
            for tar, _ in handles.values():
                tar.close()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, k = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = self.epoch, self.start_batch
        chunk, segs, skip = self.worker_plan(epoch, start, worker, k)
        handles: dict[int, list] = {}
        stream = self._stream(segs, epoch, chunk, skip, handles)
        ahead: deque[tuple[int, dict[str, Any]]] = deque()  # samples read early, looking for a substitute

        def candidates(pos: int) -> Iterator[dict[str, Any]]:
            """The samples after ``pos`` (read ahead, kept for their own turn), then those before it."""
            i = 0
            while True:
                if i == len(ahead):
                    nxt = next(stream, None)
                    if nxt is None:
                        break
                    ahead.append(nxt)
                yield ahead[i][1]
                i += 1
            yield from self._restream(segs, epoch, chunk, pos)

        try:
            while True:
                nxt = ahead.popleft() if ahead else next(stream, None)
                if nxt is None:
                    break
                pos, sample = nxt
                yield self._item(sample, lambda p=pos: candidates(p))
        finally:
            stream.close()
            for tar, _ in handles.values():
                tar.close()

    def _item(self, sample: dict[str, Any], candidates: Callable[[], Iterator[dict[str, Any]]]):
        """``map_fn(sample)``; if the sample's image cannot be decoded, ``map_fn`` of the sample with the image
        (and label) of the first readable candidate, with a warning naming both entries."""
        if "image" not in sample:
            return self.map_fn(sample)
        try:
            return self.map_fn(self._strict(sample))
        except _Unreadable as e:
            err = e
        self._bad[sample["index"]] = True
        found = candidates()
        try:
            for other in found:
                if "image" not in other:
                    continue
                try:
                    out = self.map_fn(self._strict({**sample, "image": other["image"], "open": other["open"],
                                                    "label": other["label"]}))
                except _Unreadable:
                    continue
                name = getattr(sample["image"], "name", sample["key"])
                if name not in _REPLACED:
                    _REPLACED.add(name)
                    substitute = getattr(other["image"], "name", other["key"])
                    warnings.warn(f"dinokit: {err}; using the next readable image {substitute} instead",
                                  UserWarning, stacklevel=2)
                return out
        finally:
            found.close()
        raise DataError(f"{err}; no image of this worker's part of the epoch is readable "
                        f"(epoch {self.epoch}, rank {self.rank})") from None

    @staticmethod
    def _strict(sample: dict[str, Any]) -> dict[str, Any]:
        """The sample with an ``image`` callable that raises :class:`_Unreadable` for an unreadable image (a
        :class:`DataError`, so a ``map_fn`` that catches those still can)."""
        load = sample["image"]

        def image():
            try:
                return load()
            except DataError as e:
                raise _Unreadable(str(e)) from e

        return {**sample, "image": image}

    @staticmethod
    def _finish(sample: dict[str, Any], read: bool = True) -> dict[str, Any]:
        """Read the sample's label and image bytes (when ``read``) and release its shard handle."""
        handle, members = sample.pop("_handle"), sample.pop("_members")
        tar = handle[0]
        try:
            if not read:
                return sample
            label = -1
            if "json" in members:
                try:
                    label = int(json.loads(tar.extractfile(members["json"]).read()).get("label", -1))
                except (ValueError, TypeError, AttributeError):
                    label = -1
            elif "cls" in members:
                try:
                    label = int(tar.extractfile(members["cls"]).read().strip())
                except ValueError:
                    label = -1
            sample["label"] = label
            ext = next((e for e in (*_IMAGE_EXTS, "webp", "bmp", "ppm", "tif", "tiff") if e in members), None)
            if ext is not None:
                image = _Encoded(tar.extractfile(members[ext]).read(), f"{sample['shard']}:{members[ext].name}")
                sample["image"], sample["open"] = image, image.open
            return sample
        finally:
            handle[1] -= 1
            if handle[1] == 0:
                tar.close()


class _ShardCount:
    """``len()`` of the streamed data set (what the trainer reports and checks against the global batch) and
    ``count_skipped()`` (the epoch record's ``skipped_images``)."""

    def __init__(self, n: int, meta: dict[str, Any], stream: ShardStream | None = None):
        self.n, self.meta, self.stream = n, meta, stream

    def __len__(self) -> int:
        return self.n

    def count_skipped(self) -> int:
        return self.stream.count_skipped() if self.stream is not None else 0


def build_shard_loader(cfg, rank: int, world: int):
    """``(base, stream, loader, None)`` for :func:`dinokit.trainer.build_train_data` from a shard spec: the
    stream is the sampler (``set_epoch``, ``batches_per_epoch``); the multi-crop augmentation (``augment_impl``:
    ``fast``, the default, or the reference PIL chain) runs in the workers under per-sample seeds."""
    if cfg.fast_augment:
        raise ConfigError("fast_augment needs a tensor data set (fashion-mnist:DIR); shards use the "
                          "per-image multi-crop (--augment-impl)")
    paths, counts, meta = resolve_shards(cfg.data_path)
    n = sum(counts)
    if n < cfg.batch_size_per_gpu * world:
        raise ConfigError(f"the shards hold {n} images, fewer than one global batch "
                          f"({cfg.batch_size_per_gpu} x {world}); lower --batch-size-per-gpu")
    from .trainer import loader_workers, per_image_multicrop

    # as for folders; fast (dinokit.fast_augment) decodes JPEGs in draft mode from the shard's bytes
    stream = ShardStream(paths, counts, cfg.batch_size_per_gpu, seed=cfg.seed, rank=rank, world=world,
                         map_fn=SeededTransform(per_image_multicrop(cfg), lazy_open=cfg.augment_impl == "fast"))

    return _ShardCount(n, meta, stream), stream, shard_loader(stream, cfg, loader_workers(cfg.num_workers)), None


def shard_loader(stream: ShardStream, cfg, workers: int) -> torch.utils.data.DataLoader:
    """The training DataLoader over ``stream`` with ``workers`` worker processes (the batch composition depends
    on the count, see the module doc)."""
    from .trainer import _ignore_stop_signals, collate_crops

    return torch.utils.data.DataLoader(
        stream, batch_size=cfg.batch_size_per_gpu, num_workers=workers, collate_fn=collate_crops,
        pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=False,
        # its own generator, as for folders: creating the epoch's iterator must not draw from the global RNG,
        # which drop path uses (a resumed run drew one number more there, and its masks differed from then on)
        generator=torch.Generator().manual_seed(cfg.seed),
        prefetch_factor=4 if workers > 0 else None, worker_init_fn=_ignore_stop_signals if workers > 0 else None)
