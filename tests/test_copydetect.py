"""Copy detection (reference §4.6): generated originals, copies and distractors; PCA whitening; Holidays AP."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from dinokit.errors import DataError
from dinokit.eval.copydetect import block_ap, evaluate_copy_detection, find_positives, load_copy_detection
from dinokit.eval.whitening import PCAWhitening

from .test_retrieval import CountingThumb, RandomFeatures, Thumb, random_image


def _jpeg(im, q):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _text(im):
    im = im.copy()
    d = ImageDraw.Draw(im)
    d.text((5, 30), "COPY dinokit", fill=(255, 255, 255))
    d.text((10, 55), "(c) 2024", fill=(0, 0, 0))
    return im


TRANSFORMS = {
    "crops/70": lambda im: im.crop((int(im.width * .15), int(im.height * .15), int(im.width * .85),
                                    int(im.height * .85))),
    "jpegqual/10": lambda im: _jpeg(im, 10),
    "jpegqual/50": lambda im: _jpeg(im, 50),
    "blur": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "colour": lambda im: ImageEnhance.Brightness(ImageEnhance.Color(im).enhance(0.3)).enhance(1.3),
    "text": _text,
}


def make_copydays(root, n=8, n_distractors=16, n_whitening=16, seed=0):
    rng = np.random.default_rng(seed)
    (root / "original").mkdir(parents=True)
    for b in TRANSFORMS:
        (root / b).mkdir(parents=True)
    for i in range(n):
        im = random_image(rng)
        name = f"{2000 + i}00.jpg"
        im.save(root / "original" / name, quality=95)
        for b, f in TRANSFORMS.items():
            f(im).save(root / b / name, quality=95)
    for sub, k in (("distractors", n_distractors), ("whitening", n_whitening)):
        (root / sub).mkdir()
        for j in range(k):
            random_image(rng).save(root / sub / f"{sub[0]}{j:03d}.jpg", quality=95)
    return root


def test_copy_detection_meaningful_features_high_random_low(tmp_path):
    root = make_copydays(tmp_path / "cd")
    res = evaluate_copy_detection(Thumb(), root, imsize=64)
    assert list(res["blocks"])[0] == "original" and set(res["blocks"]) == {"original", *TRANSFORMS}
    assert res["n_database"] == 8 + 16 and res["n_distractors"] == 16
    assert res["blocks"]["original"]["mAP"] == 1.0
    assert res["overall"]["mAP"] > 0.9 and res["overall"]["n_queries"] == 6 * 8  # measured 0.965
    for b in ("jpegqual/10", "jpegqual/50", "blur", "colour", "text"):
        assert res["blocks"][b]["mAP"] > 0.9
    for mode in ("reference", "centered"):
        w = evaluate_copy_detection(Thumb(), root, imsize=64, whiten_dir=root / "whitening", whiten_mode=mode)
        assert w["whitening"]["mode"] == mode and w["overall"]["mAP"] > 0.85  # measured 0.944 / 0.946
    torch.manual_seed(0)
    rnd = evaluate_copy_detection(RandomFeatures(), root, imsize=64)
    assert rnd["overall"]["mAP"] < 0.3  # measured 0.11
    # fewer distractors, full ranking, one block
    r = evaluate_copy_detection(Thumb(), root, imsize=64, n_distractors=4, topk=None, blocks=["text"])
    assert r["n_database"] == 12 and list(r["blocks"]) == ["text"] and r["blocks"]["text"]["mAP"] > 0.9


def test_positives_and_layout(tmp_path):
    names = ["200000.jpg", "200100.jpg", "200200.jpg"]
    assert find_positives("200100.jpg", names, "jpegqual/50") == [1]
    # reference rule for 'strong': the originals sharing the first 4 characters
    assert find_positives("200001.jpg", names, "strong") == [0]
    assert find_positives("200100.jpg", ["200100.jpg", "200199.jpg"], "strong") == [0, 1]
    assert find_positives("200100.jpg", ["200100.jpg", "200199.jpg"], "crops/50") == [0]
    assert find_positives("200177.jpg", ["200100.jpg", "200199.jpg"], "other", prefix_len=4) == [0, 1]
    assert find_positives("300000.jpg", names, "other") == []
    root = make_copydays(tmp_path / "cd", n=3, n_distractors=2, n_whitening=0)
    data = load_copy_detection(root)
    assert len(data.database) == 5 and data.positives["text"] == [[0], [1], [2]]
    with pytest.raises(DataError, match="asked for 9 distractors"):
        load_copy_detection(root, n_distractors=9)
    with pytest.raises(DataError, match="not found"):
        load_copy_detection(root, blocks=["strong"])
    with pytest.raises(DataError, match="original/"):
        load_copy_detection(tmp_path)


def test_distractor_and_whitening_folders_given_by_path_are_no_query_blocks(tmp_path):
    """Explicit ``--distractors-dir``/``--whiten`` folders under ROOT under other names were scanned as query
    blocks too (no positives: n/a rows, and the distractors counted as queries)."""
    import shutil

    root = make_copydays(tmp_path / "cd", n=3, n_distractors=2, n_whitening=2)
    shutil.move(root / "distractors", root / "dis")
    (root / "extra").mkdir()
    shutil.move(root / "whitening", root / "extra" / "wtn")
    plain = load_copy_detection(root, distractors_dir=root / "dis")
    assert "dis" not in plain.blocks and "extra/wtn" in plain.blocks  # not said to be the whitening set
    data = load_copy_detection(root, distractors_dir=root / "dis", exclude=(root / "extra",))
    assert "dis" not in data.blocks and not any(b.startswith("extra") for b in data.blocks)
    assert len(data.distractors) == 2 and set(data.blocks) == set(plain.blocks) - {"extra/wtn"}


def test_block_ap_holidays_trapezoid_and_top20_truncation():
    ranking = np.array([[5, 0, 7], [1, 2, 3]])
    aps = block_ap(ranking, [[0], [9], []])
    assert aps[0] == pytest.approx((0 + 0.5) / 2)  # positive at rank 1
    assert aps[1] == 0.0  # positive not among the kept results
    assert np.isnan(aps[2])


def test_pca_whitening_reference_and_centered():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g,
                                                                                dtype=torch.float64) + 3.0
    ref = PCAWhitening("reference").fit(feats)
    # reference: eigenvectors of the uncentred second moment F^T F / n, eigenvalues floored at max * 1e-5
    evals, evecs = np.linalg.eigh((feats.T @ feats / 200).numpy())
    evals = np.maximum(evals, evals.max() * 1e-5)
    order = np.argsort(evals)[::-1]
    proj = np.diag(evals[order] ** -0.5) @ evecs[:, order].T
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    expect = (x.numpy() - feats.mean(0).numpy()) @ proj.T
    assert np.allclose(np.abs(ref(x).numpy()), np.abs(expect), atol=1e-8)  # eigenvector signs are arbitrary
    # centred mode whitens the training set exactly: identity covariance
    cen = PCAWhitening("centered").fit(feats)
    y = cen(feats)
    assert torch.allclose(y.T @ y / 200, torch.eye(6, dtype=torch.float64), atol=1e-8)
    assert PCAWhitening("centered", dim=3).fit(feats)(x).shape == (4, 3)


def test_real_vit_copy_detection_runs(tmp_path):
    from dinokit import build_backbone

    root = make_copydays(tmp_path / "cd", n=3, n_distractors=2, n_whitening=4)
    vit = build_backbone("vit_custom", patch_size=8, embed_dim=32, depth=1, num_heads=2).eval()
    res = evaluate_copy_detection(vit, root, imsize=36, whiten_dir=root / "whitening")  # 36: cropped to 32
    assert 0.0 <= res["overall"]["mAP"] <= 1.0 and res["whitening"]["n_images"] == 4


def test_cli_copydetect(tmp_path, monkeypatch, capsys):
    import json
    import sys
    import types

    from dinokit.cli import main

    root = make_copydays(tmp_path / "cd", n=4, n_distractors=4, n_whitening=6)
    (tmp_path / "w.pth").write_bytes(b"")
    mod = types.ModuleType("dinokit.weights")
    mod.load_backbone = lambda *a, **k: Thumb()
    monkeypatch.setitem(sys.modules, "dinokit.weights", mod)
    rc = main(["copydetect", "--weights", str(tmp_path / "w.pth"), "--root", str(root), "--imsize", "64",
               "--whiten", "--distractors", "2", "--no-progress", "--num-workers", "0",
               "--output", str(tmp_path / "c.json")])
    text = capsys.readouterr().out
    assert rc == 0 and "overall" in text and "jpegqual/10" in text
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["n_distractors"] == 2 and res["whitening"]["mode"] == "reference" and res["overall"]["mAP"] > 0.8
    rc = main(["copydetect", "--weights", str(tmp_path / "missing.pth"), "--root", str(root)])
    err = capsys.readouterr().err
    assert rc == 2 and "weights file" in err and err.count("\n") == 1


def test_copy_detection_whitening_dim_is_checked_before_the_database_and_recorded(tmp_path):
    from dinokit.errors import ConfigError

    root = make_copydays(tmp_path / "cd", n=3, n_distractors=2, n_whitening=4)
    model = CountingThumb()
    with pytest.raises(ConfigError, match="73 is larger than the 72-dimensional cls[+]gem descriptor"):
        evaluate_copy_detection(model, root, imsize=64, whiten_dir=root / "whitening", whiten_dim=73)
    assert model.seen == 1
    res = evaluate_copy_detection(Thumb(), root, imsize=64, whiten_dir=root / "whitening", whiten_dim=3)
    assert res["whitening"]["dim"] == 3 and res["whitening"]["n_images"] == 4 and res["whitening"]["energy_kept"] < 1


def test_cli_copydetect_whitening_and_output_options_are_checked_first(tmp_path, monkeypatch, capsys):
    import json
    import sys
    import types

    from dinokit.cli import main

    root = make_copydays(tmp_path / "cd", n=3, n_distractors=2, n_whitening=4)
    (tmp_path / "w.pth").write_bytes(b"")
    model = CountingThumb()
    mod = types.ModuleType("dinokit.weights")
    mod.load_backbone = lambda *a, **k: model
    monkeypatch.setitem(sys.modules, "dinokit.weights", mod)
    (tmp_path / "folder").mkdir()
    common = ["--weights", str(tmp_path / "w.pth"), "--root", str(root), "--imsize", "64", "--no-progress",
              "--num-workers", "0"]
    for extra, msg in ((["--whiten-dim", "8"], "--whiten-dim needs --whiten"),
                       (["--whiten", "--whiten-dim", "0"], "--whiten-dim must be > 0, got 0"),
                       (["--whiten", "--whiten-dim", "-3"], "--whiten-dim must be > 0, got -3"),
                       (["--whiten", "--whiten-dim", "100"], "--whiten-dim 100 is larger than the 72-dimensional"),
                       (["--output", str(tmp_path / "folder")], "is a folder"),
                       (["--output", str(tmp_path / "w.pth")], "is the --weights file"),
                       (["--output", str(next((root / "original").iterdir()))], "is an image of the --root data set")):
        assert main(["copydetect", *common, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, (extra, err)
    assert model.seen <= 1
    assert main(["copydetect", *common, "--whiten", "--whiten-dim", "8", "--output", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["whitening"]["dim"] == 8


def test_unreadable_image_stops_copy_detection_in_one_line_naming_it(tmp_path, monkeypatch, capsys):
    import sys
    import types

    from dinokit.cli import main

    root = make_copydays(tmp_path / "cd", n=3, n_distractors=2, n_whitening=0)
    bad = root / "original" / "200100.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError) as e:
        evaluate_copy_detection(Thumb(), root, imsize=64)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"cannot read image {bad}")
    assert "fix or replace the file, or remove it" in str(e.value)
    (tmp_path / "w.pth").write_bytes(b"")
    mod = types.ModuleType("dinokit.weights")
    mod.load_backbone = lambda *a, **k: Thumb()
    monkeypatch.setitem(sys.modules, "dinokit.weights", mod)
    rc = main(["copydetect", "--weights", str(tmp_path / "w.pth"), "--root", str(root), "--imsize", "64",
               "--no-progress", "--num-workers", "1", "--output", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"cannot read image {bad}" in err and "Traceback" not in err
    assert not (tmp_path / "c.json").exists()


def test_imsize_below_one_patch_is_refused_before_any_image_is_described(tmp_path):
    from dinokit.errors import ConfigError

    root = make_copydays(tmp_path / "cd", n=2, n_distractors=0, n_whitening=3)
    model = CountingThumb()
    with pytest.raises(ConfigError, match="--imsize 6 gives images of at most 6 px, smaller than one 8-pixel patch "
                                          "of the model; use --imsize 8 or more"):
        evaluate_copy_detection(model, root, imsize=6, whiten_dir=root / "whitening")
    assert model.seen == 0
    assert evaluate_copy_detection(Thumb(), root, imsize=8)["overall"]["n_queries"] > 0
