"""Retrieval (reference §4.7): revisitop mAP with junk, safe ground-truth loading, generated datasets."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance
from torch import nn

from dinokit.errors import DataError
from dinokit.eval.retrieval import (
    compute_ap,
    compute_map,
    convert_ground_truth,
    evaluate_place_recognition,
    evaluate_revisited,
    extract_descriptors,
    load_ground_truth,
    recall_at_k,
    revisited_metrics,
    thumbnail_loader,
)
from dinokit.eval.whitening import gem


class Thumb(nn.Module):
    """Hand-made meaningful extractor: CLS = contrast-normalised 6x6 grey thumbnail; patch tokens = rectified
    local brightness (positive, so GeM sees something)."""

    patch_size = 8

    def forward(self, x):
        return self.get_intermediate_layers(x)[0][:, 0]

    def get_intermediate_layers(self, x, n=1):
        g = x.mean(1, keepdim=True)
        t = F.adaptive_avg_pool2d(g, 6).flatten(1)
        t = F.normalize(t - t.mean(1, keepdim=True), dim=1)
        p = F.avg_pool2d(g, self.patch_size).flatten(2).transpose(1, 2)
        pt = torch.relu(p - p.mean(1, keepdim=True)).expand(-1, -1, t.shape[1])
        return [torch.cat([t[:, None], pt], 1)]


class RandomFeatures(nn.Module):
    patch_size = 8

    def forward(self, x):
        return torch.randn(x.shape[0], 36)

    def get_intermediate_layers(self, x, n=1):
        return [torch.randn(x.shape[0], 1 + (x.shape[-2] // 8) * (x.shape[-1] // 8), 36)]


def random_image(rng, size=(96, 72)):
    w, h = size
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, w)[None, :, None]
    img = Image.fromarray((a * (1 - t) + b * t).repeat(h, 0).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(5):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = [x0, y0, x0 + int(rng.integers(12, 40)), y0 + int(rng.integers(12, 40))]
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=col)
    return img


def crop_copy(im, f=0.08):
    w, h = im.size
    return im.crop((int(w * f), int(h * f), int(w * (1 - f)), int(h * (1 - f))))


def make_revisited(root, n=4, seed=0):
    """db: n bases (easy), n brighter crops (hard), n others (junk of query i); queries: cropped bases."""
    rng = np.random.default_rng(seed)
    (root / "jpg").mkdir(parents=True)
    bases = [random_image(rng) for _ in range(n)]
    imlist, qimlist = [], []
    for i, b in enumerate(bases):
        b.save(root / "jpg" / f"easy{i}.jpg", quality=95)
        ImageEnhance.Brightness(crop_copy(b, 0.05)).enhance(1.2).save(root / "jpg" / f"hard{i}.jpg", quality=90)
        random_image(rng).save(root / "jpg" / f"junk{i}.jpg", quality=95)
        crop_copy(b).resize((80, 60)).save(root / "jpg" / f"query{i}.jpg", quality=90)
        qimlist.append(f"query{i}")
    imlist = [f"easy{i}" for i in range(n)] + [f"hard{i}" for i in range(n)] + [f"junk{i}" for i in range(n)]
    gnd = [{"easy": [i], "hard": [n + i], "junk": [2 * n + i], "bbx": [1.0, 1.0, 79.0, 59.0]} for i in range(n)]
    data = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    (root / "gnd_roxford5k.json").write_text(json.dumps(data))
    return data


# ------------------------------------------------------------------------------------------------ metrics

def test_compute_map_hand_computed_with_junk_and_empty_queries():
    # query 0: ranking 3,0,5,1,2,4; positives {0,1}, junk {5} -> positions 1,3 -> after junk removal 1,2
    # AP = 1/2·((0/1 + 1/2)/2) + 1/2·((1/2 + 2/3)/2) = 5/12; precision@1 = 0, @5 = @10 = 2/3 (denominator capped
    # at the last positive's rank, 3, as revisitop does)
    # query 1: no positive -> NaN, left out of the means; query 2: positive ranked first -> AP 1
    ranks = np.array([[3, 0, 5, 1, 2, 4], [0, 1, 2, 3, 4, 5], [4, 0, 1, 2, 3, 5]]).T
    gnd = [{"ok": [0, 1], "junk": [5]}, {"ok": [], "junk": [1]}, {"ok": [4]}]
    m, aps, pr, prs = compute_map(ranks, gnd, (1, 5, 10))
    assert aps[0] == pytest.approx(5 / 12) and np.isnan(aps[1]) and aps[2] == pytest.approx(1.0)
    assert m == pytest.approx((5 / 12 + 1) / 2)
    assert prs[0].tolist() == pytest.approx([0, 2 / 3, 2 / 3]) and prs[2].tolist() == [1, 1, 1]
    assert pr.tolist() == pytest.approx([0.5, 5 / 6, 5 / 6])
    assert compute_ap([0, 1], 2) == 1.0 and compute_ap([], 3) == 0.0
    # a positive outside the ranking counts as missed (AP over all positives)
    assert compute_ap([0], 2) == pytest.approx(0.5)


def test_revisited_protocols_easy_medium_hard():
    # db: 0 easy, 1 hard, 2 junk, 3 negative; ranking 1, 3, 0, 2
    ranks = np.array([[1, 3, 0, 2]]).T
    res = revisited_metrics(ranks, [{"easy": [0], "hard": [1], "junk": [2]}])
    # easy: positives {0}, junk {2, 1} -> ranking 3, 0 -> position 1 -> AP (0 + 1/2)/2
    assert res["mAP"]["easy"] == pytest.approx(0.25)
    # medium: positives {0, 1} at positions 0 and 2 -> AP 1/2·(1+1)/2 + 1/2·(1/2 + 2/3)/2
    assert res["mAP"]["medium"] == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    # hard: positives {1}, junk {2, 0} -> first -> 1
    assert res["mAP"]["hard"] == 1.0 and res["mP@k"]["hard"]["1"] == 1.0


def test_recall_at_k():
    ranks = np.array([[2, 0, 1, 3], [3, 2, 1, 0], [0, 1, 2, 3]]).T
    r = recall_at_k(ranks, [[0], [0], []], ks=(1, 2, 4))
    assert r == {"1": 0.0, "2": 0.5, "4": 1.0}


def test_gem_matches_reference_formula():
    x = torch.randn(2, 12, 5)
    ref = F.avg_pool2d(x.reshape(2, 3, 4, 5).permute(0, 3, 1, 2).clamp(min=1e-6).pow(4), (3, 4)).pow(0.25)
    assert torch.allclose(gem(x), ref.reshape(2, 5), atol=1e-6)


# ----------------------------------------------------------------------------------- ground-truth files

def test_ground_truth_json_and_pickle_agree(tmp_path):
    data = make_revisited(tmp_path / "ds")
    js = load_ground_truth(tmp_path / "ds/gnd_roxford5k.json")
    as_numpy = dict(data, gnd=[{k: (np.array(v, dtype=np.int64) if k != "bbx" else v) for k, v in g.items()}
                               for g in data["gnd"]])
    for proto in (2, 4, 5):
        p = tmp_path / f"gnd{proto}.pkl"
        p.write_bytes(pickle.dumps(as_numpy, protocol=proto))
        assert load_ground_truth(p) == js
    out = convert_ground_truth(tmp_path / "gnd2.pkl", tmp_path / "gnd.json")
    assert json.loads(out.read_text()) == js


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


@pytest.mark.parametrize("evil", [_Evil, _EvilEval])
def test_malicious_pickle_is_refused_without_side_effect(tmp_path, evil):
    marker = tmp_path / "pwned"
    p = tmp_path / "gnd_roxford5k.pkl"
    p.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "x": evil(marker)}, protocol=2))
    with pytest.raises(DataError, match="refusing"):
        load_ground_truth(p)
    assert not marker.exists()


def test_ground_truth_validation(tmp_path):
    p = tmp_path / "g.json"
    p.write_text(json.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]}))
    with pytest.raises(DataError, match="database indices"):
        load_ground_truth(p)
    with pytest.raises(DataError, match="does not exist"):
        load_ground_truth(tmp_path / "missing.pkl")


# ----------------------------------------------------------------------------------- generated datasets

def test_revisited_generated_dataset_perfect_with_meaningful_features(tmp_path):
    make_revisited(tmp_path / "ds")
    res = evaluate_revisited(Thumb(), tmp_path / "ds", "roxford5k", imsize=64)
    assert res["mAP"] == {"easy": 1.0, "medium": 1.0, "hard": 1.0}
    assert res["mP@k"]["medium"]["1"] == 1.0 and res["n_queries"] == 4 and res["n_database"] == 12
    for kw in (dict(multiscale=True), dict(descriptor="cls+gem"), dict(query_crop=True)):
        assert evaluate_revisited(Thumb(), tmp_path / "ds", "roxford5k", imsize=64, **kw)["mAP"]["medium"] == 1.0
    torch.manual_seed(0)
    rnd = evaluate_revisited(RandomFeatures(), tmp_path / "ds", "roxford5k", imsize=64)
    assert rnd["mAP"]["medium"] < 0.6
    with pytest.raises(DataError, match="gnd_rparis6k"):
        evaluate_revisited(Thumb(), tmp_path / "ds", "rparis6k")


def test_multiscale_and_thumbnail_preprocessing(tmp_path):
    Image.new("RGB", (100, 50), (200, 10, 10)).save(tmp_path / "a.png")
    x = thumbnail_loader(64)(tmp_path / "a.png")
    assert x.shape == (3, 32, 64)
    feats = extract_descriptors(Thumb(), [tmp_path / "a.png"], thumbnail_loader(64), multiscale=True)
    assert feats.shape == (1, 36) and torch.allclose(feats.norm(dim=1), torch.ones(1))


def make_places(root, n=5, seed=0, csv_gt=False):
    rng = np.random.default_rng(seed)
    (root / "queries").mkdir(parents=True)
    (root / "database" / "sub").mkdir(parents=True)
    positives = {}
    for i in range(n):
        im = random_image(rng)
        im.save(root / "database" / "sub" / f"place{i}.jpg", quality=95)
        random_image(rng).save(root / "database" / f"other{i}.jpg", quality=95)
        crop_copy(im, 0.06).rotate(2).save(root / "queries" / f"q{i}.jpg", quality=90)
        positives[f"q{i}.jpg"] = [f"sub/place{i}.jpg"]
    if csv_gt:
        rows = ["query,positive"] + [f"{q},{d[0]}" for q, d in positives.items()]
        (root / "ground_truth.csv").write_text("\n".join(rows) + "\n")
    else:
        (root / "positives.json").write_text(json.dumps(positives))


@pytest.mark.parametrize("csv_gt", [False, True])
def test_place_recognition_recall(tmp_path, csv_gt):
    make_places(tmp_path / "p", csv_gt=csv_gt)
    res = evaluate_place_recognition(Thumb(), tmp_path / "p", imsize=64)
    assert res["recall@k"] == {"1": 1.0, "5": 1.0, "10": 1.0} and res["mAP"] == 1.0
    torch.manual_seed(0)
    assert evaluate_place_recognition(RandomFeatures(), tmp_path / "p", imsize=64)["recall@k"]["1"] < 0.6


def test_a_positive_named_twice_counts_once(tmp_path):
    """A repeated ground-truth row (or a name listed twice) halved that query's AP: mAP 83.33 for a perfect
    ranking."""
    from dinokit.eval.retrieval import load_place_dataset

    make_places(tmp_path / "p", csv_gt=True)
    gt = tmp_path / "p" / "ground_truth.csv"
    gt.write_text(gt.read_text() + "q0.jpg,sub/place0.jpg\n")
    assert [len(p) for p in load_place_dataset(tmp_path / "p")[2]] == [1] * 5
    assert evaluate_place_recognition(Thumb(), tmp_path / "p", imsize=64)["mAP"] == 1.0


def test_place_recognition_errors(tmp_path):
    make_places(tmp_path / "p")
    (tmp_path / "p/positives.json").write_text(json.dumps({"q0.jpg": ["nope.jpg"]}))
    with pytest.raises(DataError, match="nope.jpg"):
        evaluate_place_recognition(Thumb(), tmp_path / "p")
    (tmp_path / "p/positives.json").unlink()
    with pytest.raises(DataError, match="positives.json"):
        evaluate_place_recognition(Thumb(), tmp_path / "p")
    with pytest.raises(DataError, match="does not exist"):
        evaluate_place_recognition(Thumb(), tmp_path / "missing")


# ------------------------------------------------------------------------------------- real ViT and CLI

def test_real_vit_descriptors_any_size(tmp_path):
    from dinokit import build_backbone

    make_revisited(tmp_path / "ds")
    vit = build_backbone("vit_custom", patch_size=8, embed_dim=32, depth=1, num_heads=2).eval()
    for kw in (dict(), dict(multiscale=True, descriptor="cls+gem"), dict(descriptor="gem")):
        res = evaluate_revisited(vit, tmp_path / "ds", "roxford5k", imsize=60, **kw)
        assert 0.0 <= res["mAP"]["medium"] <= 1.0


def _fake_weights(monkeypatch, model):
    import sys
    import types

    mod = types.ModuleType("dinokit.weights")
    mod.load_backbone = lambda path, arch=None, patch_size=None, checkpoint_key="teacher": model
    monkeypatch.setitem(sys.modules, "dinokit.weights", mod)


def test_cli_retrieval(tmp_path, monkeypatch, capsys):
    from dinokit.cli import main

    make_revisited(tmp_path / "ds")
    make_places(tmp_path / "p")
    (tmp_path / "p/whitening").mkdir()
    for i in range(4):
        random_image(np.random.default_rng(i)).save(tmp_path / f"p/whitening/{i}.png")
    (tmp_path / "w.pth").write_bytes(b"")
    _fake_weights(monkeypatch, Thumb())
    common = ["--weights", str(tmp_path / "w.pth"), "--imsize", "64", "--no-progress", "--num-workers", "0"]
    rc = main(["retrieval", *common, "--dataset", "roxford5k", "--root", str(tmp_path / "ds"),
               "--output", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    assert rc == 0 and "Medium" in text and "Hard" in text and "100.00" in text
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["mAP"]["hard"] == 1.0 and res["mP@k"]["medium"]["5"] == 1.0
    rc = main(["retrieval", *common, "--dataset", "folder", "--root", str(tmp_path / "p"), "--whiten",
               "--whiten-mode", "centered", "--output", str(tmp_path / "p.json")])
    assert rc == 0 and "Recall@1" in capsys.readouterr().out
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["whitening"]["mode"] == "centered" and set(res["recall@k"]) == {"1", "5", "10"}
    rc = main(["retrieval", *common, "--dataset", "rparis6k", "--root", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err
    rc = main(["retrieval", *common, "--dataset", "folder", "--root", str(tmp_path / "p"), "--whiten",
               str(tmp_path / "nowhere")])
    assert rc == 2 and "whitening folder" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_one_line_data_error(tmp_path, workers):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError) as e:
        extract_descriptors(Thumb(), [tmp_path / "a.jpg", tmp_path / "b.jpg"], thumbnail_loader(32),
                            num_workers=workers)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"cannot read image {tmp_path / 'b.jpg'}")
    assert str(e.value).endswith("fix or replace the file, or remove it (and its ground-truth entries): retrieval and "
                                 "copy detection cannot leave a listed image out")


def test_unreadable_database_image_stops_the_cli_in_one_line_naming_it(tmp_path, monkeypatch, capsys):
    from dinokit.cli import main

    make_places(tmp_path / "p", n=3)
    bad = tmp_path / "p/database/broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (tmp_path / "w.pth").write_bytes(b"")
    _fake_weights(monkeypatch, Thumb())
    for workers in ("0", "1"):
        rc = main(["retrieval", "--weights", str(tmp_path / "w.pth"), "--imsize", "64", "--no-progress",
                   "--num-workers", workers, "--dataset", "folder", "--root", str(tmp_path / "p"),
                   "--output", str(tmp_path / "r.json")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and f"cannot read image {bad}" in err, err
        assert "fix or replace the file, or remove it" in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_images_too_small_for_one_patch_name_the_file_and_what_to_change(tmp_path, monkeypatch, capsys):
    from dinokit.cli import main
    from dinokit.errors import ConfigError

    make_places(tmp_path / "p", n=3)
    tiny = tmp_path / "p/database/tiny.png"
    Image.new("RGB", (4, 3), (9, 9, 9)).save(tiny)
    with pytest.raises(ConfigError) as e:  # a thumbnail never enlarges: --imsize cannot help this one
        evaluate_place_recognition(Thumb(), tmp_path / "p", imsize=64)
    assert str(e.value) == (f"{tiny}: the image is 3x4 px (HxW), smaller than one 8-pixel patch of the model; "
                            "enlarge, replace or remove this file")
    (tmp_path / "w.pth").write_bytes(b"")
    _fake_weights(monkeypatch, Thumb())
    rc = main(["retrieval", "--weights", str(tmp_path / "w.pth"), "--imsize", "64", "--no-progress",
               "--num-workers", "0", "--dataset", "folder", "--root", str(tmp_path / "p"),
               "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(tiny) in err and "Traceback" not in err
    tiny.unlink()

    wide = tmp_path / "p/database/wide.png"
    Image.new("RGB", (300, 20), (9, 9, 9)).save(wide)  # thumbnail at 64: 64x4
    with pytest.raises(ConfigError) as e:
        evaluate_place_recognition(Thumb(), tmp_path / "p", imsize=64)
    assert str(e.value) == (f"{wide}: the image is 4x64 px (HxW) at --imsize 64, smaller than one 8-pixel patch of "
                            "the model; use a larger --imsize, or enlarge, replace or remove this file")
    wide.unlink()

    Image.new("RGB", (100, 18), (9, 9, 9)).save(wide)  # 12x64 at 64: holds a patch, but not at scale 1/2
    evaluate_place_recognition(Thumb(), tmp_path / "p", imsize=64)
    with pytest.raises(ConfigError) as e:
        evaluate_place_recognition(Thumb(), tmp_path / "p", imsize=64, multiscale=True)
    assert str(e.value) == (f"{wide}: the image is 12x64 px (HxW) at --imsize 64 (6x32 px at scale 0.5 of "
                            "--multiscale), smaller than one 8-pixel patch of the model; use a larger --imsize or "
                            "leave out --multiscale, or enlarge, replace or remove this file")


def test_imsize_below_one_patch_is_refused_before_any_image_is_described(tmp_path):
    from dinokit.errors import ConfigError

    make_places(tmp_path / "p", n=3)
    make_revisited(tmp_path / "ds", n=2)
    for imsize, multiscale, need in ((4, False, 8), (7, False, 8), (12, True, 16), (15, True, 16)):
        model = CountingThumb()
        with pytest.raises(ConfigError, match=f"--imsize {imsize} gives images of at most .* smaller than one "
                                              f"8-pixel patch of the model; use --imsize {need} or more"):
            evaluate_place_recognition(model, tmp_path / "p", imsize=imsize, multiscale=multiscale)
        with pytest.raises(ConfigError, match=f"use --imsize {need} or more"):
            evaluate_revisited(model, tmp_path / "ds", imsize=imsize, multiscale=multiscale)
        assert model.seen == 0
    evaluate_place_recognition(Thumb(), tmp_path / "p", imsize=16)  # 96x72 images: 16x12 thumbnails
    evaluate_place_recognition(Thumb(), tmp_path / "p", imsize=32, multiscale=True)


def test_query_box_too_small_for_one_patch_is_named(tmp_path):
    from dinokit.errors import ConfigError

    data = make_revisited(tmp_path / "ds", n=2)
    data["gnd"][1]["bbx"] = [1.0, 1.0, 4.0, 4.0]
    (tmp_path / "ds/gnd_roxford5k.json").write_text(json.dumps(data))
    evaluate_revisited(Thumb(), tmp_path / "ds", imsize=64)  # the boxes are not used without query_crop
    with pytest.raises(ConfigError) as e:
        evaluate_revisited(Thumb(), tmp_path / "ds", imsize=64, query_crop=True)
    assert str(e.value).startswith(f"{tmp_path / 'ds/jpg/query1.jpg'}: the image is 2x2 px (HxW) at --imsize 64 "
                                   "after the crop to its query box, smaller than one 8-pixel patch")


def test_cli_with_real_weights_file(tmp_path, capsys):
    """End to end through dinokit.weights.load_backbone with an official-style bare backbone state dict."""
    pytest.importorskip("dinokit.weights")
    from dinokit import build_backbone
    from dinokit.cli import main

    torch.save(build_backbone("vit_tiny", patch_size=8).state_dict(), tmp_path / "vit_tiny8.pth")
    make_places(tmp_path / "p", n=3)
    rc = main(["retrieval", "--weights", str(tmp_path / "vit_tiny8.pth"), "--arch", "vit_tiny", "--patch-size", "8",
               "--dataset", "folder", "--root", str(tmp_path / "p"), "--imsize", "48", "--descriptor", "cls+gem",
               "--no-progress", "--num-workers", "0", "--device", "cpu", "--output", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res["recall@k"]) == {"1", "5", "10"} and res["model"]["arch"] == "vit_tiny"


class CountingThumb(Thumb):
    """:class:`Thumb` counting the images it describes."""

    seen = 0

    def get_intermediate_layers(self, x, n=1):
        self.seen += x.shape[0]
        return super().get_intermediate_layers(x, n)


def _places_with_whitening(root):
    make_places(root)
    (root / "whitening").mkdir()
    for i in range(4):
        random_image(np.random.default_rng(i)).save(root / f"whitening/{i}.png")
    return root


def test_whitening_dim_is_checked_on_one_image_and_recorded(tmp_path):
    from dinokit.errors import ConfigError

    root = _places_with_whitening(tmp_path / "p")
    for dim, msg in ((0, "must be > 0, got 0"), (-3, "must be > 0, got -3"), (37, "37 is larger than the 36-dim")):
        model = CountingThumb()
        with pytest.raises(ConfigError, match=msg):
            evaluate_place_recognition(model, root, imsize=64, whiten_dir=root / "whitening", whiten_dim=dim)
        assert model.seen <= 1  # refused before the whitening, database and query images are described
    res = evaluate_place_recognition(Thumb(), root, imsize=64, whiten_dir=root / "whitening", whiten_dim=5)
    assert res["whitening"]["dim"] == 5 and res["whitening"]["n_images"] == 4
    assert 0.0 < res["whitening"]["energy_kept"] < 1.0
    res = evaluate_place_recognition(Thumb(), root, imsize=64, whiten_dir=root / "whitening")
    assert res["whitening"]["dim"] == 36 and res["whitening"]["energy_kept"] == pytest.approx(1.0)


def test_cli_retrieval_whitening_and_output_options_are_checked_first(tmp_path, monkeypatch, capsys):
    from dinokit.cli import main

    root = _places_with_whitening(tmp_path / "p")
    (tmp_path / "w.pth").write_bytes(b"")
    model = CountingThumb()
    _fake_weights(monkeypatch, model)
    (tmp_path / "folder").mkdir()
    common = ["--weights", str(tmp_path / "w.pth"), "--imsize", "64", "--no-progress", "--num-workers", "0",
              "--dataset", "folder", "--root", str(root)]
    for extra, msg in ((["--whiten-dim", "8"], "--whiten-dim needs --whiten"),
                       (["--whiten", "--whiten-dim", "0"], "--whiten-dim must be > 0, got 0"),
                       (["--whiten", "--whiten-dim", "-3"], "--whiten-dim must be > 0, got -3"),
                       (["--whiten", "--whiten-dim", "100"], "--whiten-dim 100 is larger than the 36-dimensional"),
                       (["--output", str(tmp_path / "folder")], "is a folder")):
        assert main(["retrieval", *common, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, (extra, err)
    assert model.seen <= 1
    assert main(["retrieval", *common, "--whiten", "--whiten-dim", "8", "--output", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["whitening"]["dim"] == 8


@pytest.mark.parametrize("bbx", [[40, 40, 10, 10], [1, 2, 3], [0, 0, "x", 5], [0, 0, float("inf"), 5],
                                 [5.2, 0, 5.4, 9], True])
def test_a_malformed_query_box_is_one_line_naming_it(tmp_path, bbx):
    """An inverted or short ``bbx`` ended ``--query-crop`` in PIL's traceback; the file is now checked on load."""
    data = make_revisited(tmp_path / "ds", n=2)
    data["gnd"][1]["bbx"] = bbx
    (tmp_path / "ds/gnd_roxford5k.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"gnd\[1\]\['bbx'\] must be a box \[x1, y1, x2, y2\] of finite numbers "
                       r"with x1 < x2 and y1 < y2"):
        load_ground_truth(tmp_path / "ds/gnd_roxford5k.json")


def test_query_crop_needs_every_box(tmp_path, monkeypatch, capsys):
    from dinokit.cli import main

    data = make_revisited(tmp_path / "ds", n=2)
    data["gnd"][1]["bbx"] = None
    (tmp_path / "ds/gnd_roxford5k.json").write_text(json.dumps(data))
    (tmp_path / "w.pth").write_bytes(b"")
    _fake_weights(monkeypatch, Thumb())
    common = ["--weights", str(tmp_path / "w.pth"), "--imsize", "64", "--no-progress", "--num-workers", "0",
              "--dataset", "roxford5k", "--root", str(tmp_path / "ds"), "--output", str(tmp_path / "r.json")]
    assert main(["retrieval", *common]) == 0  # the boxes are not used without --query-crop
    capsys.readouterr()
    assert main(["retrieval", *common, "--query-crop"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no box ('bbx') for query 1 (query1.jpg)" in err


def test_retrieval_output_may_not_replace_a_file_of_the_data_set(tmp_path, monkeypatch, capsys):
    from dinokit.cli import main

    make_places(tmp_path / "p")
    gt = tmp_path / "p" / "positives.json"
    before = gt.read_bytes()
    (tmp_path / "w.pth").write_bytes(b"")
    _fake_weights(monkeypatch, Thumb())
    common = ["--weights", str(tmp_path / "w.pth"), "--imsize", "64", "--no-progress", "--num-workers", "0",
              "--dataset", "folder", "--root", str(tmp_path / "p")]
    for output, message in ((gt, "is a file of the --root data set"), (tmp_path / "w.pth", "is the --weights file")):
        assert main(["retrieval", *common, "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert gt.read_bytes() == before
    assert main(["retrieval", *common, "--output", str(tmp_path / "p" / "results.json")]) == 0  # a new file
