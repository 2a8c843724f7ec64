"""Backbone export to safetensors (dinokit.export), timm compatibility, and the hub entry points."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dinokit.errors import CheckpointError
from dinokit.export import export_backbone, timm_name_for
from dinokit.head import DINOHead
from dinokit.models import build_backbone
from dinokit.weights import load_backbone
from dinokit.wrapper import MultiCropWrapper

ROOT = Path(__file__).resolve().parents[1]


def test_export_roundtrip_bit_exact(tmp_path):
    def wrapper():
        backbone = build_backbone("vit_custom", patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32)
        return MultiCropWrapper(backbone, DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16))

    student, teacher = wrapper(), wrapper()
    torch.save({"student": {"module." + k: v for k, v in student.state_dict().items()},
                "teacher": teacher.state_dict(), "epoch": 1,
                "config": {"arch": "vit_custom", "patch_size": 8, "embed_dim": 32, "depth": 2,
                           "num_heads": 2}},
               tmp_path / "checkpoint.pth")
    info = export_backbone(tmp_path / "checkpoint.pth", tmp_path / "backbone.safetensors")
    tensors = load_file(str(tmp_path / "backbone.safetensors"))
    want = teacher.backbone.state_dict()
    assert set(tensors) == set(want)
    assert all(torch.equal(tensors[k], want[k]) for k in want)
    with safe_open(str(tmp_path / "backbone.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "dinokit" and meta["arch"] == "vit_custom" and meta["num_heads"] == "2"
    assert (meta["patch_size"], meta["embed_dim"], meta["depth"], meta["img_size"]) == ("8", "32", "2", "32")
    assert info["n_tensors"] == len(want) and "timm_name" not in info
    # loading the export needs no --arch and gives bit-identical features
    m = load_backbone(tmp_path / "backbone.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), teacher.backbone.eval()(x))
    # the student, via --checkpoint-key
    export_backbone(tmp_path / "checkpoint.pth", tmp_path / "student.safetensors", checkpoint_key="student")
    s = load_file(str(tmp_path / "student.safetensors"))
    assert all(torch.equal(s[k], v) for k, v in student.backbone.state_dict().items())
    # exporting an export is the identity
    export_backbone(tmp_path / "backbone.safetensors", tmp_path / "again.safetensors")
    again = load_file(str(tmp_path / "again.safetensors"))
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_export_refuses_garbage(tmp_path):
    (tmp_path / "x.pth").write_text("nope")
    with pytest.raises(CheckpointError, match="x.pth"):
        export_backbone(tmp_path / "x.pth", tmp_path / "y.safetensors")
    assert not (tmp_path / "y.safetensors").exists()


def test_timm_name_for():
    assert timm_name_for({"arch": "vit_small", "patch_size": 16}) == "vit_small_patch16_224.dino"
    assert timm_name_for({"arch": "vit_small", "patch_size": 8}) == "vit_small_patch8_224.dino"
    assert timm_name_for({"arch": "vit_base", "patch_size": "16"}) == "vit_base_patch16_224.dino"
    assert timm_name_for({"arch": "deit_base", "patch_size": 8}) == "vit_base_patch8_224.dino"
    assert timm_name_for({"arch": "vit_tiny", "patch_size": 16}) == "vit_tiny_patch16_224"
    assert timm_name_for({"arch": "vit_custom", "patch_size": 16}) is None
    assert timm_name_for({"arch": "resnet50", "patch_size": None}) is None


def test_timm_loads_the_export_with_equal_features(tmp_path):
    timm = pytest.importorskip("timm")
    model = build_backbone("vit_tiny", patch_size=16).eval()
    teacher = {"backbone." + k: v for k, v in model.state_dict().items()}
    torch.save({"teacher": teacher}, tmp_path / "ckpt.pth")
    info = export_backbone(tmp_path / "ckpt.pth", tmp_path / "vit_tiny16.safetensors")
    assert info["timm_name"] == "vit_tiny_patch16_224"
    path = str(tmp_path / "vit_tiny16.safetensors")
    # file= makes timm read the local file (no network); num_classes=0 on both sides keeps its load strict
    tm = timm.create_model(info["timm_name"], pretrained=True, num_classes=0,
                           pretrained_cfg_overlay=dict(file=path, num_classes=0)).eval()
    assert set(tm.state_dict()) == set(load_file(path))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = model(x), tm(x)
    assert ours.shape == theirs.shape == (1, 192)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_hub_entry_points_load_local_weights(tmp_path):
    from dinokit import hub

    vit = build_backbone("vit_small", patch_size=16).eval()
    torch.save(vit.state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")
    m = torch.hub.load(str(ROOT), "dino_vits16", source="local",
                       weights=str(tmp_path / "dino_deitsmall16_pretrain.pth"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), vit(x))
    with pytest.raises(CheckpointError, match="do not fit vit_base"):
        hub.dino_vitb16(weights=tmp_path / "dino_deitsmall16_pretrain.pth")
    assert hub.dino_vits8().patch_embed.proj.kernel_size == (8, 8)
    # the reference's pretrained= keyword (it downloads): False is random weights, True needs a local file
    m = torch.hub.load(str(ROOT), "dino_vits16", source="local", pretrained=False)
    assert m.pos_embed.shape == (1, 197, 384)
    for entry in (hub.dino_vits16, hub.dino_resnet50):
        with pytest.raises(CheckpointError, match="dinokit never downloads weights: pass weights=<local file>"):
            entry(pretrained=True)
    assert torch.equal(hub.dino_vits16(weights=tmp_path / "dino_deitsmall16_pretrain.pth", pretrained=True).eval()(x),
                       vit(x))
    torch.save({"teacher": vit.state_dict(), "student": vit.state_dict()}, tmp_path / "full.pth")
    with pytest.raises(CheckpointError, match=r"has no 'bogus' entry .*; choose one with checkpoint_key=$"):
        hub.dino_vits16(weights=tmp_path / "full.pth", checkpoint_key="bogus")
    rn = hub.dino_resnet50()
    assert isinstance(rn.fc, torch.nn.Identity)


def test_hub_entry_points_take_weights_trained_at_another_size_and_advise_in_python_terms(tmp_path):
    """A run trained at 32 px stores a 2x2 position grid: the entry point builds the model at that size (it was
    refused as not fitting, with advice naming the CLI's --arch/--patch-size)."""
    from dinokit import hub

    vit = build_backbone("vit_small", patch_size=16, img_size=32).eval()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}, tmp_path / "ckpt.pth")
    m = hub.dino_vits16(weights=tmp_path / "ckpt.pth").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert m.pos_embed.shape == (1, 5, 384) and torch.equal(m(x), vit(x))
    with pytest.raises(CheckpointError, match=r"do not fit vit_small \(patch 8\).*Use the entry point of the "
                                              r"architecture the weights were trained with") as e:
        hub.dino_vits8(weights=tmp_path / "ckpt.pth")
    assert "--arch" not in str(e.value)


def _tiny_checkpoint(path):
    net = MultiCropWrapper(build_backbone("vit_custom", patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=32),
                           DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16))
    torch.save({"student": net.state_dict(), "teacher": net.state_dict(),
                "config": {"arch": "vit_custom", "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}, path)
    return path


def test_export_to_an_unwritable_place_is_one_line_and_loses_nothing(tmp_path, capsys):
    from dinokit.cli import main

    ckpt = _tiny_checkpoint(tmp_path / "checkpoint.pth")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "folder")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder" in err and (tmp_path / "folder" / "keep.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="is a folder"):
        export_backbone(ckpt, tmp_path / "folder")
    if Path("/proc/self").is_dir():  # a file system that refuses new files whatever the permissions say
        assert main(["export", "--checkpoint", str(ckpt), "--out", "/proc/x.safetensors"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "/proc/x.safetensors" in err
        with pytest.raises(CheckpointError, match="cannot write /proc/x.safetensors"):
            export_backbone(ckpt, "/proc/x.safetensors")


def test_hub_refuses_weights_recorded_with_another_head_count(tmp_path):
    """A width-384, depth-12 ViT with 12 heads has ViT-S/16's tensor shapes: dino_vits16 (6 heads) loaded it
    "strictly" and gave other features. The count recorded in a checkpoint's config or an export decides."""
    from dinokit import hub

    vit = build_backbone("vit_custom", patch_size=16, embed_dim=384, depth=12, num_heads=12, img_size=32).eval()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()},
                "config": {"arch": "vit_custom", "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 12}},
               tmp_path / "ckpt.pth")
    torch.save(vit.state_dict(), tmp_path / "bare.pth")  # nothing recorded: the standard count is assumed
    export_backbone(tmp_path / "bare.pth", tmp_path / "bare12.safetensors", num_heads=12)
    for f in ("ckpt.pth", "bare12.safetensors"):
        with pytest.raises(CheckpointError, match=r"trained with 12 attention heads, vit_small has 6: use "
                                                  r"dinokit.weights.load_backbone"):
            hub.dino_vits16(weights=tmp_path / f)
        m = load_backbone(tmp_path / f)  # what the message advises: the same features
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert m.blocks[0].attn.num_heads == 12 and torch.equal(m(x), vit(x))
    assert hub.dino_vits16(weights=tmp_path / "bare.pth").blocks[0].attn.num_heads == 6  # unrecorded: as before
    # num_heads= given: the recorded count must agree (it skipped the check and built what was asked)
    with pytest.raises(CheckpointError, match=r"records 12 attention heads .*num_heads=6 contradicts it"):
        hub.dino_vits16(weights=tmp_path / "ckpt.pth", num_heads=6)
    m = hub.dino_vits16(weights=tmp_path / "bare12.safetensors", num_heads=12).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), vit(x))


def test_export_num_heads_option_records_the_count_of_a_bare_custom_vit(tmp_path, capsys):
    from dinokit.cli import main

    vit = build_backbone("vit_custom", patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=32).eval()
    torch.save(vit.state_dict(), tmp_path / "bare.pth")
    with pytest.warns(UserWarning, match="cannot be read from the weights"):
        export_backbone(tmp_path / "bare.pth", tmp_path / "guess.safetensors")
    with safe_open(str(tmp_path / "guess.safetensors"), "pt") as f:
        assert "num_heads" not in f.metadata()  # a guess is not written as if the file recorded it
    with pytest.warns(UserWarning, match="cannot be read from the weights"):  # so loading the export says so again
        load_backbone(tmp_path / "guess.safetensors")
    assert main(["export", "--checkpoint", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "b.safetensors"),
                 "--num-heads", "2"]) == 0
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        assert f.metadata()["num_heads"] == "2"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_backbone(tmp_path / "b.safetensors")(x), vit(x))
    with pytest.raises(CheckpointError, match="num_heads must be at least 1"):
        export_backbone(tmp_path / "bare.pth", tmp_path / "c.safetensors", num_heads=0)


def test_export_refuses_to_overwrite_its_own_input(tmp_path, capsys):
    from dinokit.cli import main

    ckpt = _tiny_checkpoint(tmp_path / "checkpoint.pth")
    before = ckpt.read_bytes()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "." / "checkpoint.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the checkpoint being exported" in err
    assert ckpt.read_bytes() == before


def test_export_of_a_timm_cnn_prints_a_timm_call_without_img_size(tmp_path, capsys):
    pytest.importorskip("timm")
    from dinokit.cli import main

    net = build_backbone("timm:resnet18")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in net.state_dict().items()},
                "config": {"arch": "timm:resnet18", "global_crop_size": 32}}, tmp_path / "ckpt.pth")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt.pth"), "--out", str(tmp_path / "r.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "timm.create_model('resnet18'" in out and "img_size" not in out
    with safe_open(str(tmp_path / "r.safetensors"), "pt") as f:
        assert "img_size" not in f.metadata()


def test_checkpoints_and_exports_get_the_permissions_of_a_new_file(tmp_path):
    import os
    import stat

    from dinokit.checkpoint import process_umask, save_checkpoint

    old = os.umask(0o022)
    try:
        assert process_umask() == 0o022
        save_checkpoint({"x": torch.zeros(1)}, tmp_path / "c.pth")  # mkstemp alone makes 0600
        assert stat.S_IMODE((tmp_path / "c.pth").stat().st_mode) == 0o644
        export_backbone(_tiny_checkpoint(tmp_path / "checkpoint.pth"), tmp_path / "e.safetensors")
        assert stat.S_IMODE((tmp_path / "e.safetensors").stat().st_mode) == 0o644
        os.umask(0o077)
        save_checkpoint({"x": torch.zeros(1)}, tmp_path / "d.pth")
        assert stat.S_IMODE((tmp_path / "d.pth").stat().st_mode) == 0o600
    finally:
        os.umask(old)
