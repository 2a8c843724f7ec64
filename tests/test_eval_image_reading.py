"""The evaluation loaders (retrieval, copy detection, DAVIS frames, attention maps) read images exactly as
``dinokit.data.load_image`` does: 16-bit images rescaled (not clipped to white), EXIF orientation applied."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data import load_image
from dinokit.eval.attention import prepare_image
from dinokit.eval.davis import read_frame
from dinokit.eval.retrieval import as_rgb, load_rgb, square_loader, thumbnail_loader

ROTATE_90_CW = 6  # EXIF orientation: the stored pixels must be turned 90° clockwise to be upright


def _picture(h=48, w=80) -> np.ndarray:
    """An asymmetric uint8 RGB picture (orientation mistakes change it), mid-grey on average."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 3 + 20) % 230, (y * 5 + 10) % 240, (x + 2 * y) % 200 + 30], axis=-1).astype(np.uint8)
    a[: h // 3, : w // 4] = (250, 20, 20)  # a red block in the top-left corner
    return a


@pytest.fixture
def files(tmp_path):
    """``{name: path}``: an 8-bit greyscale PNG and the same picture as a 16-bit PNG; an upright RGB PNG and the
    same pixels stored turned with an EXIF orientation (lossless PNG); an EXIF-rotated JPEG."""
    grey = _picture()[..., 1]
    Image.fromarray(grey, "L").save(tmp_path / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # mode I;16, 0..65535
    up = Image.fromarray(_picture())
    up.save(tmp_path / "upright.png")
    stored = up.transpose(Image.Transpose.ROTATE_90)  # what orientation 6 turns back upright
    exif = Image.Exif()
    exif[0x0112] = ROTATE_90_CW
    stored.save(tmp_path / "exif6.png", exif=exif.tobytes())
    stored.save(tmp_path / "exif6.jpg", exif=exif.tobytes(), quality=95)
    return {p.stem + p.suffix: p for p in tmp_path.iterdir()}


def test_fixture_files_are_what_they_claim(files):
    with Image.open(files["grey16.png"]) as im:
        assert im.mode in ("I;16", "I") and np.asarray(im).max() > 255
        assert np.asarray(im.convert("RGB")).mean() > 240  # PIL's own conversion clips it to white: the bug
    with Image.open(files["exif6.jpg"]) as im:
        assert im.size == (48, 80) and im.getexif()[0x0112] == ROTATE_90_CW
    assert load_image(files["exif6.png"]).size == (80, 48)
    assert np.array_equal(np.asarray(load_image(files["exif6.png"])), _picture())
    assert np.array_equal(np.asarray(load_image(files["grey16.png"])), np.asarray(load_image(files["grey8.png"])))


def _norm(img: Image.Image) -> torch.Tensor:
    from dinokit.eval.retrieval import IMAGENET_MEAN, IMAGENET_STD

    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.mark.parametrize("name", ["grey16.png", "exif6.png", "exif6.jpg"])
def test_retrieval_and_copydetect_loaders_read_as_load_image(files, name):
    path = files[name]
    ref = load_image(path)
    assert np.array_equal(np.asarray(load_rgb(path)), np.asarray(ref))
    for imsize in (None, 40, 64):  # no resize, shrink, and larger than the 80-px side (a thumbnail never enlarges)
        expect = ref.copy()
        if imsize:
            expect.thumbnail((imsize, imsize), Image.Resampling.LANCZOS)
        got = thumbnail_loader(imsize)(path)
        assert got.shape == (3, expect.height, expect.width) and torch.equal(got, _norm(expect)), imsize
    bbox = (4.0, 6.0, 44.0, 30.0)  # query crop, in the oriented image
    expect = ref.crop((4, 6, 44, 30))
    expect.thumbnail((32 * 40 / 80, 32 * 40 / 80), Image.Resampling.LANCZOS)
    assert torch.equal(thumbnail_loader(32, bbox)(path), _norm(expect))
    expect = ref.resize((56, 56), Image.Resampling.BICUBIC)  # copy detection
    assert torch.equal(square_loader(56)(path), _norm(expect))


def test_16bit_and_exif_images_give_their_8bit_upright_pictures(files):
    """Against independent sources: the 8-bit PNG of the same picture and the upright lossless PNG."""
    for a, b in (("grey16.png", "grey8.png"), ("exif6.png", "upright.png")):
        assert torch.equal(thumbnail_loader(40)(files[a]), thumbnail_loader(40)(files[b])), a
        assert torch.equal(square_loader(32)(files[a]), square_loader(32)(files[b])), a
        assert torch.equal(read_frame(files[a], short_side=32, multiple=8)[0],
                           read_frame(files[b], short_side=32, multiple=8)[0]), a
        with Image.open(files[a]) as im, Image.open(files[b]) as jm:
            xa, shown_a = prepare_image(im, 24, 8)
            xb, shown_b = prepare_image(jm, 24, 8)
        assert torch.equal(xa, xb) and np.array_equal(np.asarray(shown_a), np.asarray(shown_b)), a
    mean = float(np.asarray(load_rgb(files["grey16.png"])).mean())
    assert mean == pytest.approx(_picture()[..., 1].mean(), abs=0.01)  # not white (255)


@pytest.mark.parametrize("name", ["grey16.png", "exif6.jpg"])
def test_davis_frames_read_as_load_image(files, name):
    path = files[name]
    ref = load_image(path)
    x, h, w = read_frame(path, short_side=32, multiple=8)
    assert (h, w) == (ref.height, ref.width) == (48, 80)
    assert torch.equal(x, read_frame(ref, short_side=32, multiple=8)[0])
    with Image.open(path) as im:  # a PIL image handed to the API is converted the same way
        assert torch.equal(x, read_frame(im, short_side=32, multiple=8)[0])


@pytest.mark.parametrize("name", ["grey16.png", "exif6.jpg"])
def test_attention_prepare_image_reads_as_load_image(files, name):
    ref = load_image(files[name])
    x_ref, shown_ref = prepare_image(ref, 24, 8)
    with Image.open(files[name]) as im:
        x, shown = prepare_image(im, 24, 8)
        assert im.mode != "RGB" or im.size == (48, 80)  # the caller's image is left as it was
    assert shown.size == shown_ref.size == (40, 24)
    assert torch.equal(x, x_ref) and np.array_equal(np.asarray(shown), np.asarray(shown_ref))


def test_as_rgb_returns_a_new_image_and_applies_orientation_once(files):
    up = load_image(files["upright.png"])
    out = as_rgb(up)
    assert out is not up and np.array_equal(np.asarray(out), np.asarray(up))
    once = as_rgb(Image.open(files["exif6.png"]))
    assert np.array_equal(np.asarray(as_rgb(once)), _picture())  # the orientation tag is consumed
