"""The run report: one self-contained HTML page per run (``OUT/report.html``), no network needed to view it.

Sections (stable ids): ``results`` (results.json of the demo, if any), ``curves`` (loss, lr, wd, momentum,
teacher temperature, online k-NN, collapse diagnostics), ``attention`` (test images with the last block's
CLS attention per head and the 0.6 threshold masks), ``projection`` (PCA of test features coloured by class),
``config`` and ``environment``. Pictures are PNGs embedded as base64 ``data:`` URIs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import platform
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import can_create_in, write_text_atomic
from .errors import CheckpointError, ConfigError, DataError, DinokitError, write_failed

__all__ = ["write_report", "read_log"]

_SECTIONS = ("results", "curves", "attention", "projection", "config", "environment")


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/log.jsonl`` (``[]`` without one); lines that are not a JSON object (cut by a
    crash, blank) are skipped. Shared by the report and the demo."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pil_png(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _num(r: dict[str, Any], key: str) -> float | None:
    """``r[key]`` when it is a finite number, else ``None`` (missing, null, text, NaN)."""
    v = r.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _placeholder(r: dict[str, Any]) -> bool:
    """An epoch record of an older dinokit for an epoch with no step of its own (a run stopped on an epoch's last
    iteration and resumed): its throughput is 0 and its loss the 0 of an empty average, not measurements. Runs
    now log that throughput as null and the epoch's real mean loss (from the checkpoint)."""
    return r.get("type") == "epoch" and _num(r, "images_per_s") == 0


_COLLAPSE = ("teacher_entropy", "entropy_max", "kl_mean_to_uniform", "distinct_prototypes")

#: y-axis labels of the training curves (the losses are cross-entropies in nats)
_Y_LABELS = {"loss": "nats", "koleo": "-mean log NN distance", "lr": "learning rate", "wd": "weight decay",
             "momentum": "EMA momentum", "teacher_temp": "temperature"}
_SMOOTH_ABOVE = 500  # points: longer curves are drawn faintly with a running mean over them
_CLIP_QUANTILE = 0.995  # a curve whose few spikes would flatten it is drawn up to this quantile (and says so)


def _integer_x(ax) -> None:
    """Whole iterations/epochs on the x axis, written out (no "1e6" offset, no fractional ticks; a single point
    gets a range of whole numbers around it)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    lo, hi = ax.dataLim.intervalx
    if math.isfinite(lo) and hi - lo < 1:
        ax.set_xlim(math.floor(lo) - 1, math.floor(lo) + 1)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 10_000 else f"{v:g}"))


def _plot_curve(ax, x: list[float], y: list[float], key: str) -> str | None:
    """Draw one training curve; a long one as faint points under a running mean (a window of ~1% of the points),
    a spiky one clipped at the 99.5% quantile. Returns a note for the caption of what was clipped, if anything."""
    xs, ys = np.asarray(x), np.asarray(y)
    if len(xs) > _SMOOTH_ABOVE:
        w = max(len(ys) // 100, 2)
        mean = np.convolve(ys, np.ones(w) / w, mode="valid")
        ax.plot(xs, ys, lw=0.5, alpha=0.3, color="C0")
        ax.plot(xs[w - 1:], mean, lw=1.5, color="C0", label=f"running mean of {w}")
        ax.legend(fontsize=7)
    else:
        ax.plot(xs, ys, lw=1.2, marker="o" if len(xs) < 3 else None, ms=4)  # one or two points: drawn, not blank
    note = None
    finite = ys[np.isfinite(ys)]
    if key in ("loss", "koleo") and len(finite) >= 20:
        # data points, not interpolations into a spike (short curves had their limit inside it)
        bottom = float(np.quantile(finite, 1 - _CLIP_QUANTILE, method="higher"))
        top = float(np.quantile(finite, _CLIP_QUANTILE, method="lower"))
        spread = top - bottom
        above = finite.max() > top + 2 * spread
        # below too (a -1e308), unless the low points are the newest: a curve that has just started to fall
        low = np.flatnonzero(finite < bottom - 2 * spread)
        below = bool(len(low)) and low.min() < 0.95 * len(finite)
        if math.isfinite(spread) and (above or below):  # spikes far from the curve: keep the curve readable
            pad = 0.05 * (spread or 1.0)
            y0, y1 = (bottom if below else float(finite.min())) - pad, (top if above else float(finite.max())) + pad
            ax.set_ylim(y0, y1)
            out = [f"{int((finite > y1).sum())} point(s) above the plot, up to {finite.max():.3g}"] if above else []
            out += [f"{int((finite < y0).sum())} below, down to {finite.min():.3g}"] if below else []
            note = "; ".join(out)
    ax.set_ylabel(_Y_LABELS.get(key, ""))
    _integer_x(ax)
    return note


def _curves(log: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], list[str]]:
    """``(pictures, notes)``: a curve per logged quantity, from the records that have it; a note for what is
    missing. Any field may be missing from any record."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    train = [r for r in log if r.get("type") == "train"]
    epochs = [r for r in log if r.get("type") == "epoch"]
    knn = [r for r in log if r.get("type") == "knn"]
    pics: list[tuple[str, str]] = []
    notes: list[str] = []

    def series(records, xkey, key):
        pts = [(_num(r, xkey), _num(r, key)) for r in records]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    src = train if train else [r for r in epochs if not _placeholder(r)]
    loss_title = "loss (DINO + weighted KoLeo)" if any("koleo" in r for r in src) else "DINO loss"
    for key, title in (("loss", loss_title), ("koleo", "KoLeo term (unweighted)"), ("lr", "learning rate"),
                       ("wd", "weight decay"), ("momentum", "teacher momentum"),
                       ("teacher_temp", "teacher temperature")):
        x, y = series(src, "iteration", key)
        if not x:
            continue
        fig, ax = plt.subplots(figsize=(4.2, 2.8))
        clipped = _plot_curve(ax, x, y, key)
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        pics.append((f"{title} ({clipped})" if clipped else title, _png(fig)))
    x, y = series(knn, "train_minutes", "knn_top1")
    if x:
        fig, ax = plt.subplots(figsize=(4.2, 2.8))
        ax.plot(x, y, "o-", lw=1.2)
        ax.set_xlabel("training minutes")
        ax.set_ylabel("top-1 %")
        ax.set_title("online weighted k-NN")
        ax.grid(alpha=0.3)
        pics.append(("online k-NN", _png(fig)))
    if any(_num(r, k) is not None for r in epochs for k in _COLLAPSE):
        fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
        ln_k = next((_num(r, "entropy_max") for r in reversed(epochs) if _num(r, "entropy_max")), None)
        of_k = f" (of K = {round(math.exp(ln_k))})" if ln_k and 0 < ln_k < 700 else ""
        for ax, keys, title, ylabel in (
                (axes[0], ("teacher_entropy", "entropy_max"), "teacher entropy", "nats"),
                (axes[1], ("kl_mean_to_uniform",), "KL(mean target || uniform)", "nats"),
                (axes[2], ("distinct_prototypes",), f"distinct argmax prototypes{of_k}", "prototypes")):
            for key in keys:
                ex, ey = series(epochs, "epoch", key)
                if key == "entropy_max":  # a marker too: one epoch is one point, and a line needs two
                    ax.plot(ex, ey, "--", marker="_", ms=12, color="C3", label="ln K (uniform collapse)")
                else:
                    ax.plot(ex, ey, "-", marker="o" if len(ex) <= 30 else None, ms=5,
                            label="teacher entropy" if key == "teacher_entropy" else None)
            if len(keys) > 1:
                ax.legend(fontsize=7)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            _integer_x(ax)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        pics.append(("collapse diagnostics", _png(fig)))
        lacking = [r.get("epoch", "?") for r in epochs if any(_num(r, k) is None for k in _COLLAPSE)]
        if lacking:
            notes.append(f"No collapse diagnostics logged for epoch{'s' if len(lacking) > 1 else ''} "
                         f"{', '.join(map(str, lacking))} (e.g. a run stopped on an epoch's last iteration and "
                         "resumed): those points are left out.")
    placeholders = [r.get("epoch", "?") for r in epochs if _placeholder(r)]
    if placeholders:
        notes.append(f"The record of epoch{'s' if len(placeholders) > 1 else ''} "
                     f"{', '.join(map(str, placeholders))} has no steps of its own (resumed at the epoch's end): "
                     "its loss and images/s are placeholders, not measurements, and are not plotted.")
    return pics, notes


def _load_model(run_dir: Path):
    """``(teacher backbone, config, note)`` from the newest intact checkpoint, found as training finds the one it
    resumes from (:func:`dinokit.checkpoint.find_resume_checkpoint`: unusable ones are skipped with a warning);
    ``(None, None, why)`` when there is none, so the report is still written from the log."""
    from .checkpoint import find_resume_checkpoint
    from .config import TrainConfig, apply_overrides
    from .trainer import build_student_teacher

    try:
        ckpt, ckpt_path = find_resume_checkpoint(run_dir)
    except CheckpointError:  # every checkpoint is unusable; each one was named in a warning
        why = f"no intact checkpoint in {run_dir}: no attention maps or feature projection"
        warnings.warn(f"dinokit: {why}", stacklevel=2)
        return None, None, why
    if ckpt is None:
        return None, None, "no checkpoint.pth yet"
    try:
        cfg = apply_overrides(TrainConfig(), ckpt.get("config", {}))
        _, teacher, _ = build_student_teacher(cfg)
        teacher.load_state_dict(ckpt["teacher"])
    except (DinokitError, KeyError, RuntimeError, TypeError, ValueError) as e:
        why = f"cannot rebuild the teacher of {ckpt_path}: {str(e).strip().splitlines()[0] if str(e) else e!r}"
        warnings.warn(f"dinokit: {why}; writing the report without the checkpoint-based sections", stacklevel=2)
        return None, None, why
    note = "" if ckpt_path.name == "checkpoint.pth" else f"Teacher from {ckpt_path.name}, the newest intact checkpoint."
    return teacher.backbone.eval(), cfg, note


def _test_images(cfg, n: int, data: str | None = None):
    """Up to ``n`` (PIL image, label) pairs from ``data``, else the run's k-NN validation data or its training
    data's test split."""
    from .data import build_dataset
    from .errors import DataError

    spec = data or cfg.knn_val or cfg.data_path
    try:
        ds = build_dataset(spec, transform=None, split="test")
    except DataError as e:
        if data is None and not Path(str(spec).split(":", 1)[-1]).is_absolute():
            raise DataError(f"{e} ({spec} is relative to the folder training ran in: run the report from there, "
                            "or pass --data)") from None
        raise
    n_total = len(ds)
    idx = np.linspace(0, n_total - 1, num=min(n, n_total)).astype(int).tolist()
    out = []
    for i in idx:
        if hasattr(ds, "to_pil"):
            out.append((ds.to_pil(i).convert("RGB"), int(ds.labels[i])))
        else:
            img, lab = ds[i]
            out.append((img.convert("RGB"), int(lab)))
    return out, ds


_CELL_PX = 112  # displayed width of each picture of the attention grid


def _eval_views(cfg, ds):
    """``(model transform, view)`` of the report's test images, as the k-NN monitor evaluates that data: a tensor
    data set resized straight to the training resolution; photos resized (shorter side) and centre-cropped
    (:func:`dinokit.augmentation.eval_transform`). ``view(PIL) -> PIL`` is the image the model sees (geometry
    only), for display."""
    import torchvision.transforms.v2 as T
    from PIL import Image

    from .augmentation import eval_resize_size
    from .data import ImageFolderDataset
    from .monitor import eval_transform_for

    size = cfg.global_crop_size
    if not isinstance(ds, ImageFolderDataset):
        return eval_transform_for(cfg, ds), lambda im: im.resize((size, size), Image.BICUBIC)
    crop = T.Compose([T.Resize(eval_resize_size(size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(size)])
    return eval_transform_for(cfg, ds), crop


def _attention_section(backbone, cfg, images, threshold: float = 0.6, classes: list[str] | None = None,
                       views=None) -> str:
    from PIL import Image

    from .eval.attention import _upsample, attention_maps, colormap, draw_outline, threshold_masks

    tf, view = views or _eval_views(cfg, None)
    blocks = []
    for img, label in images:
        x = tf(img)
        attn = attention_maps(backbone, x)
        if not torch.isfinite(attn).all():  # NaN/Inf weights: the maps would be blank pictures
            return "<p class='note'>No attention maps: the attention is not finite: the run diverged.</p>"
        masks = threshold_masks(attn, threshold).numpy()
        scale = max(1, math.ceil(_CELL_PX / x.shape[-1]))  # small inputs drawn with whole pixels per pixel
        size = (x.shape[-1] * scale, x.shape[-2] * scale)
        name = classes[label] if classes and 0 <= label < len(classes) else label  # the folder's name if known
        caption = f"class {html.escape(str(name))}" if label >= 0 else "input"  # -1: an image without a class

        def cell(picture, alt: str, text: str) -> str:
            return (f'<figure><img src="{_pil_png(picture)}" alt="{alt}" width="{_CELL_PX}">'
                    f"<figcaption>{text}</figcaption></figure>")

        cells = [cell(view(img).resize(size, Image.NEAREST), "input", caption),
                 cell(Image.fromarray(colormap(_upsample(attn.mean(0).numpy(), size))), "mean", "mean of heads")]
        for h in range(attn.shape[0]):
            heat = draw_outline(colormap(_upsample(attn[h].numpy(), size)), _upsample(masks[h], size))
            cells.append(cell(Image.fromarray(heat), f"head {h}", f"head {h}"))
        blocks.append("<div class='attn'>" + "".join(cells) + "</div>")
    return (f"<p>Each row: the image as the model sees it, the mean over heads, then each head's last-block CLS "
            f"attention (viridis, scaled per map) with the outline (black and white) of the smallest set of "
            f"patches holding {threshold:.0%} of its attention (the reference's masks).</p>" + "".join(blocks))


@torch.no_grad()
def _projection_section(backbone, cfg, ds, n: int = 1000) -> str:
    import matplotlib.pyplot as plt

    tf, _ = _eval_views(cfg, ds)
    idx = np.linspace(0, len(ds) - 1, num=min(n, len(ds))).astype(int)
    feats, labels = [], []
    for start in range(0, len(idx), 256):
        chunk = idx[start:start + 256]
        imgs = [ds.to_pil(int(i)).convert("RGB") if hasattr(ds, "to_pil") else ds[int(i)][0] for i in chunk]
        feats.append(backbone(torch.stack([tf(im) for im in imgs])).float())
        labels += [int(ds.labels[int(i)]) for i in chunk]
    f = torch.cat(feats)
    if not torch.isfinite(f).all():  # NaN/Inf weights: no PCA possible (the SVD would raise)
        return "<p class='note'>No projection: the features are not finite: the run diverged.</p>"
    if len(f) < 3:  # a 2-D projection needs two components of the centred features
        return f"<p class='note'>No projection: {len(f)} image(s); it needs at least 3.</p>"
    f = torch.nn.functional.normalize(f, dim=1)
    f = f - f.mean(0, keepdim=True)
    _, sv, v = torch.linalg.svd(f, full_matrices=False)
    xy = (f @ v[:2].T).numpy()
    share = (sv**2 / (sv**2).sum().clamp_min(1e-30)).tolist()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    lab = np.array(labels)
    names = list(getattr(ds, "classes", None) or [])
    present = sorted(set(lab.tolist()))
    if (lab >= 0).all() and len(present) <= 20:  # one colour per class, named in a legend
        cmap = plt.get_cmap("tab10" if len(present) <= 10 else "tab20")
        for i, c in enumerate(present):
            pick = lab == c
            ax.scatter(xy[pick, 0], xy[pick, 1], s=6, color=cmap(i),
                       label=str(names[c]) if 0 <= c < len(names) else f"class {c}")
        ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    elif (lab >= 0).all():
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=lab, cmap="turbo", s=6)
        fig.colorbar(sc, ax=ax, label="class index")
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=6)
    ax.set_xlabel(f"PC1 ({share[0]:.0%} of the variance)")
    ax.set_ylabel(f"PC2 ({share[1]:.0%} of the variance)")
    from .eval.knn import is_vit

    kind = "CLS" if is_vit(backbone) else "pooled"
    ax.set_title(f"PCA of {len(lab)} teacher {kind} features (L2-normalised)", fontsize=10)
    return f'<img src="{_png(fig)}" alt="projection">'


def _run_summary(log: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's headline numbers from its log: epochs and iterations done, training minutes, images/s and data
    wait (time-weighted over the epochs that ran steps), the last epoch's loss, the last and best online k-NN."""
    epochs = [r for r in log if r.get("type") == "epoch" and _num(r, "epoch") is not None]
    knn = [r for r in log if r.get("type") == "knn" and _num(r, "knn_top1") is not None]
    out: dict[str, Any] = {}
    if epochs:
        last = epochs[-1]
        out["epochs done"] = int(_num(last, "epoch")) + 1
        if _num(last, "iteration") is not None:
            out["iterations"] = int(_num(last, "iteration"))
        if _num(last, "train_minutes") is not None:
            out["training minutes"] = round(_num(last, "train_minutes"), 2)
        seconds = images = wait = 0.0
        prev = 0.0
        for r in epochs:
            minutes = _num(r, "train_minutes")
            if minutes is None:
                continue
            dt, prev = max(minutes - prev, 0.0) * 60, minutes
            ips, frac = _num(r, "images_per_s"), _num(r, "data_wait_frac")
            if ips and dt > 0:  # None or 0: no step of that epoch ran in its process (a resume)
                seconds, images, wait = seconds + dt, images + ips * dt, wait + (frac or 0.0) * dt
        if seconds > 0:
            out["images / s"] = round(images / seconds, 1)
            out["data wait"] = f"{100 * wait / seconds:.1f}%"
        loss = _num(last, "loss")
        if loss is not None and not _placeholder(last):
            out["last epoch's loss"] = round(loss, 4)
    if knn:
        def at(r):
            from .trainer import format_duration

            return f"{_num(r, 'knn_top1'):.2f}% at {format_duration(60 * (_num(r, 'train_minutes') or 0.0))}"

        out["online k-NN top-1 (last)"] = at(knn[-1])
        out["online k-NN top-1 (best)"] = at(max(knn, key=lambda r: _num(r, "knn_top1")))
    return out


def _environment() -> dict[str, str]:
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
           "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except Exception:
        pass
    return env


def _table(d: dict[str, Any]) -> str:
    def cell(v):
        return html.escape(v if isinstance(v, str) else json.dumps(v))

    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{cell(v)}</td></tr>" for k, v in d.items())
    return f"<table class='kv'>{rows}</table>"


def write_report(run_dir: str | Path, n_images: int = 8, projection_points: int = 1000,
                 data: str | None = None) -> Path:
    """Write ``run_dir/report.html`` and return its path. ``n_images`` (>= 0; 0: no attention grid) test images
    go in the attention grid, ``projection_points`` (> 0) in the feature projection, taken from ``data`` (default:
    the run's k-NN validation data, else its training data). Parts that cannot be made (no
    intact checkpoint, a CNN backbone without attention, unlabelled data) are replaced by a note, never an
    exception; a bad run directory or an unwritable report path is refused before any work."""
    if n_images < 0:
        raise ConfigError(f"the number of attention images must be >= 0, got {n_images}")
    if projection_points <= 0:
        raise ConfigError(f"the number of projection points must be > 0, got {projection_points}")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise DataError(f"{run_dir} is a file, not a run directory: pass the --output-dir of a training run")
    if not run_dir.is_dir():
        raise DataError(f"run directory not found: {run_dir}")
    if not any((run_dir / name).exists() for name in ("log.jsonl", "config.yaml", "checkpoint.pth", "results.json")):
        raise DataError(f"{run_dir} is not a dinokit run directory (no log.jsonl, config.yaml, checkpoint.pth or "
                        "results.json): pass the --output-dir of a training run")
    out = run_dir / "report.html"
    if out.is_dir():
        raise DataError(f"{out} is a folder, where the report is written: move it away")
    if not (os.access(out, os.W_OK) if out.exists() else can_create_in(run_dir)):
        raise DataError(f"cannot write {out}: no permission")
    log = read_log(run_dir)
    body: dict[str, str] = {}

    summary = _run_summary(log)
    body["results"] = _table(summary) if summary else ""
    steps = [r for r in log if r.get("type") == "train" and _num(r, "iteration") is not None]
    if not summary and steps:  # e.g. a run stopped on a non-finite loss in its first epoch
        body["results"] = (f"<p class='note'>No epoch completed: the log holds {len(steps)} iteration record(s), "
                           f"the last at iteration {int(_num(steps[-1], 'iteration'))}"
                           + (" with a non-finite loss" if steps[-1].get("loss") is None else "") + ".</p>")
    results_path = run_dir / "results.json"
    if results_path.exists():
        try:
            res = json.loads(results_path.read_text())
            body["results"] += "<h3>results.json</h3>"
            done = max([int(_num(r, "iteration")) for r in log if _num(r, "iteration") is not None],
                       default=None)
            if isinstance(res.get("iterations"), int) and done is not None and res["iterations"] != done:
                body["results"] += (f"<p class='note'>results.json was computed at iteration {res['iterations']}; "
                                    f"the run's log goes to iteration {done}: evaluate the run again (python -m "
                                    "dinokit.demo) for current numbers.</p>")
            body["results"] += _table({k: v for k, v in res.items() if not isinstance(v, (list, dict))})
        except (OSError, ValueError, AttributeError) as e:  # cut by a crash, not text, not a JSON object
            body["results"] += f"<p class='note'>results.json is unreadable ({type(e).__name__}).</p>"
    elif not body["results"]:
        body["results"] = ("<p class='note'>No log records and no results.json (the demo writes k-NN results "
                           "there).</p>")

    try:
        pics, notes = _curves(log) if log else ([], [])
    except Exception as e:  # a corrupt log (values matplotlib cannot place): the rest of the report still comes
        pics, notes = [], [f"The training curves could not be drawn from log.jsonl ({type(e).__name__}: {e})."]
    body["curves"] = ("".join(f'<figure><img src="{src}" alt="{html.escape(t)}"><figcaption>{html.escape(t)}'
                              f"</figcaption></figure>" for t, src in pics)
                      or "<p class='note'>No log records yet.</p>")
    body["curves"] += "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)

    torch.set_grad_enabled(False)
    try:
        backbone, cfg, why = _load_model(run_dir)
        if backbone is None:
            body["attention"] = body["projection"] = f"<p class='note'>{html.escape(why)}</p>"
        else:
            try:
                images, ds = _test_images(cfg, n_images, data)
            except Exception as e:  # data moved or unreadable: keep the rest of the report
                images, ds = [], None
                body["attention"] = body["projection"] = (f"<p class='note'>test images unavailable: "
                                                          f"{html.escape(str(e))}</p>")
            if ds is not None:
                if n_images == 0:
                    body["attention"] = "<p class='note'>No attention grid (--images 0).</p>"
                elif hasattr(backbone, "get_last_selfattention"):
                    body["attention"] = _attention_section(backbone, cfg, images,
                                                           classes=list(getattr(ds, "classes", None) or []),
                                                           views=_eval_views(cfg, ds))
                else:
                    body["attention"] = "<p class='note'>This backbone is not a ViT: no attention maps.</p>"
                body["projection"] = _projection_section(backbone, cfg, ds, projection_points)
                if why:  # the teacher of an older checkpoint
                    for k in ("attention", "projection"):
                        body[k] = f"<p class='note'>{html.escape(why)}</p>" + body[k]
    finally:
        torch.set_grad_enabled(True)

    cfg_path = run_dir / "config.yaml"
    body["config"] = (f"<pre>{html.escape(cfg_path.read_text())}</pre>" if cfg_path.exists()
                      else "<p class='note'>no config.yaml</p>")
    body["environment"] = _table(_environment())

    titles = {"results": "Results", "curves": "Training curves", "attention": "Self-attention maps",
              "projection": "Feature projection", "config": "Configuration", "environment": "Environment"}
    nav = " · ".join(f'<a href="#{s}">{titles[s]}</a>' for s in _SECTIONS)
    sections = "".join(f'<section id="{s}"><h2>{titles[s]}</h2>{body[s]}</section>' for s in _SECTIONS)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dinokit report: {html.escape(run_dir.name)}</title>
<style>
body{{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1150px;padding:1em 2em;
color:#222}}
h1{{font-size:1.6em;margin-bottom:.2em}} h2{{border-bottom:2px solid #4a7;padding-bottom:.2em;margin-top:1.6em}}
nav{{color:#666}} figure{{display:inline-block;margin:.4em}} figcaption{{text-align:center;color:#555;font-size:.9em}}
table.kv th{{text-align:left;padding-right:1.5em;font-weight:600}} table.kv td,table.kv th{{padding:.15em .4em}}
div.attn{{display:flex;flex-wrap:wrap;gap:2px;margin-bottom:.6em}} div.attn figure{{margin:0}}
div.attn figcaption{{font-size:.75em}} div.attn img{{image-rendering:pixelated;display:block}}
pre{{background:#f5f5f5;padding:.8em;overflow:auto;font-size:.85em}} .note{{color:#a60}}
</style></head><body>
<h1>dinokit run report</h1><p>{html.escape(str(run_dir.resolve()))}</p><nav>{nav}</nav>
{sections}
</body></html>
"""
    try:
        write_text_atomic(out, page)
    except OSError as e:
        raise write_failed(out, e) from None
    return out
