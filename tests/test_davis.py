"""DAVIS label propagation (reference §4.5) and the official J / F definitions, on generated videos."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dinokit.errors import DataError
from dinokit.eval.davis import (
    DAVIS_MEAN,
    DAVIS_STD,
    _dilate_disk,
    davis_palette,
    db_statistics,
    evaluate_davis,
    evaluate_video,
    f_measure,
    frame_size,
    j_measure,
    neighborhood_mask,
    propagate_labels,
    propagate_video,
    read_frame,
    seg2bmap,
    segment_davis,
    write_indexed_png,
)


class ColourPatches(nn.Module):
    """Hand-made 'backbone' with a meaningful feature: each patch token is an RBF code of the patch's mean colour.

    ``shuffle=True`` is the control: the patch tokens of every frame are randomly permuted, so features no longer
    say where anything is."""

    def __init__(self, patch_size: int = 8, shuffle: bool = False, sigma: float = 0.15):
        super().__init__()
        self.patch_size, self.shuffle, self.sigma = patch_size, shuffle, sigma
        g = torch.linspace(0, 1, 4)
        self.register_buffer("centres", torch.cartesian_prod(g, g, g))
        self.gen = torch.Generator().manual_seed(0)

    def get_intermediate_layers(self, x, n=1):
        rgb = x * torch.tensor(DAVIS_STD).view(1, 3, 1, 1) + torch.tensor(DAVIS_MEAN).view(1, 3, 1, 1)
        c = F.avg_pool2d(rgb, self.patch_size).flatten(2).transpose(1, 2)
        f = torch.exp(-((c[..., None, :] - self.centres) ** 2).sum(-1) / (2 * self.sigma ** 2))
        if self.shuffle:
            f = f[:, torch.randperm(f.shape[1], generator=self.gen)]
        return [torch.cat([f.mean(1, keepdim=True), f], 1)]


def make_video(T: int = 8, S: int = 128, seed: int = 0):
    """Red square moving down-right and green disk moving up-left over a blotchy bluish-grey texture."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.25, 0.6, size=(-(-S // 8), -(-S // 8), 3)) * np.array([0.8, 0.9, 1.0])
    bg = np.clip(np.kron(base, np.ones((8, 8, 1)))[:S, :S] + rng.normal(0, 0.04, size=(S, S, 3)), 0, 1)
    yy, xx = np.mgrid[:S, :S]
    frames, masks = [], []
    for t in range(T):
        img, m = bg.copy(), np.zeros((S, S), np.uint8)
        y0, x0 = 16 + 3 * t, 12 + 4 * t
        img[y0:y0 + 24, x0:x0 + 24] = (0.9, 0.15, 0.1)
        m[y0:y0 + 24, x0:x0 + 24] = 1
        disk = (yy - (64 - 2 * t)) ** 2 + (xx - (70 - 3 * t)) ** 2 <= 12 ** 2
        img[disk] = (0.1, 0.85, 0.2)
        m[disk] = 2
        frames.append(Image.fromarray((img * 255).astype(np.uint8)))
        masks.append(m)
    return frames, masks


def write_davis(root, videos=("shapes", "shapes2"), T=6, S=128):
    pal = davis_palette().ravel().tolist()
    for i, v in enumerate(videos):
        frames, masks = make_video(T, S, seed=i)
        (root / "JPEGImages/480p" / v).mkdir(parents=True)
        (root / "Annotations/480p" / v).mkdir(parents=True)
        for t, (f, m) in enumerate(zip(frames, masks)):
            f.save(root / "JPEGImages/480p" / v / f"{t:05d}.jpg", quality=95)
            im = Image.fromarray(m, mode="P")
            im.putpalette(pal)
            im.save(root / "Annotations/480p" / v / f"{t:05d}.png")
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "ImageSets/2017/val.txt").write_text("\n".join(videos) + "\n")
    return root


# ------------------------------------------------------------------------------------------- J and F

def test_j_and_f_hand_computed():
    a = np.zeros((20, 20), bool)
    a[5:10, 5:10] = True
    assert j_measure(a, a) == 1.0 and f_measure(a, a) == 1.0
    far = np.zeros_like(a)
    far[14:18, 14:18] = True
    assert j_measure(a, far) == 0.0 and f_measure(a, far, bound_th=1) == 0.0
    # the same 5x5 square shifted 3 px right: IoU 10/40; with a 1-px (cross) tolerance half of each boundary
    # (the 20-pixel ring of rows 4..9 x cols 4..9, resp. 7..12) lies within reach of the other -> P = R = F = 0.5
    s = np.zeros_like(a)
    s[5:10, 8:13] = True
    assert j_measure(a, s) == pytest.approx(0.25)
    assert f_measure(a, s, bound_th=1) == pytest.approx(0.5)
    empty = np.zeros_like(a)
    assert j_measure(empty, empty) == 1.0 and f_measure(empty, empty) == 1.0
    assert j_measure(a, empty) == 0.0 and f_measure(a, empty) == 0.0
    # void pixels are ignored
    assert j_measure(a, s, void=s & ~a) == pytest.approx(10 / 25)


def test_seg2bmap_and_disk_dilation():
    a = np.zeros((12, 12), bool)
    a[3:7, 4:9] = True
    b = seg2bmap(a)
    ring = np.zeros_like(a)
    ring[2:7, 3:9] = True
    ring[3:6, 4:8] = False  # perimeter of rows 2..6 x cols 3..8
    assert (b == ring).all()
    rng = np.random.default_rng(0)
    img = rng.random((23, 31)) < 0.03
    for r in (1, 2, 3, 5):
        naive = np.zeros_like(img)
        ys, xs = np.nonzero(img)
        for y, x in zip(ys, xs):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    if dx * dx + dy * dy <= r * r and 0 <= y + dy < 23 and 0 <= x + dx < 31:
                        naive[y + dy, x + dx] = True
        assert (naive == _dilate_disk(img, r)).all()
    # default tolerance: ceil(0.008 * diagonal) pixels -> 8 at 480x854
    assert math.ceil(0.008 * math.hypot(480, 854)) == 8


def _naive_f(gt, pred, r):
    """F-measure written directly from the definition (per-pixel disk search), for cross-checking."""
    def near(b, other):
        ys, xs = np.nonzero(b)
        oy, ox = np.nonzero(other)
        return sum(bool(np.any((oy - y) ** 2 + (ox - x) ** 2 <= r * r)) for y, x in zip(ys, xs))

    fb, gb = seg2bmap(pred), seg2bmap(gt)
    p, rc = near(fb, gb) / fb.sum(), near(gb, fb) / gb.sum()
    return 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)


def test_f_measure_matches_definition_on_random_blobs():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:40, :50]
    for _ in range(4):
        gt = (yy - rng.integers(10, 30)) ** 2 + (xx - rng.integers(10, 40)) ** 2 < rng.integers(20, 120)
        pred = (yy - rng.integers(10, 30)) ** 2 / 2 + (xx - rng.integers(10, 40)) ** 2 < rng.integers(20, 120)
        r = math.ceil(0.008 * math.hypot(40, 50))
        assert f_measure(gt, pred) == pytest.approx(_naive_f(gt, pred, r))
        assert f_measure(gt, pred, bound_th=3) == pytest.approx(_naive_f(gt, pred, 3))


def test_db_statistics_matches_official_definition():
    v = np.array([1.0, 0.9, 0.8, 0.4, 0.3, 0.2, 0.6, 0.1])
    M, O, D = db_statistics(v)
    assert M == pytest.approx(v.mean()) and O == pytest.approx(4 / 8)
    ids = (np.round(np.linspace(1, 8, 5) + 1e-10) - 1).astype(int)  # [0, 2, 4, 6, 7]
    assert D == pytest.approx(v[ids[0]:ids[1] + 1].mean() - v[ids[3]:ids[4] + 1].mean())


# -------------------------------------------------------------------------------------- propagation

def test_frame_size_and_preprocessing():
    assert frame_size(480, 854) == (480, 832)
    assert frame_size(854, 480) == (832, 480)
    x, h, w = read_frame(Image.new("RGB", (854, 480), (124, 116, 104)))
    assert (h, w) == (480, 854) and x.shape == (3, 480, 832)
    expect = (torch.tensor([124, 116, 104]) / 255 - torch.tensor(DAVIS_MEAN)) / torch.tensor(DAVIS_STD)
    assert torch.allclose(x[:, 10, 10], expect, atol=1e-6)
    assert DAVIS_STD[0] == 0.228  # the reference's quirk is the default


def test_palette_is_pascal_davis():
    pal = davis_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert pal[255].tolist() == [224, 224, 192]


def _reference_propagation(feat_tar, ctx_feats, ctx_segs, topk, h, w, radius):
    """Dense, step-by-step transcription of the reference algorithm (§4.5) for comparison."""
    n = ctx_feats.shape[0]
    tar = F.normalize(feat_tar, dim=1).unsqueeze(0).repeat(n, 1, 1)
    src = F.normalize(ctx_feats, dim=2).transpose(1, 2)
    aff = torch.exp(torch.bmm(tar, src) / 0.1)  # n x tar x src
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            mask[i, j, max(0, i - radius):i + radius + 1, max(0, j - radius):j + radius + 1] = 1
    aff = aff * mask.reshape(h * w, h * w)
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    kth = torch.topk(aff, dim=0, k=topk).values.min(dim=0).values
    aff[aff < kth] = 0
    aff = aff / aff.sum(0, keepdim=True)
    C = ctx_segs.shape[1]
    segs = ctx_segs.reshape(n, C, -1).transpose(2, 1).reshape(-1, C).T
    return segs @ aff


def test_chunked_propagation_equals_dense_reference():
    g = torch.Generator().manual_seed(1)
    h, w, d, n, C = 5, 7, 6, 3, 3
    feat = torch.randn(h * w, d, generator=g)
    ctx = torch.randn(n, h * w, d, generator=g)
    segs = torch.softmax(torch.randn(n, C, h * w, generator=g), dim=1)
    ref = _reference_propagation(feat, ctx, segs, 5, h, w, 2)
    mask = neighborhood_mask(h, w, 2)
    for chunk in (1 << 25, 7 * n * h * w, n * h * w):  # one block, several, one column at a time
        out = propagate_labels(feat, ctx, segs, topk=5, mask=mask, max_elements=chunk)
        assert torch.allclose(out, ref, atol=1e-6)


def test_propagation_tracks_moving_shapes_and_shuffled_control_fails():
    frames, masks = make_video()
    gt = np.stack(masks[1:-1])
    out = propagate_video(ColourPatches(), frames, masks[0], short_side=128)
    assert len(out) == len(frames) and out[0].shape == masks[0].shape and (out[0] == masks[0]).all()
    J, Fm = evaluate_video(gt, np.stack(out[1:-1]))
    jf = (J.mean() + Fm.mean()) / 2
    assert jf > 0.7 and J.min() > 0.5  # measured: 0.81
    out = propagate_video(ColourPatches(shuffle=True), frames, masks[0], short_side=128)
    J, Fm = evaluate_video(gt, np.stack(out[1:-1]))
    assert (J.mean() + Fm.mean()) / 2 < 0.2  # measured: 0.01
    # context options: first frame only (n_last_frames=0), whole-frame neighbourhood, top-1
    out = propagate_video(ColourPatches(), frames, masks[0], short_side=128, n_last_frames=0,
                          size_mask_neighborhood=0, topk=1)
    assert len(out) == len(frames)


# -------------------------------------------------------------------------------- DAVIS layout + scores

def test_segment_and_evaluate_davis_layout(tmp_path):
    root = write_davis(tmp_path / "DAVIS")
    out = tmp_path / "out"
    videos = segment_davis(ColourPatches(), root, out, short_side=128)
    assert videos == ["shapes", "shapes2"]
    for v in videos:
        pngs = sorted((out / v).glob("*.png"))
        assert [p.name for p in pngs] == [f"{t:05d}.png" for t in range(6)]
        im = Image.open(pngs[2])
        assert im.mode == "P" and im.size == (128, 128)
        assert im.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
        first = np.array(Image.open(pngs[0]))
        assert (first == np.array(Image.open(root / "Annotations/480p" / v / "00000.png"))).all()
    res = evaluate_davis(out, root)
    assert res["n_objects"] == 4 and set(res["per_video"]) == {"shapes", "shapes2"}
    assert res["J&F-Mean"] == pytest.approx((res["J-Mean"] + res["F-Mean"]) / 2)
    assert res["J&F-Mean"] > 0.7
    assert set(res["per_object"]) == {"shapes_1", "shapes_2", "shapes2_1", "shapes2_2"}
    # the ground truth itself scores 1; a label the first frame does not have is an error
    perfect = tmp_path / "perfect"
    for v in videos:
        (perfect / v).mkdir(parents=True)
        for p in sorted((root / "Annotations/480p" / v).glob("*.png")):
            (perfect / v / p.name).write_bytes(p.read_bytes())
    res = evaluate_davis(perfect, root, videos=["shapes"])
    assert res["J&F-Mean"] == 1.0 and res["J-Recall"] == 1.0 and res["J-Decay"] == 0.0
    bad = np.array(Image.open(perfect / "shapes/00002.png"))
    bad[0, 0] = 3
    write_indexed_png(perfect / "shapes/00002.png", bad)
    with pytest.raises(DataError, match="only 2 objects"):
        evaluate_davis(perfect, root, videos=["shapes"])
    (perfect / "shapes/00003.png").unlink()
    with pytest.raises(DataError, match="missing"):
        evaluate_davis(perfect, root, videos=["shapes"])


def test_davis_layout_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        segment_davis(ColourPatches(), tmp_path / "nope", tmp_path / "out")
    root = write_davis(tmp_path / "DAVIS", videos=("shapes",), T=3)
    with pytest.raises(DataError, match="not found"):
        segment_davis(ColourPatches(), root, tmp_path / "out", videos=["missing"])


# ------------------------------------------------------------------------------------- real ViT and CLI

def test_real_vit_propagates_any_frame_size():
    from dinokit import build_backbone

    vit = build_backbone("vit_custom", patch_size=8, embed_dim=32, depth=1, num_heads=2).eval()
    frames, masks = make_video(T=3, S=100)  # 100 px: not a multiple of the patch, cropped like the reference
    out = propagate_video(vit, frames, masks[0], short_side=100, multiple=8)
    assert [o.shape for o in out] == [(100, 100)] * 3 and all(o.max() <= 2 for o in out)


def _fake_weights(monkeypatch, model):
    import sys
    import types

    mod = types.ModuleType("dinokit.weights")
    mod.load_backbone = lambda path, arch=None, patch_size=None, checkpoint_key="teacher": model
    monkeypatch.setitem(sys.modules, "dinokit.weights", mod)


def test_cli_davis(tmp_path, monkeypatch, capsys):
    import json

    from dinokit.cli import main

    root = write_davis(tmp_path / "DAVIS", videos=("shapes",))
    (tmp_path / "w.pth").write_bytes(b"")
    _fake_weights(monkeypatch, ColourPatches())
    out = tmp_path / "out"
    rc = main(["davis", "--weights", str(tmp_path / "w.pth"), "--davis-root", str(root), "--out", str(out),
               "--short-side", "128", "--no-progress", "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0 and "J&F" in text and "shapes" in text
    res = json.loads((out / "davis_results.json").read_text())
    assert res["J&F-Mean"] > 0.7 and res["settings"]["std"][0] == 0.228
    assert (out / "global_results-val.csv").read_text().startswith("J&F-Mean,J-Mean,J-Recall")
    assert (out / "per-sequence_results-val.csv").read_text().splitlines()[1].startswith("shapes_1,")
    rc = main(["davis", "--eval-only", "--davis-root", str(root), "--out", str(out), "--no-progress",
               "--output", str(tmp_path / "again.json")])
    assert rc == 0 and json.loads((tmp_path / "again.json").read_text())["J&F-Mean"] == res["J&F-Mean"]
    rc = main(["davis", "--weights", "w.pth", "--davis-root", str(tmp_path / "nope"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err


def _cli(argv, capsys) -> tuple[int, str]:
    """``dinokit davis ...`` in-process: exit code and stderr (argparse errors included)."""
    from dinokit.cli import main

    capsys.readouterr()
    try:
        rc = main(["davis", *argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def test_cli_davis_refuses_bad_options_before_any_work(tmp_path, monkeypatch, capsys):
    import sys
    import types

    root = write_davis(tmp_path / "DAVIS", videos=("shapes",), T=3)
    (tmp_path / "w.pth").write_bytes(b"")
    mod = types.ModuleType("dinokit.weights")
    mod.load_backbone = lambda *a, **k: pytest.fail("the model was loaded before the options were checked")
    monkeypatch.setitem(sys.modules, "dinokit.weights", mod)
    (tmp_path / "a_file").write_text("x")
    base = ["--weights", str(tmp_path / "w.pth"), "--davis-root", str(root), "--no-progress"]
    out = ["--out", str(tmp_path / "out")]
    cases = [
        (["--out", str(tmp_path / "a_file")], "is a file, not a folder"),
        (["--out", str(tmp_path / "a_file" / "sub")], "is not a folder"),
        ([*out, "--output", str(tmp_path)], "is a folder"),
        ([*out, "--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
        ([*out, "--temperature", "-0.1"], "--temperature must be a finite number > 0"),
        ([*out, "--temperature", "nan"], "--temperature must be a finite number > 0"),
        ([*out, "--bound-th", "-1"], "--bound-th must be a finite number >= 0"),
        ([*out, "--bound-th", "nan"], "--bound-th must be a finite number >= 0"),
        ([*out, "--topk", "0"], "--topk >= 1"),
        ([*out, "--temperature", "warm"], "invalid float value"),
    ]
    for extra, message in cases:
        rc, err = _cli([*base, *extra], capsys)
        assert rc == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "out").exists()
    rc, err = _cli(["--eval-only", "--davis-root", str(root), "--out", str(tmp_path / "a_file")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "is a file, not a folder" in err


def test_propagation_refuses_a_non_positive_temperature():
    from dinokit.errors import ConfigError

    frames, masks = make_video(T=2, S=64)
    for t in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="temperature > 0"):
            propagate_video(ColourPatches(), frames, masks[0], short_side=64, temperature=t)


def _resave(path, mode):
    Image.open(path).convert(mode).save(path)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_rgb_annotations_read_through_the_palette_as_indexed_ones(tmp_path, mode):
    indexed = write_davis(tmp_path / "indexed", videos=("shapes",), T=4, S=64)
    rgb = write_davis(tmp_path / "rgb", videos=("shapes",), T=4, S=64)
    for p in (rgb / "Annotations/480p/shapes").glob("*.png"):
        _resave(p, mode)
    assert Image.open(rgb / "Annotations/480p/shapes/00000.png").mode == mode
    segment_davis(ColourPatches(), indexed, tmp_path / "out_indexed", short_side=64)
    segment_davis(ColourPatches(), rgb, tmp_path / "out_rgb", short_side=64)
    for t in range(4):
        a = np.array(Image.open(tmp_path / f"out_indexed/shapes/{t:05d}.png"))
        b = np.array(Image.open(tmp_path / f"out_rgb/shapes/{t:05d}.png"))
        assert a.shape == (64, 64) and set(np.unique(a)) == {0, 1, 2} and (a == b).all()
    # the scores too: the RGB ground truth is read as the same labels
    assert evaluate_davis(tmp_path / "out_rgb", rgb) == evaluate_davis(tmp_path / "out_indexed", indexed)


def test_annotations_that_are_not_label_maps_are_refused(tmp_path):
    root = write_davis(tmp_path / "DAVIS", videos=("shapes",), T=3, S=64)
    first = root / "Annotations/480p/shapes/00000.png"
    labels = np.array(Image.open(first))
    rgb = davis_palette()[labels]
    rgb[labels == 1] = (255, 255, 255)  # white: not a DAVIS palette colour
    Image.fromarray(rgb).save(first)
    with pytest.raises(DataError, match=r"00000.png is an RGB PNG with colour \(255, 255, 255\), not a DAVIS palette"):
        segment_davis(ColourPatches(), root, tmp_path / "out", short_side=64)
    Image.fromarray(np.stack([labels, np.full_like(labels, 255)], -1), mode="LA").save(first)
    with pytest.raises(DataError, match="00000.png is a mode-LA image; it must be an indexed"):
        segment_davis(ColourPatches(), root, tmp_path / "out", short_side=64)
    # a greyscale label map is read as its values, as an indexed one
    Image.fromarray(labels, mode="L").save(first)
    out = propagate_video(ColourPatches(), sorted((root / "JPEGImages/480p/shapes").glob("*.jpg")), first,
                          short_side=64)
    assert (out[0] == labels).all() and set(np.unique(out[1])) == {0, 1, 2}


def test_object_ids_with_gaps_are_refused_and_greyscale_converted_palettes_named(tmp_path):
    """DAVIS counts max-id objects; ids 38 and 75 (a palette PNG converted to greyscale: brightness values) would
    have scored 73 absent objects as perfect."""
    root = write_davis(tmp_path / "DAVIS", videos=("shapes",), T=3, S=64)
    frames = sorted((root / "JPEGImages/480p/shapes").glob("*.jpg"))
    first = root / "Annotations/480p/shapes/00000.png"
    perfect = tmp_path / "perfect/shapes"
    perfect.mkdir(parents=True)
    for p in sorted(first.parent.glob("*.png")):
        (perfect / p.name).write_bytes(p.read_bytes())
    labels = np.array(Image.open(first))
    for p in sorted(first.parent.glob("*.png")):
        _resave(p, "L")
    assert set(np.unique(np.array(Image.open(first)))) == {0, 38, 75}
    msg = (r"00000.png has object ids 38, 75; DAVIS object ids run 1..K without gaps in the first frame; these are "
           r"the brightness values of DAVIS palette colours: was an indexed PNG converted to greyscale\?")
    with pytest.raises(DataError, match=msg):
        propagate_video(ColourPatches(), frames, first, short_side=64)
    with pytest.raises(DataError, match=msg):
        evaluate_davis(tmp_path / "perfect", root)
    gap = np.where(labels == 2, 3, labels).astype(np.uint8)
    with pytest.raises(DataError, match=r"the first-frame annotation has object ids 1, 3; DAVIS object ids run "
                                        r"1..K without gaps in the first frame$"):
        propagate_video(ColourPatches(), frames, gap, short_side=64)
    void = np.where(labels == 2, 255, labels).astype(np.uint8)  # void pixels are not an object
    assert len(propagate_video(ColourPatches(), frames, void, short_side=64)) == 3


def test_annotation_size_must_match_its_frames(tmp_path, monkeypatch, capsys):
    root = write_davis(tmp_path / "DAVIS", videos=("shapes",), T=3, S=64)
    first = root / "Annotations/480p/shapes/00000.png"
    im = Image.open(first)
    im.crop((0, 0, 64, 40)).save(first)  # 40x64 (HxW) annotation, 64x64 frames
    with pytest.raises(DataError, match=r"annotation .*00000.png is 40x64 px but frame .*00000.jpg is 64x64 \(HxW\)"):
        segment_davis(ColourPatches(), root, tmp_path / "out", short_side=64)
    (tmp_path / "w.pth").write_bytes(b"")
    _fake_weights(monkeypatch, ColourPatches())
    rc, err = _cli(["--weights", str(tmp_path / "w.pth"), "--davis-root", str(root), "--out", str(tmp_path / "o"),
                    "--short-side", "64", "--no-progress", "--device", "cpu"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "is 40x64 px but frame" in err
    # scoring: the annotations of a video must share a size
    im.save(first)
    segment_davis(ColourPatches(), root, tmp_path / "out", short_side=64)
    second = root / "Annotations/480p/shapes/00001.png"
    Image.open(second).crop((0, 0, 64, 48)).save(second)
    with pytest.raises(DataError, match=r"00001.png is 48x64 px, 00000.png 64x64 \(HxW\): all annotations"):
        evaluate_davis(tmp_path / "out", root)


def test_cli_davis_refuses_an_out_that_is_the_ground_truth(tmp_path, monkeypatch, capsys):
    """``--out DAVIS/Annotations/480p`` wrote the segmentations over the annotations, then scored them against
    themselves: J&F 100 and the ground truth lost. Refused (also with --eval-only: a meaningless 100)."""
    import hashlib
    import sys
    import types

    root = write_davis(tmp_path / "DAVIS", videos=("shapes",), T=3)
    (tmp_path / "w.pth").write_bytes(b"")
    mod = types.ModuleType("dinokit.weights")
    mod.load_backbone = lambda *a, **k: pytest.fail("the model was loaded before the options were checked")
    monkeypatch.setitem(sys.modules, "dinokit.weights", mod)
    ann = root / "Annotations" / "480p"

    def digest():
        return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted((ann / "shapes").iterdir())}

    before = digest()
    base = ["--weights", str(tmp_path / "w.pth"), "--davis-root", str(root), "--no-progress"]
    (tmp_path / "link").symlink_to(ann)
    for out, sub in ((ann, "Annotations/480p"), (root / "JPEGImages" / "480p", "JPEGImages/480p"),
                     (tmp_path / "link", "Annotations/480p"), (ann / ".." / "480p", "Annotations/480p")):
        for extra in ([], ["--eval-only"]):
            rc, err = _cli([*base, "--out", str(out), *extra], capsys)
            assert rc == 2 and err.count("\n") == 1 and f"is the data set's {sub} folder" in err, err
    assert digest() == before
    rc, err = _cli([*base, "--out", str(root / "results"), "--eval-only"], capsys)  # inside the root: fine
    assert "data set's" not in err
