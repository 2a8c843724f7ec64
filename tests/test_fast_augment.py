"""FastMultiCrop (dinokit.fast_augment): same parameter distributions as the reference chain, faithful pixel ops,
shapes and normalisation, draft decoding and EXIF orientation."""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter

from dinokit.augmentation import IMAGENET_MEAN, IMAGENET_STD, DINOAugmentation, RandomGaussianBlur, RandomSolarize
from dinokit.data import load_image
from dinokit.fast_augment import FastMultiCrop


def _photo(w: int = 131, h: int = 97, seed: int = 0) -> Image.Image:
    """A smooth colourful image with some texture (values across the whole range)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([127 + 120 * np.sin(xx / 9.0), 127 + 120 * np.cos(yy / 7.0), 127 + 120 * np.sin((xx + yy) / 13.0)],
                 axis=-1)
    a = a + rng.normal(0, 12, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float()


# ---------------------------------------------------------------------------------------------------------
# contract


def test_shapes_dtype_and_normalisation():
    aug = FastMultiCrop(global_crop_size=32, local_crop_size=16, local_crops_number=3)
    crops = aug(_photo())
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    # a constant image with every colour op off is exactly (v / 255 - mean) / std
    flat = FastMultiCrop(global_crop_size=32, local_crop_size=16, local_crops_number=2, blur=(0, 0, 0),
                         solarize=(0, 0, 0))
    flat.jitter_p = flat.grayscale_p = 0.0
    out = flat(Image.new("RGB", (50, 40), (200, 100, 30)))
    expect = (torch.tensor([200, 100, 30]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for c in out:
        torch.testing.assert_close(c, expect.view(3, 1, 1).expand_as(c), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["pil", "grey", "rgba", "tensor", "array", "path"])
def test_input_kinds_give_the_same_crops(kind, tmp_path):
    img = _photo()
    aug = FastMultiCrop(global_crop_size=32, local_crop_size=16, local_crops_number=2)
    if kind == "pil":
        x = img
    elif kind == "grey":
        img = img.convert("L")
        x = img
    elif kind == "rgba":
        x = img.convert("RGBA")
    elif kind == "tensor":
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    elif kind == "array":
        x = np.array(img)
    else:
        x = tmp_path / "a.png"
        img.save(x)
    torch.manual_seed(3)
    got = aug(x)
    torch.manual_seed(3)
    ref = aug(img.convert("RGB"))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_seeded_and_deterministic():
    aug = FastMultiCrop(global_crop_size=32, local_crop_size=16, local_crops_number=2)
    img = _photo()
    torch.manual_seed(5)
    a = aug(img)
    torch.manual_seed(5)
    b = aug(img)
    c = aug(img, generator=torch.Generator().manual_seed(7))
    d = aug(img, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(c, d))


def test_bad_inputs_are_clear_errors(tmp_path):
    from dinokit.errors import DataError

    aug = FastMultiCrop()
    with pytest.raises(DataError):
        aug(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(DataError):
        aug(tmp_path / "missing.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError):
        aug(bad)
    # truncated JPEGs, with and without an EXIF rotation (decoded on different paths): one DataError naming the file
    for orientation in (1, 6):
        buf = io.BytesIO()
        exif = Image.Exif()
        exif[0x0112] = orientation
        _photo(120, 90).save(buf, format="JPEG", exif=exif)
        cut = tmp_path / f"truncated{orientation}.jpg"
        cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(DataError, match=f"truncated{orientation}.jpg.*truncated"):
            aug(cut)


# ---------------------------------------------------------------------------------------------------------
# pixel operations against PIL / torchvision (the reference chain runs them on uint8 PIL images)


def test_crop_resize_and_flip_match_pil():
    img = _photo(160, 120)
    aug = FastMultiCrop(global_crop_size=48, local_crop_size=24, local_crops_number=4)
    torch.manual_seed(0)
    p = aug.sample_params(img.height, img.width)
    p["flip"][:] = torch.tensor([True, False, True, False, True, False])
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0)
    for sel, size in ((range(0, 2), 48), (range(2, 6), 24)):
        out = aug._crop_resize(x, p, sel, size, 1.0, 1.0)
        for k, i in enumerate(sel):
            assert out[k].dtype == np.uint8 and out[k].shape == (size, size, 3)
            t, left, h, w = (int(p[n][i]) for n in ("top", "left", "height", "width"))
            ref = img.crop((left, t, left + w, t + h)).resize((size, size), Image.BICUBIC)
            if bool(p["flip"][i]):
                ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
            assert np.abs(out[k].astype(int) - np.array(ref).astype(int)).max() <= 1  # rounding only


def _one_op(a: np.ndarray, op: int, f: float) -> np.ndarray:
    factors = [1.0, 1.0, 1.0, 0.0]
    factors[op] = f
    return FastMultiCrop._jitter(a.copy(), [op], factors)


@pytest.mark.parametrize("op,f,fn", [(0, 1.35, TF.adjust_brightness), (0, 0.62, TF.adjust_brightness),
                                     (1, 1.38, TF.adjust_contrast), (1, 0.61, TF.adjust_contrast),
                                     (2, 1.19, TF.adjust_saturation), (2, 0.81, TF.adjust_saturation)])
def test_blend_jitter_ops_match_pil(op, f, fn):
    img = _photo(64, 48)
    got = _one_op(np.array(img), op, f)
    assert got.dtype == np.uint8
    d = np.abs(got.astype(int) - np.array(fn(img, f)).astype(int))
    assert d.max() <= 1 and d.mean() < 0.2  # both round once per operation


def test_neutral_jitter_and_the_full_chain_order():
    a = np.array(_photo(40, 30))
    assert np.array_equal(FastMultiCrop._jitter(a.copy(), [0, 1, 2, 3], [1.0, 1.0, 1.0, 0.0]), a)
    # a chain equals the operations one after the other, in the given order
    order, fac = [2, 0, 3, 1], [1.3, 0.7, 1.15, -0.05]
    step = a
    for op in order:
        step = _one_op(step, op, fac[op])
    assert np.array_equal(FastMultiCrop._jitter(a.copy(), order, fac), step)
    assert not np.array_equal(FastMultiCrop._jitter(a.copy(), [1, 0, 3, 2], fac), step)  # order matters


@pytest.mark.parametrize("shift", [0.09, -0.1, 0.03, -0.004])
def test_hue_matches_torchvision_and_pil(shift):
    img = _photo(64, 48)
    got = _one_op(np.array(img), 3, shift).astype(np.float64)
    # the exact hue rotation (torchvision on float tensors), rounded once
    exact = TF.adjust_hue(_pil_to_tensor(img) / 255, shift).permute(1, 2, 0).double().numpy() * 255
    assert np.abs(got - exact).max() <= 0.5 + 1e-3
    # PIL goes through 8-bit H, S, V: its round trip alone (shift 0) is off by up to 6 grey levels here
    d = np.abs(got - np.array(TF.adjust_hue(img, shift)))
    assert d.mean() < 2.0 and d.max() <= 16


def test_hue_ties_and_grey_pixels():
    a = np.array([[[128, 128, 128], [204, 204, 51], [51, 204, 204], [255, 0, 255], [0, 0, 0], [255, 255, 255]]],
                 dtype=np.uint8)
    got = _one_op(a, 3, 0.1).astype(np.float64)
    exact = TF.adjust_hue(torch.from_numpy(a).permute(2, 0, 1).float() / 255, 0.1).permute(1, 2, 0).double()
    assert np.abs(got - exact.numpy() * 255).max() <= 0.5 + 1e-3


def _box_blur_float64(a: np.ndarray, sigma: float) -> np.ndarray:
    """Pillow's GaussianBlur written out independently: 3 passes per axis of the extended box filter (radius from
    Pillow's _gaussian_blur_radius) with a replicated border, in float64, no rounding."""
    s2 = sigma * sigma / 3
    whole = math.floor((math.sqrt(12 * s2 + 1) - 1) / 2)
    r = whole + (2 * whole + 1) * (whole * (whole + 1) - 3 * s2) / (6 * (s2 - (whole + 1) ** 2))
    taps = np.array([(r - whole)] + [1.0] * (2 * whole + 1) + [(r - whole)]) / (2 * r + 1)
    half = len(taps) // 2
    x = a.astype(np.float64)
    for axis in (0, 1):
        for _ in range(3):
            n = x.shape[axis]
            pad = np.take(x, np.clip(np.arange(-half, n + half), 0, n - 1), axis=axis)
            x = sum(w * np.take(pad, np.arange(t, t + n), axis=axis) for t, w in enumerate(taps))
    return x


@pytest.mark.parametrize("sigma", [0.1, 0.6, 1.3, 2.0])
@pytest.mark.parametrize("size", [24, 96, 224])
def test_blur_matches_pil_gaussian_blur(sigma, size):
    from dinokit.augmentation import _pil_box_kernel

    img = _photo(size, size, seed=1)
    aug = FastMultiCrop()
    kernel = _pil_box_kernel(torch.tensor([sigma]), aug._blur_half)[0].numpy()
    got = aug._blur(np.array(img), kernel).astype(np.float64)
    exact = _box_blur_float64(np.array(img), sigma)
    assert np.abs(got - exact).max() <= 1.5 and abs((got - exact).mean()) < 0.02  # three roundings, no bias
    pil = np.array(img.filter(ImageFilter.GaussianBlur(sigma)))
    assert np.abs(pil - exact).max() <= 3.0  # Pillow rounds after each of its 6 box passes: it is further off
    d = np.abs(got - pil)
    assert d.max() <= 3 and d.mean() < 0.7


def test_solarise_and_greyscale():
    aug = FastMultiCrop(global_crop_size=16, local_crop_size=8, local_crops_number=0, blur=(0, 0, 0),
                        solarize=(1.0, 1.0, 0.0))
    aug.jitter_p = 0.0
    aug.grayscale_p = 1.0
    img = _photo(40, 30)
    crops, p = aug(img, return_params=True)
    assert bool(p["solarize"].all()) and bool(p["grayscale"].all())
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    px = crops[0] * std + mean
    assert torch.allclose(px[0], px[1], atol=1e-5) and torch.allclose(px[1], px[2], atol=1e-5)  # grey
    assert px.max() <= 127 / 255 + 1e-5  # solarised: every value >= 128 became 255 - v


def test_solarise_and_greyscale_pixels_equal_pil():
    from PIL import ImageOps

    from dinokit.fast_augment import _GREY_TO_RGB, _SOLARIZE

    ramp = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("RGB")
    assert np.array_equal(cv2.LUT(np.array(ramp), _SOLARIZE), np.array(ImageOps.solarize(ramp, 128)))
    img = _photo(50, 40)
    grey = cv2.transform(np.array(img), _GREY_TO_RGB)
    ref = np.array(img.convert("L")).astype(int)
    assert all(np.abs(grey[:, :, c].astype(int) - ref).max() <= 1 for c in range(3))


# ---------------------------------------------------------------------------------------------------------
# decoding


def test_draft_decoding_of_large_jpegs(tmp_path):
    path = tmp_path / "big.jpg"
    _photo(400, 300, seed=2).resize((1600, 1200), Image.BICUBIC).save(path, quality=92)
    aug = FastMultiCrop()
    torch.manual_seed(1)
    crops, p = aug(path, return_params=True)
    scale = aug._draft_scale(p)
    assert scale >= 2 and all(torch.isfinite(c).all() for c in crops)
    sizes = [224] * 2 + [96] * 8
    assert all(min(int(h), int(w)) >= scale * s for h, w, s in zip(p["height"], p["width"], sizes))
    # the decoded pixels: libjpeg's DCT scaling + bicubic equals the full decode + bicubic to a fraction of a grey
    # level on boxes that sit on the draft grid (other boxes are rounded to it: <= scale / 2 source pixels)
    for k in ("top", "left", "height", "width"):
        p[k] = p[k] // scale * scale
    full, _, _ = aug._decode(Image.open(path), 1)
    small, fy, fx = aug._decode(Image.open(path), scale)
    assert small.shape[0] * scale == full.shape[0] and fy == 1 / scale
    xf = torch.from_numpy(full).permute(2, 0, 1).unsqueeze(0)
    xs = torch.from_numpy(small).permute(2, 0, 1).unsqueeze(0)
    for sel, size in ((range(0, 2), 224), (range(2, 10), 96)):
        for a, b in zip(aug._crop_resize(xf, p, sel, size, 1.0, 1.0), aug._crop_resize(xs, p, sel, size, fy, fx)):
            assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0


def test_exif_orientation_is_applied(tmp_path):
    img = _photo(90, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    aug = FastMultiCrop(global_crop_size=32, local_crop_size=16, local_crops_number=2)
    torch.manual_seed(2)
    got = aug(path)
    torch.manual_seed(2)
    ref = aug(load_image(path))  # decoded, transposed and converted by the data loader
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_the_trainers_folder_data_hands_paths_to_it_for_draft_decoding(tmp_path, monkeypatch):
    """With ``--augment-impl fast`` the folder data set gives FastMultiCrop the file path (not a decoded image),
    so large JPEGs are decoded at a reduced scale; the crops equal FastMultiCrop(path) under the sample's seed,
    and a skipped file does not shift the next image's random draws."""
    from dinokit.data import ImageFolderDataset
    from dinokit.trainer import AugmentedDataset

    folder = tmp_path / "imgs"
    folder.mkdir()
    _photo(400, 300, seed=2).resize((1600, 1200), Image.BICUBIC).save(folder / "a.jpg", quality=92)
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    _photo(60, 50).save(folder / "c.png")
    aug = FastMultiCrop()
    scales = []
    decode = FastMultiCrop._decode

    def spy(self, im, scale):
        scales.append(scale)
        return decode(self, im, scale)

    monkeypatch.setattr(FastMultiCrop, "_decode", spy)
    ds = AugmentedDataset(ImageFolderDataset(folder), transform=aug)
    crops = ds[(0, 123)]
    assert len(scales) == 1 and scales[0] >= 2  # decoded from the path, at a reduced scale
    torch.manual_seed(123)
    assert all(torch.equal(a, b) for a, b in zip(crops, aug(folder / "a.jpg")))
    with pytest.warns(UserWarning, match="b.jpg"):
        substitute = ds[(1, 7)]  # b.jpg is unreadable: c.png's crops, drawn from seed 7 as if read first
    assert all(torch.equal(a, b) for a, b in zip(substitute, ds[(2, 7)]))
    torch.manual_seed(7)
    assert all(torch.equal(a, b) for a, b in zip(substitute, aug(load_image(folder / "c.png"))))


# ---------------------------------------------------------------------------------------------------------
# the distribution, against the reference chain (DINOAugmentation, instrumented)


def _record_reference(n_images: int, H: int, W: int, local_crops_number: int) -> dict:
    ref = DINOAugmentation(global_crop_size=16, local_crop_size=8, local_crops_number=local_crops_number)
    rec: dict = {v: {"boxes": [], "flip": 0, "jitter": [], "grey": 0, "blur": [], "solarize": 0, "calls": 0}
                 for v in ("global1", "global2", "local")}

    def hook(view, compose):
        for t in compose.transforms:
            name = type(t).__name__
            if name == "RandomResizedCrop":
                orig = t.make_params

                def mp(flat, orig=orig):
                    prm = orig(flat)
                    rec[view]["boxes"].append((prm["height"], prm["width"]))
                    rec[view]["calls"] += 1
                    return prm
                t.make_params = mp
            elif name in ("RandomHorizontalFlip", "RandomGrayscale"):
                key = "flip" if name == "RandomHorizontalFlip" else "grey"
                orig = t.make_params

                def mp(flat, orig=orig, key=key):
                    rec[view][key] += 1
                    return orig(flat)
                t.make_params = mp
            elif name == "RandomApply":
                cj = t.transforms[0]
                orig = cj.make_params

                def mp(flat, orig=orig):
                    prm = orig(flat)
                    rec[view]["jitter"].append((prm["fn_idx"].tolist(), prm["brightness_factor"],
                                                prm["contrast_factor"], prm["saturation_factor"], prm["hue_factor"]))
                    return prm
                cj.make_params = mp
            elif isinstance(t, RandomGaussianBlur):
                orig = t.apply

                def ap(img, radius, orig=orig):
                    rec[view]["blur"].append(radius)
                    return orig(img, radius)
                t.apply = ap
            elif isinstance(t, RandomSolarize):
                orig = t.apply

                def ap(img, orig=orig):
                    rec[view]["solarize"] += 1
                    return orig(img)
                t.apply = ap

    hook("global1", ref.global1)
    hook("global2", ref.global2)
    hook("local", ref.local)
    img = Image.new("RGB", (W, H), (120, 80, 200))
    torch.manual_seed(0)
    for _ in range(n_images):
        ref(img)
    return rec


def _record_fast(n_images: int, H: int, W: int, local_crops_number: int) -> dict:
    aug = FastMultiCrop(local_crops_number=local_crops_number)
    g = torch.Generator().manual_seed(1)
    rec: dict = {v: {"boxes": [], "flip": 0, "jitter": [], "grey": 0, "blur": [], "solarize": 0, "calls": 0}
                 for v in ("global1", "global2", "local")}
    for _ in range(n_images):
        p = aug.sample_params(H, W, g)
        for i in range(2 + local_crops_number):
            view = "global1" if i == 0 else "global2" if i == 1 else "local"
            r = rec[view]
            r["calls"] += 1
            r["boxes"].append((int(p["height"][i]), int(p["width"][i])))
            r["flip"] += int(p["flip"][i])
            r["grey"] += int(p["grayscale"][i])
            r["solarize"] += int(p["solarize"][i])
            if bool(p["jitter"][i]):
                f = p["factors"][i].tolist()
                r["jitter"].append((p["order"][i].tolist(), *f))
            if bool(p["blur"][i]):
                r["blur"].append(float(p["sigma"][i]))
    return rec


def _ks(a, b) -> float:
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right")
                               / len(b))))


def _ks_ok(a, b, alpha_c: float = 1.95) -> bool:  # two-sample KS at alpha = 0.001
    n, m = len(a), len(b)
    return _ks(a, b) < alpha_c * math.sqrt((n + m) / (n * m))


def _rate_ok(k1: int, n1: int, k2: int, n2: int, z: float = 4.5) -> bool:
    p = (k1 + k2) / (n1 + n2)
    if p in (0.0, 1.0):
        return k1 / n1 == k2 / n2
    return abs(k1 / n1 - k2 / n2) <= z * math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))


def test_parameter_distributions_match_the_reference_chain():
    N, H, W, L = 400, 90, 120, 4
    ref = _record_reference(N, H, W, L)
    fast = _record_fast(N, H, W, L)
    for view in ("global1", "global2", "local"):
        r, f = ref[view], fast[view]
        assert r["calls"] == f["calls"] == N * (L if view == "local" else 1)
        n = r["calls"]
        # crop scale (area fraction) and log aspect ratio
        for stat in (lambda h, w: h * w / (H * W), lambda h, w: math.log(w / h)):
            assert _ks_ok([stat(*b) for b in r["boxes"]], [stat(*b) for b in f["boxes"]]), view
        # application rates: flip 0.5, jitter 0.8, grey 0.2, blur 1.0 / 0.1 / 0.5, solarise 0 / 0.2 / 0
        for key in ("flip", "grey", "solarize"):
            assert _rate_ok(r[key], n, f[key], n), (view, key, r[key], f[key])
        assert _rate_ok(len(r["jitter"]), n, len(f["jitter"]), n), view
        assert _rate_ok(len(r["blur"]), n, len(f["blur"]), n), view
        nominal = {"flip": 0.5, "grey": 0.2, "solarize": {"global2": 0.2}.get(view, 0.0)}
        for key, p in nominal.items():
            assert abs(f[key] / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-12, (view, key)
        assert abs(len(f["jitter"]) / n - 0.8) <= 4.5 * math.sqrt(0.16 / n)
        pb = {"global1": 1.0, "global2": 0.1, "local": 0.5}[view]
        assert abs(len(f["blur"]) / n - pb) <= 4.5 * math.sqrt(pb * (1 - pb) / n) + 1e-12
        # blur radius ~ U[0.1, 2]
        if len(r["blur"]) > 20 and len(f["blur"]) > 20:
            assert _ks_ok(r["blur"], f["blur"]), view
    # jitter factors and order, pooled over views
    rj = [j for v in ref.values() for j in v["jitter"]]
    fj = [j for v in fast.values() for j in v["jitter"]]
    for k, (lo, hi) in zip(range(1, 5), ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))):
        a, b = [j[k] for j in rj], [j[k] for j in fj]
        assert _ks_ok(a, b), k
        assert lo <= min(b) and max(b) <= hi
    # op order: a uniformly random permutation of the four operations (chi-square over the 24 permutations)
    for sample in (rj, fj):
        counts = {}
        for j in sample:
            counts[tuple(j[0])] = counts.get(tuple(j[0]), 0) + 1
        assert len(counts) == 24
        e = len(sample) / 24
        chi2 = sum((c - e) ** 2 / e for c in counts.values())
        assert chi2 < 60  # 23 degrees of freedom: P(chi2 > 60) ~ 4e-5
