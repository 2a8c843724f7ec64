"""Safe weight loading (dinokit.weights): every checkpoint format of dino-reference.md §5, refusal of unsafe
or broken files, strict architecture checks."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch

from dinokit.errors import CheckpointError
from dinokit.head import DINOHead
from dinokit.models import build_backbone
from dinokit.weights import (
    extract_backbone_state_dict,
    infer_arch,
    load_backbone,
    load_state_dict_strict,
    safe_load,
)
from dinokit.wrapper import MultiCropWrapper

from .helpers import reference_module

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _tiny(embed_dim=32, depth=2, heads=2, patch=8, img=32):
    return build_backbone("vit_custom", patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=heads,
                          img_size=img).eval()


def _same_features(a, b, x=X):
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5, rtol=1e-5)




# --------------------------------------------------------------------------------------- dinokit format

@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_dinokit_trainer_checkpoint(tmp_path, prefix):
    student = MultiCropWrapper(_tiny(), DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16))
    teacher = MultiCropWrapper(_tiny(), DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16))
    opt = torch.optim.AdamW(student.parameters())
    student(X).sum().backward()
    opt.step()
    ckpt = {"student": {prefix + k: v for k, v in student.state_dict().items()},
            "teacher": {prefix + k: v for k, v in teacher.state_dict().items()},
            "optimizer": opt.state_dict(), "epoch": 3, "dino_loss": {"center": torch.zeros(1, 64)},
            "config": {"arch": "vit_custom", "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                       "global_crop_size": 32, "lr": 5e-4, "global_crops_scale": [0.4, 1.0]}}
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    m = load_backbone(tmp_path / "checkpoint.pth")
    assert m.dinokit_arch == {"arch": "vit_custom", "patch_size": 8, "embed_dim": 32, "depth": 2,
                              "num_heads": 2, "img_size": 32}
    assert not m.training and _same_features(m, teacher.backbone)
    s = load_backbone(tmp_path / "checkpoint.pth", checkpoint_key="student")
    assert _same_features(s, student.backbone)
    with pytest.raises(CheckpointError, match="no 'ema' entry.*student, teacher"):
        load_backbone(tmp_path / "checkpoint.pth", checkpoint_key="ema")


# -------------------------------------------------------------------------------------- official formats

def _official_full_checkpoint(path, ref, weight_norm_style):
    """Shaped like the reference's checkpoint.pth: DDP student, bare teacher, AdamW state, fp16 scaler,
    dino_loss center and a pickled argparse.Namespace."""
    def wrapper():
        vit = ref.build_vit("vit_tiny", 16, 224, 0.0)
        return ref.MultiCropWrapper(vit, ref.DINOHead(192, 64, True, 32, 16))

    student, teacher = wrapper(), wrapper()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student(torch.randn(1, 3, 32, 32)).sum().backward()
    opt.step()

    def restyle(sd):
        if weight_norm_style == "weight_g":
            return sd
        ren = {"weight_g": "parametrizations.weight.original0",
               "weight_v": "parametrizations.weight.original1"}
        return {".".join(k.split(".")[:-1] + [ren[k.split(".")[-1]]]) if k.endswith(tuple(ren)) else k: v
                for k, v in sd.items()}

    args = argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=64, norm_last_layer=True, lr=0.0005,
                              global_crops_scale=(0.4, 1.0), local_crops_number=8,
                              data_path="/path/to/imagenet", use_fp16=True, momentum_teacher=0.996,
                              dist_url="env://")
    torch.save({"student": restyle({"module." + k: v for k, v in student.state_dict().items()}),
                "teacher": restyle(teacher.state_dict()), "optimizer": opt.state_dict(), "epoch": 100,
                "args": args, "dino_loss": {"center": torch.randn(1, 64)},
                "fp16_scaler": torch.amp.GradScaler("cpu").state_dict()}, path)
    return student, teacher


@pytest.mark.parametrize("style", ["weight_g", "parametrizations"])
def test_official_full_checkpoint(tmp_path, style):
    ref = reference_module()
    student, teacher = _official_full_checkpoint(tmp_path / "full.pth", ref, style)
    obj = safe_load(tmp_path / "full.pth")  # argparse.Namespace allowed, nothing else
    assert isinstance(obj["args"], argparse.Namespace) and obj["args"].arch == "vit_tiny"
    t = load_backbone(tmp_path / "full.pth")
    assert t.dinokit_arch["arch"] == "vit_tiny" and t.dinokit_arch["patch_size"] == 16
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(t(x), teacher.eval().backbone(x), atol=1e-5)
        s = load_backbone(tmp_path / "full.pth", checkpoint_key="student")
        assert torch.allclose(s(x), student.eval().backbone(x), atol=1e-5)
    sd = extract_backbone_state_dict(obj, "student")
    assert len(sd) == 150 and not any(k.startswith(("module.", "backbone.", "head.")) for k in sd)


def test_reference_format_state_dict_features_equal_direct_forward(tmp_path):
    """A backbone-only release (bare reference state dict, 150 keys for a 12-block ViT) gives the features of
    the reference implementation itself."""
    ref = reference_module()
    vit = ref.build_vit("vit_tiny", 16, 224, 0.0).eval()
    torch.save(vit.state_dict(), tmp_path / "dino_vittiny16_pretrain.pth")
    m = load_backbone(tmp_path / "dino_vittiny16_pretrain.pth")
    x = torch.randn(2, 3, 48, 64)  # non-square: exercises the interpolated position embedding
    with torch.no_grad():
        assert torch.allclose(m(x), vit(x), atol=1e-5)


def test_bare_backbone_and_torchvision_resnet(tmp_path):
    vit = _tiny(embed_dim=64, heads=1)
    torch.save(vit.state_dict(), tmp_path / "bare.pth")
    with pytest.warns(UserWarning, match="attention heads"):
        m = load_backbone(tmp_path / "bare.pth")
    assert m.dinokit_arch["num_heads"] == 1 and _same_features(m, vit)
    # ResNet release: torchvision keys, no fc
    rn = build_backbone("resnet18").eval()
    sd = {k: v for k, v in rn.state_dict().items() if not k.startswith("fc.")}
    assert infer_arch(sd)["arch"] == "resnet18"
    torch.save(sd, tmp_path / "rn.pth")
    m = load_backbone(tmp_path / "rn.pth")
    with torch.no_grad():
        assert torch.allclose(m(X), rn(X), atol=1e-5)


def test_infer_torchvision_resnet_variants():
    import torchvision

    for name in ("resnet50", "wide_resnet50_2", "resnext50_32x4d"):
        sd = {k: v for k, v in getattr(torchvision.models, name)().state_dict().items()}
        assert infer_arch(sd)["arch"] == name


def test_timm_vit_keys(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    tv = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=10)
    tv.eval()
    torch.save(tv.state_dict(), tmp_path / "timm.pth")  # includes a classifier head.weight / head.bias
    m = load_backbone(tmp_path / "timm.pth", num_heads=1)
    with torch.no_grad():
        assert torch.allclose(m(X), tv.forward_head(tv.forward_features(X), pre_logits=True), atol=1e-5)


def test_safetensors_roundtrip(tmp_path):
    from safetensors.torch import save_file

    vit = _tiny()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "w.safetensors"),
              metadata={"format": "dinokit", "arch": "vit_custom", "num_heads": "2"})
    m = load_backbone(tmp_path / "w.safetensors")
    assert m.dinokit_arch["num_heads"] == 2 and _same_features(m, vit)
    # a renamed safetensors file is recognised by its header
    os.replace(tmp_path / "w.safetensors", tmp_path / "w.bin")
    assert _same_features(load_backbone(tmp_path / "w.bin"), vit)


# ---------------------------------------------------------------------------------------------- refusals

class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickles_are_refused_without_side_effect(tmp_path):
    target = tmp_path / "pwned"
    torch.save({"teacher": {"x": torch.zeros(1)}, "args": _Evil(target)}, tmp_path / "evil.pth")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"w": _Evil(target)}, protocol=2))
    for name in ("evil.pth", "evil.pkl"):
        with pytest.raises(CheckpointError, match=f"refused to load {tmp_path / name}"):
            safe_load(tmp_path / name)
        with pytest.raises(CheckpointError, match="refused"):
            load_backbone(tmp_path / name)
    assert not target.exists()


def test_broken_files(tmp_path):
    (tmp_path / "notes.txt").write_text("this is not a checkpoint\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for name in ("notes.txt", "empty.pth", "trunc.pth", "bad.safetensors", "missing.pth"):
        with pytest.raises(CheckpointError) as e:
            load_backbone(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)
    # what a file that cannot be a checkpoint is, said plainly (not "the unpickler rejects operand 255")
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "photo.jpg")
    for name, kind in (("photo.jpg", "a JPEG image"), ("notes.txt", "a text file"), ("empty.pth", "empty")):
        with pytest.raises(CheckpointError, match=rf"is not a weights file: it is {kind}\. Pass a \.pth"):
            load_backbone(tmp_path / name)
    # random bytes are not "refused because they could run code"; a checkpoint renamed .safetensors says so
    (tmp_path / "random.pth").write_bytes(bytes(range(7, 250)) * 3)
    with pytest.raises(CheckpointError, match=r"random.pth is not a weights file: it is neither a zip archive nor a "
                                              r"pickle \(corrupt, or another format\)"):
        load_backbone(tmp_path / "random.pth")
    (tmp_path / "ok.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"ok.safetensors is named \.safetensors but is a PyTorch checkpoint "
                                              r"\(rename it to \.pth\)"):
        load_backbone(tmp_path / "ok.safetensors")
    (tmp_path / "notes.safetensors").write_text("not tensors")
    with pytest.raises(CheckpointError, match="named .safetensors but is a text file"):
        load_backbone(tmp_path / "notes.safetensors")
    with pytest.raises(CheckpointError, match="directory"):
        safe_load(tmp_path)
    torch.save({"epoch": 3, "notes": "no tensors"}, tmp_path / "nodict.pth")
    with pytest.raises(CheckpointError, match="no tensors"):
        load_backbone(tmp_path / "nodict.pth")


def test_wrong_arch_lists_keys(tmp_path):
    torch.save(_tiny().state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as e:
        load_backbone(tmp_path / "w.pth", arch="vit_tiny")
    msg = str(e.value)
    assert "do not fit vit_tiny" in msg and "missing keys (blocks.2." in msg
    assert "shape mismatches (cls_token: file [1, 1, 32] vs model [1, 1, 192]" in msg
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_state_dict_strict(_tiny(depth=1), _tiny().state_dict())
    with pytest.raises(CheckpointError, match="cannot infer the architecture"):
        infer_arch({"foo.weight": torch.zeros(2)})
