"""Copy detection on Copydays (INRIA) or any folder laid out like it, with frozen DINO features.

Protocol of the reference ``eval_copy_detection.py`` (Caron et al., ICCV 2021, Table 6; reference notes
``shared/reference/dino-reference.md`` §4.6):

* every image is resized to a square ``imsize × imsize`` (bicubic, aspect ratio not kept; 320 for ViT-B/8) and
  normalised with the ImageNet mean/std;
* descriptor: the CLS token of the last normed block concatenated with GeM (p = 4) of its patch tokens (2·D);
* optional PCA whitening learned on a separate image set (the paper: 20k YFCC100M images), in the reference's
  exact form (uncentred second moment, eigenvalues floored at ``max · 1e-5``, mean subtracted before projecting)
  or properly centred (:class:`~dinokit.eval.whitening.PCAWhitening`);
* descriptors L2-normalised, cosine similarity against the database (the originals plus the distractors), the
  first ``topk = 20`` results kept;
* AP of each query with the INRIA Holidays trapezoid rule over the positives found in those 20 results
  (positives beyond them add nothing); mAP per query block.

Layout (``ROOT``): ``original/`` (the database originals, also scored as a query block as in the reference),
one folder per query block holding images directly (Copydays: ``strong/``, ``jpegqual/<q>/``, ``crops/<pct>/``;
any other names work), optional ``distractors/`` and ``whitening/``. A query's positives: the original with the
same file name, or -- in the ``strong`` block, or when no original has its name -- the originals whose file names
share its first four characters (the reference's rule for ``strong``). ``overall`` is the mean AP over all
queries of all blocks except ``original``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import DataError
from ..models.linear import matmul_nt
from .retrieval import (
    IMAGE_EXTENSIONS,
    check_imsize,
    compute_ap,
    extract_descriptors,
    learn_whitening,
    list_images,
    square_loader,
)
from .whitening import l2n

__all__ = ["CopyDetectionData", "load_copy_detection", "find_positives", "block_ap", "evaluate_copy_detection",
           "RESERVED_DIRS"]

RESERVED_DIRS = ("original", "distractors", "whitening")
_BLOCK_ORDER = ("original", "strong")


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _images_in(folder: Path) -> list[Path]:
    """Images directly inside ``folder`` (not recursive), sorted by name as the reference does."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: p.name)


@dataclass
class CopyDetectionData:
    """Database (originals then distractors) and query blocks with each query's positives (database indices)."""

    originals: list[Path]
    distractors: list[Path] = field(default_factory=list)
    blocks: dict[str, list[Path]] = field(default_factory=dict)
    positives: dict[str, list[list[int]]] = field(default_factory=dict)

    @property
    def database(self) -> list[Path]:
        return self.originals + self.distractors


def find_positives(query_name: str, original_names: list[str], block: str, prefix_len: int = 4) -> list[int]:
    """Indices of the originals a query is a copy of: same file name, or (block ``strong``, or no original of
    that name) the originals whose names share the first ``prefix_len`` characters (reference rule)."""
    if block != "strong" and query_name in original_names:
        return [original_names.index(query_name)]
    return [j for j, n in enumerate(original_names) if n[:prefix_len] == query_name[:prefix_len]]


def load_copy_detection(root: str | Path, distractors_dir: str | Path | None = None,
                        n_distractors: int | None = None, blocks: list[str] | None = None,
                        prefix_len: int = 4, exclude: tuple = ()) -> CopyDetectionData:
    """Scan a Copydays-style folder (see module docstring). ``distractors_dir`` defaults to
    ``ROOT/distractors`` (if present); ``n_distractors`` keeps the first N (sorted) of them (``None``: all);
    ``blocks`` restricts the query blocks (relative folder names such as ``strong`` or ``jpegqual/50``). Folders
    other than ``original`` are query blocks except ``distractors``/``whitening``, the ``distractors_dir`` and
    the ``exclude`` folders (e.g. a whitening folder given by path) wherever they are, and what they hold."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"copy-detection root {root} does not exist")
    odir = root / "original"
    if not odir.is_dir():
        raise DataError(f"{root} has no original/ folder (the database originals)")
    originals = _images_in(odir)
    if not originals:
        raise DataError(f"no images in {odir}")
    data = CopyDetectionData(originals=originals)
    if n_distractors != 0:
        ddir = Path(distractors_dir) if distractors_dir is not None else root / "distractors"
        if distractors_dir is not None and not ddir.is_dir():
            raise DataError(f"distractor folder {ddir} does not exist")
        if ddir.is_dir():
            found = list_images(ddir)
            if n_distractors is not None and n_distractors > len(found):
                raise DataError(f"asked for {n_distractors} distractors but {ddir} holds {len(found)} images")
            data.distractors = found if n_distractors is None else found[:n_distractors]
        elif n_distractors:
            raise DataError(f"asked for {n_distractors} distractors but {ddir} does not exist")

    found_blocks: dict[str, list[Path]] = {"original": originals}
    not_queries = {Path(p).resolve() for p in (distractors_dir, *exclude) if p is not None and Path(p).is_dir()}
    for d in sorted(p for p in root.rglob("*") if p.is_dir()):
        rel, real = d.relative_to(root).as_posix(), d.resolve()
        if rel.split("/")[0] in RESERVED_DIRS or any(s == real or s in real.parents for s in not_queries):
            continue
        imgs = _images_in(d)
        if imgs:
            found_blocks[rel] = imgs
    if blocks:
        missing = [b for b in blocks if b not in found_blocks]
        if missing:
            raise DataError(f"query block(s) {', '.join(missing)} not found under {root} "
                            f"(found: {', '.join(found_blocks)})")
        found_blocks = {b: found_blocks[b] for b in blocks}
    order = sorted(found_blocks, key=lambda b: (_BLOCK_ORDER.index(b) if b in _BLOCK_ORDER else len(_BLOCK_ORDER),
                                                _natural_key(b)))
    names = [p.name for p in originals]
    for b in order:
        data.blocks[b] = found_blocks[b]
        data.positives[b] = [find_positives(q.name, names, b, prefix_len) for q in found_blocks[b]]
    if len(data.blocks) <= (1 if "original" in data.blocks else 0):
        raise DataError(f"no query block under {root}: add folders of copies next to original/ "
                        f"(Copydays: strong/, jpegqual/<q>/, crops/<pct>/)")
    return data


def block_ap(ranking: np.ndarray, positives: list[list[int]]) -> np.ndarray:
    """Per-query Holidays AP from ``ranking`` ``[n_q, k]`` (database indices, best first, possibly truncated to
    the first k results as the reference's top-20). Queries without positives get NaN."""
    aps = np.full(len(positives), np.nan)
    for i, pos in enumerate(positives):
        if not pos:
            continue
        hits = np.flatnonzero(np.isin(ranking[i], pos))
        aps[i] = compute_ap(hits.tolist(), len(pos))
    return aps


@torch.no_grad()
def evaluate_copy_detection(model: nn.Module, root: str | Path, imsize: int = 320, descriptor: str = "cls+gem",
                            whiten_dir: str | Path | None = None, whiten_mode: str = "reference",
                            whiten_dim: int | None = None, distractors_dir: str | Path | None = None,
                            n_distractors: int | None = None, topk: int | None = 20,
                            blocks: list[str] | None = None, batch_size: int = 16,
                            device: str | torch.device = "cpu", num_workers: int = 0,
                            progress: bool = False) -> dict:
    """Copy-detection mAP per query block and overall (fractions in [0, 1]); see the module docstring.

    ``topk=None`` scores the full ranking instead of the reference's first 20 results. Images are read as
    :func:`dinokit.data.load_image` reads them (:func:`~dinokit.eval.retrieval.load_rgb`); an unreadable one stops
    the run with a one-line :class:`~dinokit.errors.DataError` naming it (a database image cannot be left out
    without changing the positives' indices).
    """
    data = load_copy_detection(root, distractors_dir, n_distractors, blocks,
                               exclude=(whiten_dir,) if whiten_dir is not None else ())
    check_imsize(model, imsize)
    loader = square_loader(imsize)
    kw = dict(descriptor=descriptor, batch_size=batch_size, device=device, num_workers=num_workers,
              progress=progress, normalize=False)
    whitening, whitening_info = learn_whitening(model, whiten_dir, loader, whiten_mode, whiten_dim, **kw)
    db = extract_descriptors(model, data.database, loader, desc="database", **kw)
    db = l2n(db if whitening is None else whitening(db))
    k = len(data.database) if topk is None else min(topk, len(data.database))
    result: dict = {"blocks": {}, "n_database": len(data.database), "n_originals": len(data.originals),
                    "n_distractors": len(data.distractors), "descriptor": descriptor, "imsize": imsize, "topk": topk,
                    "whitening": whitening_info}
    all_aps = []
    for name, paths in data.blocks.items():
        q = extract_descriptors(model, paths, loader, desc=name, **kw)
        if whitening is not None:
            q = whitening(q)
        q = l2n(q)
        ranking = torch.topk(matmul_nt(q, db), k, dim=1, largest=True, sorted=True).indices.numpy()
        aps = block_ap(ranking, data.positives[name])
        scored = ~np.isnan(aps)
        result["blocks"][name] = {"mAP": float(aps[scored].mean()) if scored.any() else float("nan"),
                                  "n_queries": len(paths), "n_without_positive": int((~scored).sum())}
        if name != "original":
            all_aps.append(aps[scored])
    allv = np.concatenate(all_aps) if all_aps else np.zeros(0)
    result["overall"] = {"mAP": float(allv.mean()) if allv.size else float("nan"), "n_queries": int(allv.size)}
    return result
