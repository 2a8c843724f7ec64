"""Attention maps and threshold masks (reference visualize_attention.py, dino-reference.md §4.3)."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.eval import attention as A
from dinokit.models import build_backbone


def _tiny_vit(patch=8):
    return build_backbone("vit_custom", patch_size=patch, embed_dim=32, depth=2, num_heads=2,
                          img_size=32).eval()


def _reference_masks(attn, threshold):
    """The reference's per-head loop, written out."""
    nh = attn.shape[0]
    flat = attn.reshape(nh, -1).double()
    val, idx = torch.sort(flat)
    val = val / torch.sum(val, dim=1, keepdim=True)
    th = torch.cumsum(val, dim=1) > (1 - threshold)
    idx2 = torch.argsort(idx)
    for h in range(nh):
        th[h] = th[h][idx2[h]]
    return th.reshape(attn.shape)


@pytest.mark.parametrize("threshold", [0.1, 0.6, 0.9, 1.0])
def test_masks_keep_requested_mass_minimally(threshold):
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 5, 7, generator=g) ** 3
    masks = A.threshold_masks(attn, threshold)
    assert masks.shape == attn.shape and masks.dtype == torch.bool
    assert torch.equal(masks, _reference_masks(attn, threshold))
    for h in range(3):
        a = attn[h].double()
        kept = a[masks[h]]
        frac = float(kept.sum() / a.sum())
        assert frac >= threshold - 1e-9
        # minimal: dropping the least-attended kept patch falls below the threshold ...
        assert float((kept.sum() - kept.min()) / a.sum()) < threshold + 1e-12
        # ... and the kept patches are the most attended ones
        if (~masks[h]).any():
            assert float(kept.min()) >= float(a[~masks[h]].max())


def test_attention_maps_shape_non_square():
    model = _tiny_vit()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    x, shown = A.prepare_image(img, 24, patch_size=8)  # shorter side 30 -> 24: 40 x 24, multiples of 8
    assert shown.size == (40, 24) and x.shape == (3, 24, 40)
    maps = A.attention_maps(model, x)
    assert maps.shape == (2, 3, 5)
    full = model.get_last_selfattention(x[None])
    assert torch.allclose(maps, full[0, :, 0, 1:].reshape(2, 3, 5))
    assert float(maps.sum(dim=(1, 2)).max()) < 1.0  # the CLS column is excluded
    # exact (H, W) as the reference's two-value --image_size; odd sizes are cropped to the patch grid
    x2, shown2 = A.prepare_image(img, (35, 42), patch_size=8)
    assert shown2.size == (40, 32) and x2.shape == (3, 32, 40)
    assert A.attention_maps(model, x2[None]).shape == (2, 4, 5)


def test_save_attention_images(tmp_path):
    model = _tiny_vit()
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    x, shown = A.prepare_image(img, None, patch_size=8)
    maps = A.attention_maps(model, x)
    masks = A.threshold_masks(maps, 0.6)
    paths = A.save_attention_images(shown, maps, masks, tmp_path, prefix="cat", threshold=0.6)
    names = {p.name for p in paths}
    for n in ("cat-img.png", "cat-attn-head0.png", "cat-attn-head1.png", "cat-attn-mean.png",
              "cat-overlay-head1.png", "cat-overlay-mean.png", "cat-mask-th0.6-head0.png", "cat-attn.npy",
              "cat-masks.npy"):
        assert n in names and (tmp_path / n).exists()
    assert Image.open(tmp_path / "cat-overlay-head0.png").size == (40, 24)
    assert np.load(tmp_path / "cat-attn.npy").shape == (2, 3, 5)


def test_builtin_colormap_matches_matplotlib(monkeypatch):
    pytest.importorskip("matplotlib")
    with_mpl = A._lut()
    real_import = builtins.__import__

    def no_mpl(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    builtin = A._lut()
    assert builtin.shape == with_mpl.shape == (256, 3)
    assert np.abs(builtin.astype(int) - with_mpl.astype(int)).max() <= 8
    assert A.colormap(np.array([[0.0, 1.0]])).shape == (1, 2, 3)


def test_prepare_image_too_small_for_a_patch_is_a_config_error():
    from dinokit.errors import ConfigError

    img = Image.fromarray(np.zeros((4, 12, 3), dtype=np.uint8))
    with pytest.raises(ConfigError, match=r"an image of 4x12 px \(HxW\) is smaller than one 8-pixel patch"):
        A.prepare_image(img, None, patch_size=8)


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """``dinokit attention`` in-process on a tiny ViT (the weights loader is replaced): (exit code, stdout, stderr).
    ``loads`` counts the model loads."""
    import sys
    import types

    from dinokit.cli import main

    loads = []
    mod = types.ModuleType("dinokit.weights")
    mod.load_backbone = lambda *a, **k: loads.append(1) or _tiny_vit()
    monkeypatch.setitem(sys.modules, "dinokit.weights", mod)
    (tmp_path / "w.pth").write_bytes(b"")

    def run(*argv):
        capsys.readouterr()
        try:
            rc = main(["attention", "--weights", str(tmp_path / "w.pth"), "--device", "cpu", *argv])
        except SystemExit as e:  # argparse errors
            rc = e.code
        out, err = capsys.readouterr()
        return rc, out, err

    run.loads = loads
    return run


def test_cli_prints_pixels_and_patches_in_the_same_order(tmp_path, cli):
    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(wide)
    rc, out, err = cli("--image", str(wide), "--out", str(tmp_path / "att"), "--image-size", "24")
    assert rc == 0, err
    assert "24x40 px (HxW), 2 heads, 3x5 patches" in out


def test_cli_refuses_bad_sizes_images_and_outputs_in_one_line(tmp_path, cli):
    img = tmp_path / "img.png"
    Image.fromarray(np.zeros((30, 50, 3), dtype=np.uint8)).save(img)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder").mkdir()
    out = ["--out", str(tmp_path / "att")]
    loaded_before = [
        (["--image", str(img), *out, "--image-size", "4"], "--image-size 4: a side of 4 px is smaller than one 8-"),
        (["--image", str(img), *out, "--image-size", "40", "7"], "a side of 7 px is smaller than one 8-pixel patch"),
    ]
    refused_early = [
        (["--image", str(img), *out, "--image-size", "0"], "--image-size takes one positive number"),
        (["--image", str(img), *out, "--image-size", "-24"], "--image-size takes one positive number"),
        (["--image", str(img), *out, "--image-size", "big"], "invalid int value: 'big'"),
        (["--image", str(img), *out, "--image-size", "24.5"], "invalid int value: '24.5'"),
        (["--image", str(tmp_path / "folder"), *out], "is a folder; give image files"),
        (["--image", str(img), "--image", str(tmp_path / "nope.png"), *out], "image not found"),
        (["--image", str(img), "--out", str(tmp_path / "a_file")], "is a file, not a folder"),
        (["--image", str(img), "--out", str(tmp_path / "a_file" / "sub")], "is not a folder"),
    ]
    for argv, message in loaded_before + refused_early:
        before = len(cli.loads)
        rc, _, err = cli(*argv)
        assert rc == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, (argv, err)
        if (argv, message) in refused_early:
            assert len(cli.loads) == before, argv  # refused before the model was loaded
    assert not (tmp_path / "att").exists()
