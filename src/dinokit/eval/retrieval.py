"""Image retrieval (revisited Oxford/Paris) and place recognition with frozen DINO features.

Protocol of the reference ``eval_image_retrieval.py`` (Caron et al., ICCV 2021, Table 5; reference notes
``shared/reference/dino-reference.md`` §4.7):

* every image is shrunk with PIL ``thumbnail((imsize, imsize))`` (Lanczos, aspect ratio kept, longer side
  ``<= imsize``), normalised with the ImageNet mean/std and fed alone (batch 1);
* descriptor: the CLS token ``model(x)`` (dinokit also offers GeM(p=4) of the patch tokens, or both);
* multi-scale (``multiscale=True``): descriptors at scales 1, 1/√2, 1/2 (bilinear interpolation of the normalised
  tensor, ``align_corners=False``) are averaged and L2-normalised;
* descriptors are L2-normalised; ``scores = database · queriesᵀ``; each query's database ranking is the argsort of
  the negated scores;
* revisited protocol (Radenović et al., CVPR 2018): mAP and mean precision at 1/5/10 for **Easy** (positives
  easy, junk junk+hard), **Medium** (positives easy+hard, junk junk) and **Hard** (positives hard, junk
  junk+easy), with AP and junk handling identical to revisitop's ``compute_map`` (:func:`compute_map`).

As in the reference, query images are *not* cropped to their bounding boxes by default (``query_crop=True`` gives
the standard revisitop protocol). Optional PCA whitening (:class:`~dinokit.eval.whitening.PCAWhitening`) is learned
on a separate folder of images; the reference retrieval script has none.

Place recognition (``dataset="folder"``): ``ROOT/queries/``, ``ROOT/database/`` and ``ROOT/positives.json``
(query file → list of database files, paths relative to those folders) or ``ROOT/ground_truth.csv`` (one row per
query: ``query,db1[,db2...]``); reports Recall@1/5/10 (a query counts when any of its first k results is a
positive; queries without positives are left out) and mAP.

Ground truth: ``ROOT/gnd_<name>.json`` (see :func:`convert_ground_truth`) or revisitop's ``gnd_<name>.pkl``, read
by :func:`load_ground_truth` with a restricted unpickler that only rebuilds plain containers and numpy arrays.
"""

from __future__ import annotations

import csv
import io
import json
import math
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..console import stderr_is_tty
from ..data import as_rgb, load_image  # as_rgb: re-exported (the PIL-image form of load_image)
from ..errors import ConfigError, DataError
from .whitening import PCAWhitening, describe, l2n

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "compute_ap", "compute_map", "revisited_metrics",
    "recall_at_k", "rank_database", "load_ground_truth", "convert_ground_truth", "load_revisited",
    "load_place_dataset", "list_images", "as_rgb", "load_rgb", "thumbnail_loader", "square_loader",
    "check_imsize", "extract_descriptors", "fit_whitening", "learn_whitening", "evaluate_revisited",
    "evaluate_place_recognition",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
REVISITED = ("roxford5k", "rparis6k")


# --------------------------------------------------------------------------------------------------- metrics

def compute_ap(ranks: Sequence[int], nres: int) -> float:
    """Average precision of one query, revisitop's ``compute_ap``.

    ``ranks``: sorted 0-based positions of the positives in the ranking (junk already removed); ``nres``: number
    of positives. Each positive adds a trapezoid of width ``1/nres`` between the precision just before it
    (``j / rank``, 1 when ``rank == 0``) and at it (``(j + 1) / (rank + 1)``).
    """
    ap = 0.0
    step = 1.0 / nres
    for j, rank in enumerate(ranks):
        p0 = 1.0 if rank == 0 else j / rank
        p1 = (j + 1) / (rank + 1)
        ap += (p0 + p1) * step / 2.0
    return ap


def compute_map(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10)):
    """mAP and mean precision@k with junk images ignored, exactly as revisitop's ``compute_map``.

    Args:
        ranks: ``[n_db, n_q]`` integer array, column ``i`` = database indices ordered for query ``i``
            (the revisitop convention).
        gnd: per query ``{"ok": [...], "junk": [...]}`` (database indices).
        kappas: the k of precision@k.

    Returns:
        ``(map, aps, pr, prs)``: mean AP over queries with at least one positive, per-query AP (NaN for queries
        without positives), mean precision@k ``[len(kappas)]`` and per-query precision@k ``[n_q, len(kappas)]``.
        Junk images are removed from the ranking before anything is counted; precision@k uses
        ``min(k, rank of the last positive)`` as denominator, as revisitop does. ``map`` is NaN when no query
        has a positive.
    """
    ranks = np.asarray(ranks)
    nq = len(gnd)
    if ranks.ndim != 2 or ranks.shape[1] != nq:
        raise ValueError(f"ranks must be [n_db, n_q={nq}], got shape {ranks.shape}")
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    total_ap, total_pr, nempty = 0.0, np.zeros(len(kappas)), 0
    positions = np.arange(ranks.shape[0])
    for i in range(nq):
        qgnd = np.asarray(gnd[i].get("ok", []), dtype=np.int64).reshape(-1)
        if qgnd.size == 0:
            aps[i] = float("nan")
            prs[i] = float("nan")
            nempty += 1
            continue
        qjunk = np.asarray(gnd[i].get("junk", []), dtype=np.int64).reshape(-1)
        pos = positions[np.isin(ranks[:, i], qgnd)]
        junk = positions[np.isin(ranks[:, i], qjunk)]
        # shift each positive up by the number of junk images ranked before it
        pos = pos - np.searchsorted(junk, pos)
        ap = compute_ap(pos.tolist(), qgnd.size)
        aps[i] = ap
        total_ap += ap
        pos1 = pos + 1
        for j, k in enumerate(kappas):
            kq = min(int(pos1.max()) if pos1.size else k, k)
            prs[i, j] = (pos1 <= kq).sum() / kq
        total_pr += prs[i]
    n = nq - nempty
    if n == 0:
        return float("nan"), aps, np.full(len(kappas), float("nan")), prs
    return total_ap / n, aps, total_pr / n, prs


def revisited_metrics(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10)) -> dict:
    """Easy / Medium / Hard mAP and mP@k of the revisited protocol from revisitop-style ``gnd`` entries
    (``easy``, ``hard``, ``junk``). Values are fractions in [0, 1]; NaN when a protocol has no scorable query."""
    def cat(g, *keys):
        return np.concatenate([np.asarray(g.get(k, []), dtype=np.int64).reshape(-1) for k in keys])

    protocols = {
        "easy": [{"ok": cat(g, "easy"), "junk": cat(g, "junk", "hard")} for g in gnd],
        "medium": [{"ok": cat(g, "easy", "hard"), "junk": cat(g, "junk")} for g in gnd],
        "hard": [{"ok": cat(g, "hard"), "junk": cat(g, "junk", "easy")} for g in gnd],
    }
    out: dict = {"mAP": {}, "mP@k": {}, "n_scored_queries": {}}
    for name, g in protocols.items():
        m, aps, pr, _ = compute_map(ranks, g, kappas)
        out["mAP"][name] = m
        out["mP@k"][name] = {str(k): float(v) for k, v in zip(kappas, pr)}
        out["n_scored_queries"][name] = int(np.sum(~np.isnan(aps)))
    return out


def recall_at_k(ranks: np.ndarray, positives: Sequence[Sequence[int]], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Place-recognition Recall@k: the fraction of queries (with at least one positive) that have a positive
    among their first ``k`` results. ``ranks`` is ``[n_db, n_q]`` as in :func:`compute_map`."""
    ranks = np.asarray(ranks)
    hits = {k: 0 for k in ks}
    n = 0
    for i, pos in enumerate(positives):
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        if pos.size == 0:
            continue
        n += 1
        where = np.flatnonzero(np.isin(ranks[:, i], pos))
        first = int(where[0]) if where.size else math.inf
        for k in ks:
            hits[k] += first < k
    return {str(k): (hits[k] / n if n else float("nan")) for k in ks}


def rank_database(db: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """``[n_db, n_q]`` ranking by decreasing cosine similarity of L2-normalised descriptors (stable sort)."""
    scores = l2n(db.float()) @ l2n(queries.float()).T
    return torch.argsort(-scores, dim=0, stable=True).cpu().numpy()


# --------------------------------------------------------------------------------------------- ground truth

def _latin1_encode(obj, encoding="latin1"):
    # protocol-2 pickles (e.g. numpy arrays) store bytes as _codecs.encode(str, "latin1")
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise pickle.UnpicklingError("refusing _codecs.encode with anything but a latin1 string")
    return obj.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, tuples, strings, numbers and numpy arrays/scalars only; any other global (a class or
    callable a malicious file could use to run code) raises :class:`pickle.UnpicklingError` before it is
    called."""

    _BUILTINS = {"list": list, "dict": dict, "tuple": tuple, "set": set, "frozenset": frozenset, "bytes": bytes,
                 "bytearray": bytearray, "str": str, "int": int, "float": float, "bool": bool, "complex": complex}

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in self._BUILTINS:
            return self._BUILTINS[name]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) == ("collections", "OrderedDict"):
            from collections import OrderedDict

            return OrderedDict
        if module.startswith("numpy"):
            fn = _numpy_globals().get((module, name))
            if fn is not None:
                return fn
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: ground-truth files may only hold "
                                     f"plain containers and numpy arrays")


def _to_plain(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    return obj


def load_ground_truth(path: str | Path) -> dict:
    """Read a revisitop ground truth (``.json`` or ``.pkl``) into plain Python (lists of ints/floats/strs).

    Expected content: ``{"imlist": [...], "qimlist": [...], "gnd": [{"easy": [...], "hard": [...],
    "junk": [...], "bbx": [x1, y1, x2, y2]}, ...]}``. A ``.pkl`` is read with a restricted unpickler: anything
    beyond containers, numbers, strings and numpy arrays is refused (:class:`~dinokit.errors.DataError`) without
    being executed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ground-truth file {path} does not exist")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
        else:
            data = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: {e}") from None
    except (ValueError, EOFError, TypeError, AttributeError, ImportError, IndexError, KeyError) as e:
        raise DataError(f"{path} is not a readable ground-truth file ({type(e).__name__}: {e})") from None
    data = _to_plain(data)
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise DataError(f"{path} must hold a dict with keys imlist, qimlist, gnd")
    if len(data["gnd"]) != len(data["qimlist"]):
        raise DataError(f"{path}: {len(data['gnd'])} gnd entries for {len(data['qimlist'])} queries")
    n_db = len(data["imlist"])
    for i, g in enumerate(data["gnd"]):
        if not isinstance(g, dict):
            raise DataError(f"{path}: gnd[{i}] is not a dict")
        for key in ("easy", "hard", "junk"):
            vals = g.get(key, [])
            vals = [vals] if isinstance(vals, int) else vals
            if not all(isinstance(v, int) and 0 <= v < n_db for v in vals):
                raise DataError(f"{path}: gnd[{i}][{key!r}] must be database indices in [0, {n_db})")
            g[key] = list(vals)
        bbx = g.get("bbx")
        if bbx is not None and not _valid_box(bbx):
            raise DataError(f"{path}: gnd[{i}]['bbx'] must be a box [x1, y1, x2, y2] of finite numbers with x1 < x2 "
                            f"and y1 < y2, got {bbx!r}")
    return data


def _valid_box(bbx) -> bool:
    if not isinstance(bbx, (list, tuple)) or len(bbx) != 4:
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbx):
        return False
    x1, y1, x2, y2 = (int(round(v)) for v in bbx)  # as the crop rounds them
    return x1 < x2 and y1 < y2


def convert_ground_truth(src: str | Path, dst: str | Path) -> Path:
    """Convert a revisitop ``gnd_*.pkl`` (read safely) into the equivalent JSON file; returns ``dst``."""
    data = load_ground_truth(src)
    dst = Path(dst)
    dst.write_text(json.dumps(data))
    return dst


def load_revisited(root: str | Path, dataset: str) -> tuple[list[Path], list[Path], dict]:
    """``(database paths, query paths, ground truth)`` for ``roxford5k``/``rparis6k`` laid out as revisitop:
    ``ROOT/gnd_<dataset>.json`` (or ``.pkl``) and ``ROOT/jpg/<name>.jpg``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist")
    for ext in (".json", ".pkl"):
        gnd_path = root / f"gnd_{dataset}{ext}"
        if gnd_path.is_file():
            break
    else:
        raise DataError(f"no ground truth gnd_{dataset}.json or gnd_{dataset}.pkl in {root} (see docs/evaluations.md)")
    gt = load_ground_truth(gnd_path)
    img_dir = root / "jpg"
    if not img_dir.is_dir():
        raise DataError(f"image folder {img_dir} does not exist")

    def paths(names):
        out = [img_dir / (n if Path(n).suffix else f"{n}.jpg") for n in names]
        missing = [p.name for p in out if not p.is_file()]
        if missing:
            raise DataError(f"{len(missing)} image(s) listed in {gnd_path.name} are missing from {img_dir}, "
                            f"e.g. {missing[0]}")
        return out

    return paths(gt["imlist"]), paths(gt["qimlist"]), gt


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: p.relative_to(folder).as_posix())


def load_place_dataset(root: str | Path) -> tuple[list[Path], list[Path], list[list[int]]]:
    """``(query paths, database paths, positives per query)`` for ``ROOT/queries``, ``ROOT/database`` and
    ``ROOT/positives.json`` or ``ROOT/ground_truth.csv`` (names relative to the two folders)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist")
    qdir, ddir = root / "queries", root / "database"
    queries, database = list_images(qdir), list_images(ddir)
    if not queries or not database:
        raise DataError(f"no images in {qdir if not queries else ddir}")
    qidx = {p.relative_to(qdir).as_posix(): i for i, p in enumerate(queries)}
    didx = {p.relative_to(ddir).as_posix(): i for i, p in enumerate(database)}
    mapping: dict[str, list[str]] = {}
    if (root / "positives.json").is_file():
        src = root / "positives.json"
        try:
            raw = json.loads(src.read_text())
        except ValueError as e:
            raise DataError(f"{src} is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{src} must map query file names to lists of database file names")
        for q, v in raw.items():
            mapping.setdefault(q, []).extend([v] if isinstance(v, str) else list(v))
    elif (root / "ground_truth.csv").is_file():
        src = root / "ground_truth.csv"
        with open(src, newline="") as f:
            for r, row in enumerate(csv.reader(f)):
                row = [c.strip() for c in row if c.strip()]
                if not row or (r == 0 and row[0].lower() in ("query", "queries", "query_file")):
                    continue
                mapping.setdefault(row[0], []).extend(row[1:])
    else:
        raise DataError(f"no positives.json or ground_truth.csv in {root}")
    positives: list[list[int]] = [[] for _ in queries]
    for q, dbs in mapping.items():
        if q not in qidx:
            raise DataError(f"{src.name}: query {q!r} is not a file under {qdir}")
        for d in dbs:
            if d not in didx:
                raise DataError(f"{src.name}: database image {d!r} (positive of {q!r}) is not a file under {ddir}")
            if didx[d] not in positives[qidx[q]]:  # a positive named twice counts once (AP divides by the count)
                positives[qidx[q]].append(didx[d])
    return queries, database, positives


# ---------------------------------------------------------------------------------------------- features

#: How an unreadable image is to be dealt with (retrieval and copy detection describe every listed image: one left
#: out would shift the database indices the ground truth refers to, so the run stops instead).
UNREADABLE_HINT = ("fix or replace the file, or remove it (and its ground-truth entries): retrieval and copy detection "
                   "cannot leave a listed image out")


def load_rgb(path: str | Path) -> Image.Image:
    """Read an image file exactly as :func:`dinokit.data.load_image` does (the training and k-NN/linear loader:
    EXIF orientation, every PIL mode to 8-bit RGB, 16-bit images rescaled). An unreadable file raises a one-line
    :class:`~dinokit.errors.DataError` naming it and saying to fix or remove it (:data:`UNREADABLE_HINT`)."""
    try:
        return load_image(path)
    except DataError as e:
        msg = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
        raise DataError(f"{msg}; {UNREADABLE_HINT}") from None


def _to_tensor(img: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class _ThumbnailLoader:
    """Picklable (for DataLoader workers under spawn) path -> normalised tensor; see :func:`thumbnail_loader`."""

    def __init__(self, imsize: int | None, bbox: Sequence[float] | None = None):
        self.imsize, self.bbox = imsize, bbox

    def __call__(self, path: Path) -> torch.Tensor:
        img = load_rgb(path)  # fully decoded, as the reference's convert("RGB") before its thumbnail
        full = max(img.size)
        if self.bbox is not None:
            img = img.crop(tuple(int(round(v)) for v in self.bbox))
        if self.imsize:
            s = self.imsize if self.bbox is None else self.imsize * max(img.size) / full
            img.thumbnail((s, s), Image.Resampling.LANCZOS)
        return _to_tensor(img)


class _SquareLoader:
    """Picklable path -> normalised tensor; see :func:`square_loader`."""

    def __init__(self, imsize: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.imsize, self.mean, self.std = imsize, mean, std

    def __call__(self, path: Path) -> torch.Tensor:
        img = load_rgb(path).resize((self.imsize, self.imsize), Image.Resampling.BICUBIC)
        return _to_tensor(img, self.mean, self.std)


def thumbnail_loader(imsize: int | None, bbox: Sequence[float] | None = None) -> Callable[[Path], torch.Tensor]:
    """The reference retrieval preprocessing: the image read by :func:`load_rgb` (as the reference's
    ``convert("RGB")``, fully decoded, plus dinokit's EXIF orientation and 16-bit rescaling), PIL
    ``thumbnail((imsize, imsize))`` with Lanczos (the former ``ANTIALIAS``; it never enlarges), aspect kept, then
    ImageNet normalisation. With ``bbox`` (x1, y1, x2, y2, in the oriented image) the image is first cropped and
    the thumbnail size scaled by ``max(crop size) / max(full size)`` (revisitop's query protocol)."""
    return _ThumbnailLoader(imsize, bbox)


def square_loader(imsize: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Callable[[Path], torch.Tensor]:
    """The reference copy-detection preprocessing: the image read by :func:`load_rgb`, resized to
    ``imsize × imsize`` (bicubic, aspect ratio not kept), then normalised."""
    return _SquareLoader(imsize, mean, std)


class _Images(torch.utils.data.Dataset):
    def __init__(self, items: Sequence, loader: Callable):
        self.items, self.loader = list(items), loader

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.loader(self.items[i])


def _multiscale(model: nn.Module, x: torch.Tensor, descriptor: str, scales: Sequence[float]) -> torch.Tensor:
    v = None
    for s in scales:
        inp = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        f = describe(model, inp, descriptor)
        v = f if v is None else v + f
    return l2n(v / len(scales))


MULTISCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)


def _scaled(size: int, s: float) -> int:
    return size if s == 1 else math.floor(size * s)  # F.interpolate's output size for scale_factor=s


def _scale_note(s: float) -> str:
    return f" at scale {s:.2g} of --multiscale" if s != 1 else ""


def check_imsize(model: nn.Module, imsize: int | None, multiscale: bool = False) -> None:
    """Refuse (:class:`~dinokit.errors.ConfigError`, before any image is read) an ``imsize`` whose images could not
    hold one patch of ``model`` (at every scale of ``multiscale``); a model without ``patch_size`` (a CNN) takes
    any size."""
    p = getattr(model, "patch_size", None)
    if not p or not imsize:
        return
    scales = MULTISCALES if multiscale else (1.0,)
    bad = [s for s in scales if _scaled(imsize, s) < p]
    if bad:
        need = next(n for n in range(p, 4 * p + 1) if all(_scaled(n, s) >= p for s in scales))
        raise ConfigError(f"--imsize {imsize} gives images of at most {_scaled(imsize, bad[-1])} px"
                          f"{_scale_note(bad[-1])}, smaller than one {p}-pixel patch of the model; use --imsize "
                          f"{need} or more")


def _check_patch_grid(model: nn.Module, x: torch.Tensor, item, loader: Callable,
                      scales: Sequence[float]) -> None:
    """Name ``item`` (and the option to change) when its loaded image ``x`` is smaller than one patch of ``model``
    at one of ``scales`` (the model would refuse it without saying which file it was)."""
    p = getattr(model, "patch_size", None)
    if not p:
        return
    H, W = x.shape[-2:]
    for s in scales:
        h, w = _scaled(H, s), _scaled(W, s)
        if h >= p and w >= p:
            continue
        imsize = getattr(loader, "imsize", None)
        bbox = getattr(loader, "bbox", None)
        # a thumbnail never enlarges: when it kept the image's own size, a larger --imsize cannot help
        own_size = isinstance(loader, _ThumbnailLoader) and bbox is None and (not imsize or max(H, W) < imsize)
        where = "" if own_size or not imsize else f" at --imsize {imsize}"
        if bbox is not None:
            where += " after the crop to its query box"
        if s != 1:
            where += f" ({h}x{w} px{_scale_note(s)})"
        fixes = ([] if own_size or not imsize else ["use a larger --imsize"]) + (
            ["leave out --multiscale"] if s != 1 else [])
        fix = " or ".join(fixes) + ", or " if fixes else ""
        raise ConfigError(f"{item}: the image is {H}x{W} px (HxW){where}, smaller than one {p}-pixel patch of the "
                          f"model; {fix}enlarge, replace or remove this file")


@torch.no_grad()
def extract_descriptors(model: nn.Module, items: Sequence, loader: Callable, descriptor: str = "cls",
                        multiscale: bool = False, batch_size: int = 1, device: str | torch.device = "cpu",
                        num_workers: int = 0, progress: bool = False, desc: str = "features",
                        normalize: bool = True) -> torch.Tensor:
    """Descriptors ``[n, D]`` (float32, on CPU) for ``items`` loaded by ``loader`` (a path → normalised
    ``[3, H, W]`` tensor).

    ``multiscale`` averages scales 1, 1/√2, 1/2 and re-normalises (reference ``utils.multi_scale``);
    ``normalize`` L2-normalises the result (the reference retrieval does, copy detection does not before
    whitening). Images of different sizes need ``batch_size=1``.
    """
    from tqdm import tqdm

    model.eval()
    images = _Images(items, loader)
    dl = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = []
    scales = MULTISCALES if multiscale else (1.0,)
    try:
        for b, x in enumerate(tqdm(dl, desc=desc, disable=not (progress and stderr_is_tty()), leave=False)):
            _check_patch_grid(model, x, images.items[b * batch_size], loader, scales)  # a batch shares one size
            x = x.to(device, non_blocking=True)
            f = _multiscale(model, x, descriptor, MULTISCALES) if multiscale else describe(model, x, descriptor)
            out.append(f.float().cpu())
    except DataError as e:
        # a worker's DataError comes back with the worker's traceback in its message: keep the last line
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        msg = lines[-1] if lines else str(e)
        raise DataError(msg.split("DataError: ", 1)[-1]) from None
    if not out:
        raise DataError(f"no images to describe for {desc}")
    feats = torch.cat(out)
    return l2n(feats) if normalize else feats


def fit_whitening(model: nn.Module, images: Sequence[Path], loader: Callable, mode: str = "reference",
                  dim: int | None = None, **kw) -> PCAWhitening:
    """Describe ``images`` and learn a :class:`~dinokit.eval.whitening.PCAWhitening` on them (``kw`` go to
    :func:`extract_descriptors`). ``dim`` (``None``: all) must be between 1 and the descriptor's dimension, which
    is checked on the first image before the others are described."""
    if len(images) < 2:
        raise DataError(f"whitening needs at least 2 images, found {len(images)}")
    if dim is not None:
        if dim < 1:
            raise ConfigError(f"--whiten-dim must be > 0, got {dim}")
        with torch.no_grad():  # one image, no loader workers: the descriptor's length
            x = loader(images[0])[None]
            _check_patch_grid(model, x, images[0], loader, (1.0,))
            x = x.to(kw.get("device", "cpu"))
            size = describe(model, x, kw.get("descriptor", "cls")).shape[-1]
        if dim > size:
            raise ConfigError(f"--whiten-dim {dim} is larger than the {size}-dimensional "
                              f"{kw.get('descriptor', 'cls')} descriptor")
    feats = extract_descriptors(model, images, loader, desc="whitening", **kw)
    return PCAWhitening(mode=mode, dim=dim).fit(feats)


def learn_whitening(model: nn.Module, whiten_dir: str | Path | None, loader: Callable, mode: str = "reference",
                    dim: int | None = None, **kw) -> tuple[PCAWhitening | None, dict | None]:
    """``(whitening, record)`` learned on the images of ``whiten_dir`` (:func:`fit_whitening`), ``(None, None)``
    without a folder. The evaluations call it before describing their database, so its errors (too few images,
    ``dim`` too large) come before the long part. ``record`` is the ``whitening`` entry of a result: mode,
    folder, images, dimensions kept (``dim``), energy kept."""
    if whiten_dir is None:
        return None, None
    images = list_images(whiten_dir)
    if len(images) < 2:
        raise DataError(f"whitening needs at least 2 images in {whiten_dir}, found {len(images)}")
    whitening = fit_whitening(model, images, loader, mode, dim, **kw)
    return whitening, {"mode": mode, "dir": str(whiten_dir), "n_images": len(images),
                       "dim": int(whitening.proj.shape[0]), "energy_kept": whitening.energy_kept}


def _search(db: torch.Tensor, q: torch.Tensor, whitening: PCAWhitening | None) -> np.ndarray:
    if whitening is not None:
        db, q = whitening(db), whitening(q)
    return rank_database(db, q)


def evaluate_revisited(model: nn.Module, root: str | Path, dataset: str = "roxford5k", imsize: int = 224,
                       multiscale: bool = False, descriptor: str = "cls", whiten_dir: str | Path | None = None,
                       whiten_mode: str = "reference", whiten_dim: int | None = None, query_crop: bool = False,
                       device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = False,
                       kappas: Sequence[int] = (1, 5, 10)) -> dict:
    """Revisited Oxford/Paris evaluation (see module docstring). Returns fractions in [0, 1]:
    ``{"mAP": {"easy", "medium", "hard"}, "mP@k": {...}, "n_queries", "n_database", ...}``."""
    db_paths, q_paths, gt = load_revisited(root, dataset)
    check_imsize(model, imsize, multiscale)
    kw = dict(descriptor=descriptor, multiscale=multiscale, device=device, num_workers=num_workers,
              progress=progress)
    whitening, whitening_info = learn_whitening(model, whiten_dir, thumbnail_loader(imsize), whiten_mode, whiten_dim,
                                                **kw)
    db = extract_descriptors(model, db_paths, thumbnail_loader(imsize), desc="database", **kw)
    if query_crop:
        bbxs = [g.get("bbx") for g in gt["gnd"]]
        if None in bbxs:
            raise DataError(f"--query-crop: the ground truth of {dataset} has no box ('bbx') for query "
                            f"{bbxs.index(None)} ({q_paths[bbxs.index(None)].name})")
        q = torch.cat([extract_descriptors(model, [p], thumbnail_loader(imsize, b), **kw)
                       for p, b in zip(q_paths, bbxs)])
    else:
        q = extract_descriptors(model, q_paths, thumbnail_loader(imsize), desc="queries", **kw)
    ranks = _search(db, q, whitening)
    res = revisited_metrics(ranks, gt["gnd"], kappas)
    res.update(dataset=dataset, n_queries=len(q_paths), n_database=len(db_paths), descriptor=descriptor,
               imsize=imsize, multiscale=multiscale, query_crop=query_crop,
               whitening=whitening_info)
    return res


def evaluate_place_recognition(model: nn.Module, root: str | Path, imsize: int = 224, multiscale: bool = False,
                               descriptor: str = "cls", whiten_dir: str | Path | None = None,
                               whiten_mode: str = "reference", whiten_dim: int | None = None,
                               device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = False,
                               ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k and mAP of a query/database folder dataset (see module docstring); fractions in [0, 1]."""
    queries, database, positives = load_place_dataset(root)
    check_imsize(model, imsize, multiscale)
    kw = dict(descriptor=descriptor, multiscale=multiscale, device=device, num_workers=num_workers,
              progress=progress)
    whitening, whitening_info = learn_whitening(model, whiten_dir, thumbnail_loader(imsize), whiten_mode, whiten_dim,
                                                **kw)
    db = extract_descriptors(model, database, thumbnail_loader(imsize), desc="database", **kw)
    q = extract_descriptors(model, queries, thumbnail_loader(imsize), desc="queries", **kw)
    ranks = _search(db, q, whitening)
    m, aps, _, _ = compute_map(ranks, [{"ok": p} for p in positives], ks)
    return {"dataset": "folder", "recall@k": recall_at_k(ranks, positives, ks), "mAP": m,
            "n_queries": len(queries), "n_scored_queries": int(np.sum(~np.isnan(aps))), "n_database": len(database),
            "descriptor": descriptor, "imsize": imsize, "multiscale": multiscale,
            "whitening": whitening_info}
