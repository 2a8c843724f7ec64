"""``dinokit attention-video`` (reference ``video_generation.py``): the maps against an independent computation,
the video's frames, rate and size, folders of frames, streaming in batches, and one-line errors."""

from __future__ import annotations

import json

import cv2
import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.cli import main
from dinokit.eval.attention_video import attention_frame, mean_attention, open_frames, write_attention_video
from dinokit.models import build_backbone

COMMON = ["--device", "cpu", "--no-progress"]


def _frames(n=7, h=50, w=70):
    """A bright square moving right over a dark background: RGB uint8 arrays."""
    out = []
    for i in range(n):
        f = np.full((h, w, 3), 40, np.uint8)
        f[10:30, 5 + 4 * i:25 + 4 * i] = (255, 200, 0)
        out.append(f)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attnvideo")
    torch.manual_seed(0)
    model = build_backbone("vit_custom", patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32).eval()
    ckpt = tmp / "ck.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                "config": {"arch": "vit_custom", "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}, ckpt)
    frames = _frames()
    folder = tmp / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    video = tmp / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 12.5, (70, 50))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return tmp, model, ckpt, frames, folder, video


def _independent_mean_map(model, rgb: np.ndarray, patch: int = 8) -> np.ndarray:
    """The reference's per-frame computation written out: ToTensor, ImageNet normalisation, crop to a multiple
    of the patch, CLS -> patch attention of the last block, mean over heads."""
    x = torch.from_numpy(rgb).permute(2, 0, 1).double() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225], dtype=torch.float64)[:, None, None]
    h, w = x.shape[1] - x.shape[1] % patch, x.shape[2] - x.shape[2] % patch
    with torch.no_grad():
        attn = model.get_last_selfattention(x[None, :, :h, :w].float())
    heads = attn.shape[1]
    return attn[0, :, 0, 1:].reshape(heads, h // patch, w // patch).mean(0).numpy()


def _imsave_colours(mean_map: np.ndarray, patch: int = 8) -> np.ndarray:
    """What the reference writes: nearest ×patch upsampling, then plt.imsave's min-max normalised inferno."""
    up = np.kron(mean_map, np.ones((patch, patch)))
    v = (up - up.min()) / (up.max() - up.min())
    return (np.asarray(matplotlib.colormaps["inferno"](v))[..., :3] * 255).round()


def test_maps_and_frames_equal_the_reference_computation(setup, tmp_path, capsys):
    _, model, ckpt, frames, folder, _ = setup
    out = tmp_path / "out"
    assert main(["attention-video", "--weights", str(ckpt), "--input", str(folder), "--out", str(out),
                 "--batch-size", "3", *COMMON]) == 0
    assert "7 frames, 64x48 px (WxH) at 30 fps" in capsys.readouterr().out  # a folder: the reference's 30 fps
    maps = np.load(out / "attention.npy")
    assert maps.shape == (7, 6, 8) and maps.dtype == np.float32
    for i, f in enumerate(frames):
        expected = _independent_mean_map(model, f)
        np.testing.assert_allclose(maps[i], expected, rtol=1e-5, atol=1e-7)
        png = np.asarray(Image.open(out / "attention" / f"attn-{i:03d}.png"), dtype=np.float64)
        assert png.shape == (48, 64, 3)
        # 256 colour levels (ours) against matplotlib's continuous map: at most one level apart
        assert np.abs(png - _imsave_colours(expected)).max() <= 12
        assert np.argmax(maps[i]) // 8 in (1, 2, 3)  # the bright square's rows of patches draw the attention
    record = json.loads((out / "attention_video.json").read_text())
    assert (record["frames"], record["fps"], record["width"], record["height"]) == (7, 30.0, 64, 48)
    assert record["model"]["num_heads"] == 2
    cap = cv2.VideoCapture(str(out / "video.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 7 and cap.get(cv2.CAP_PROP_FPS) == pytest.approx(30.0)
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (64, 48)


def test_a_video_file_keeps_its_rate_and_frame_count(setup, tmp_path, capsys):
    _, model, ckpt, _, _, video = setup
    frames, fps, count = open_frames(video)
    decoded = list(frames)
    assert fps == pytest.approx(12.5) and count == 7 and len(decoded) == 7
    assert decoded[0][0] == "frame-00000" and decoded[0][1].size == (70, 50)
    out = tmp_path / "out"
    assert main(["attention-video", "--weights", str(ckpt), "--input", str(video), "--out", str(out),
                 "--format", "avi", "--overlay", "--no-frames", "--image-size", "96", *COMMON]) == 0
    assert "7 frames, 128x96 px (WxH) at 12.5 fps" in capsys.readouterr().out
    assert not (out / "attention").exists() and np.load(out / "attention.npy").shape == (7, 12, 16)
    cap = cv2.VideoCapture(str(out / "video.avi"))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(12.5) and cap.get(cv2.CAP_PROP_FRAME_COUNT) == 7
    assert main(["attention-video", "--weights", str(ckpt), "--input", str(video), "--out", str(out),
                 "--fps", "5", "--max-frames", "3", *COMMON]) == 0
    assert "3 frames, 64x48 px (WxH) at 5 fps" in capsys.readouterr().out
    assert len(list((out / "attention").iterdir())) == 3


def test_batches_give_the_maps_of_single_frames_and_overlay_blends(setup, tmp_path):
    _, model, _, frames, folder, _ = setup
    one = write_attention_video(model, folder, tmp_path / "a", batch_size=1, save_frames=False)
    many = write_attention_video(model, folder, tmp_path / "b", batch_size=4, save_frames=False)
    assert one["frames"] == many["frames"] == 7
    np.testing.assert_allclose(np.load(many["maps"]), np.load(one["maps"]), rtol=1e-5, atol=1e-7)
    image = Image.fromarray(frames[0][:48, :64])
    m = np.load(one["maps"])[0]
    heat = attention_frame(m, image).astype(np.float64)
    mixed = attention_frame(m, image, overlay=True).astype(np.float64)
    assert np.abs(mixed - (0.5 * np.asarray(image) + 0.5 * heat)).max() <= 0.5
    with torch.no_grad():
        direct = mean_attention(model, torch.zeros(2, 3, 16, 24))
    assert direct.shape == (2, 2, 3)


def _fails(argv, capsys, message):
    rc = main(["attention-video", *argv, *COMMON])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys):
    tmp, _, ckpt, _, folder, video = setup
    out = tmp_path / "out"
    base = ["--weights", str(ckpt), "--out", str(out)]
    (tmp_path / "notes.mp4").write_text("not a video")
    (tmp_path / "empty").mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (64, 48)).save(mixed / "a.png")
    Image.new("RGB", (48, 64)).save(mixed / "b.png")
    cnn = tmp_path / "cnn.pth"
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), cnn)
    _fails([*base, "--input", str(tmp_path / "missing.mp4")], capsys, "video or frame folder not found")
    _fails([*base, "--input", str(tmp_path / "notes.mp4")], capsys, "cannot decode")
    _fails([*base, "--input", str(tmp_path / "empty")], capsys, "no image files")
    _fails([*base, "--input", str(video), "--fps", "0"], capsys, "--fps must be > 0")
    _fails([*base, "--input", str(video), "--image-size", "0"], capsys, "--image-size takes one positive")
    _fails([*base, "--input", str(video), "--colormap", "nope"], capsys, "unknown colour map 'nope'")
    _fails(["--weights", str(cnn), "--out", str(out), "--input", str(video)], capsys, "needs a ViT")
    _fails([*base, "--input", str(video), "--image-size", "4"], capsys, "smaller than one 8-pixel patch")
    assert not out.exists()
    _fails([*base, "--input", str(mixed)], capsys, "frame b is 64x48 px (HxW) after preparation, the first frame "
                                                    "48x64: a video needs one size; give --image-size H W")
    assert not (out / "video.mp4").exists()  # no partial video left behind
    # the video's own output as its input would be overwritten while it is read
    own = tmp_path / "own"
    own.mkdir()
    (own / "video.mp4").write_bytes(video.read_bytes())
    _fails(["--weights", str(ckpt), "--out", str(own), "--input", str(own / "video.mp4")], capsys,
           "the --input video itself")
    assert (own / "video.mp4").read_bytes() == video.read_bytes()


def _digest(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_or_interrupted_run_leaves_the_previous_results_and_a_new_one_replaces_them(setup, tmp_path,
                                                                                            capsys, monkeypatch):
    """A failed run deleted the previous video but left its JSON and maps; a shorter rerun left the older frame
    images beside the new ones."""
    _, _, ckpt, _, folder, _ = setup
    out = tmp_path / "out"
    base = ["--weights", str(ckpt), "--out", str(out), *COMMON]
    assert main(["attention-video", *base, "--input", str(folder)]) == 0
    before = _digest(out)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (64, 48)).save(mixed / "a.png")
    Image.new("RGB", (48, 64)).save(mixed / "b.png")
    assert main(["attention-video", *base, "--input", str(mixed)]) == 2
    import dinokit.eval.attention_video as av

    calls = [0]
    real = av.attention_frame

    def interrupted(*a, **k):  # Ctrl-C at the third frame
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(av, "attention_frame", interrupted)
    assert main(["attention-video", *base, "--input", str(folder)]) == 130  # "interrupted"
    monkeypatch.undo()
    assert _digest(out) == before and not [p for p in out.iterdir() if p.name.startswith(".")]
    capsys.readouterr()
    assert main(["attention-video", *base, "--input", str(folder), "--max-frames", "2"]) == 0
    assert sorted(p.name for p in (out / "attention").iterdir()) == ["attn-000.png", "attn-001.png"]
    assert np.load(out / "attention.npy").shape[0] == 2
    assert main(["attention-video", *base, "--input", str(folder), "--no-frames"]) == 0
    assert not (out / "attention").exists() and json.loads((out / "attention_video.json").read_text())["frames"] == 7


def test_hard_links_odd_sizes_and_frames_sharing_a_name(setup, tmp_path, capsys):
    import os

    _, _, _, frames, _, video = setup
    # a hard link of the input named video.mp4 in --out: refused (os.replace would keep the input, but the link
    # the user made to it would become the attention video)
    linked = tmp_path / "linked"
    linked.mkdir()
    os.link(video, linked / "video.mp4")
    torch.manual_seed(0)
    p7 = build_backbone("vit_custom", patch_size=7, embed_dim=28, depth=1, num_heads=2, img_size=28).eval()
    weights = tmp_path / "p7.pth"
    torch.save(p7.state_dict(), weights)
    common = ["--weights", str(weights), "--num-heads", "2", *COMMON]
    _fails([*common, "--input", str(linked / "video.mp4"), "--out", str(linked)], capsys, "the --input video itself")
    # frames of 70 x 49 px (patch 7): the video is 70 x 48, and says so
    odd = tmp_path / "odd"
    odd.mkdir()
    for i, f in enumerate(frames[:3]):
        Image.fromarray(f[:49, :70]).save(odd / f"f{i}.png")
    Image.fromarray(frames[3][:49, :70]).save(odd / "f1.jpg")  # f1.png and f1.jpg: both frames kept
    out = tmp_path / "out"
    assert main(["attention-video", *common, "--input", str(odd), "--out", str(out)]) == 0
    assert "4 frames, 70x48 px (WxH) (frames 70x49: video sizes are even)" in capsys.readouterr().out
    rec = json.loads((out / "attention_video.json").read_text())
    assert (rec["width"], rec["height"], rec["frame_width"], rec["frame_height"]) == (70, 48, 70, 49)
    cap = cv2.VideoCapture(str(out / "video.mp4"))
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (70, 48)
    assert sorted(p.name for p in (out / "attention").iterdir()) == ["attn-f0.png", "attn-f1.jpg.png",
                                                                     "attn-f1.png.png", "attn-f2.png"]
    assert Image.open(out / "attention" / "attn-f0.png").size == (70, 49) and np.load(out / "attention.npy").shape == (
        4, 7, 10)


def test_frames_without_zero_padding_are_taken_in_number_order(tmp_path):
    """f10.png sorted before f2.png: a folder of unpadded frame names gave a scrambled video."""
    from dinokit.eval.attention_video import open_frames

    for i in (0, 1, 2, 10, 11, 3):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(tmp_path / f"f{i}.png")
    frames, _, count = open_frames(tmp_path)
    got = [(name, img.getpixel((0, 0))[0]) for name, img in frames]
    assert count == 6 and got == [(f"f{i}", i * 20) for i in (0, 1, 2, 3, 10, 11)]


def test_a_single_image_is_pointed_to_dinokit_attention(tmp_path):
    """It became a one-frame video at OpenCV's invented 25 fps."""
    from dinokit.errors import DataError
    from dinokit.eval.attention_video import open_frames

    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    with pytest.raises(DataError, match=r"x.png is an image, not a video: dinokit attention --image"):
        open_frames(tmp_path / "x.png")


def test_an_animated_gif_is_a_video_not_a_refused_image(tmp_path):
    from dinokit.eval.attention_video import open_frames

    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(4)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    it, _, _ = open_frames(tmp_path / "anim.gif")
    assert len(list(it)) == 4
