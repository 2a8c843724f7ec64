"""timm backbones (``--arch timm:<name>``): multi-crop sizes, patch size, unknown names. No weights are downloaded
(every model is built with ``pretrained=False``)."""

import warnings

import pytest
import torch

from dinokit import build_backbone
from dinokit.config import TrainConfig, config_to_dict
from dinokit.errors import ConfigError
from dinokit.models.registry import _NarrowInputSafeConv2d

pytest.importorskip("timm")


def test_timm_vit_accepts_global_and_local_crop_sizes():
    """Built as the trainer builds it (patch_size, no img_size): used to fail on the first local crop with
    ``AssertionError: Input height (96) doesn't match model (224)``."""
    m = build_backbone("timm:vit_tiny_patch16_224", patch_size=16).eval()
    with torch.no_grad():
        for size in (64, 32):
            assert m(torch.randn(2, 3, size, size)).shape == (2, m.num_features) == (2, 192)
    assert type(m.patch_embed.proj) is _NarrowInputSafeConv2d  # the strided-conv guard stays applied


def test_timm_vit_takes_img_size_and_a_non_default_patch_size():
    m = build_backbone("timm:vit_tiny_patch16_224", patch_size=8, img_size=32).eval()
    assert tuple(m.patch_embed.patch_size) == (8, 8) and tuple(m.patch_embed.img_size) == (32, 32)
    assert m.pos_embed.shape == (1, 1 + 4 * 4, 192)
    with torch.no_grad():
        assert m(torch.randn(1, 3, 16, 16)).shape == (1, 192)


def test_timm_model_without_image_or_patch_size_still_builds_and_warns_about_an_ignored_patch_size():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = build_backbone("timm:resnet18", patch_size=16, img_size=32)  # the default patch: no warning
    assert type(r.conv1) is _NarrowInputSafeConv2d
    assert r(torch.randn(2, 3, 32, 32)).shape == (2, r.num_features)
    with pytest.warns(UserWarning, match="timm:resnet18 has no patch size; patch_size 8 is ignored"):
        build_backbone("timm:resnet18", patch_size=8)


def test_unknown_timm_model_is_a_one_line_config_error():
    with pytest.raises(ValueError, match="unknown timm model 'nonexistent_model'"):
        build_backbone("timm:nonexistent_model")
    with pytest.raises(ValueError, match="did you mean timm:vit_tiny_patch16_224"):
        build_backbone("timm:vit_tiny_patch16_22")
    from dinokit.trainer import build_student_teacher

    with pytest.raises(ConfigError, match="unknown timm model 'nonexistent_model'"):
        build_student_teacher(TrainConfig(arch="timm:nonexistent_model", out_dim=16))


def test_student_teacher_on_a_timm_vit_run_multi_crop():
    from dinokit.trainer import build_student_teacher

    cfg = TrainConfig(arch="timm:vit_tiny_patch16_224", global_crop_size=32, local_crop_size=16, out_dim=16,
                      head_hidden_dim=32, head_bottleneck_dim=8).validate()
    student, teacher, dim = build_student_teacher(cfg)
    crops = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 3
    assert dim == 192 and student(crops).shape == (10, 16)
    with torch.no_grad():
        assert teacher(crops[:2]).shape == (4, 16)


def test_the_trainer_builds_timm_vits_at_the_global_crop_size():
    """As for dinokit's ViTs, the position embedding is made for the global crops (the reference's img_size)."""
    from dinokit.config import TrainConfig
    from dinokit.trainer import build_student_teacher

    cfg = TrainConfig(data_path="x", output_dir="o", arch="timm:vit_tiny_patch16_224", global_crop_size=64,
                      local_crop_size=32, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16).validate()
    student, teacher, dim = build_student_teacher(cfg)
    assert dim == 192 and student.backbone.pos_embed.shape[1] == (64 // 16) ** 2 + 1
    out = student([torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)])
    assert out.shape == (4, 64)


def test_crop_sizes_not_divisible_by_a_timm_models_patch_size_are_a_config_error():
    """timm asserts at the first forward (a raw traceback after the run had started); the model's own patch size,
    which its name decides, is checked when the models are built, local crops only when there are any."""
    from dinokit.trainer import build_student_teacher

    small = dict(out_dim=16, head_hidden_dim=32, head_bottleneck_dim=8)
    with pytest.raises(ConfigError, match="global_crop_size 40 is not divisible by the patch size 16 of "
                                          "timm:vit_tiny_patch16_224"):
        build_student_teacher(TrainConfig(arch="timm:vit_tiny_patch16_224", global_crop_size=40,
                                          local_crop_size=16, **small).validate())
    with pytest.raises(ConfigError, match="local_crop_size 24 is not divisible by the patch size 16"):
        build_student_teacher(TrainConfig(arch="timm:vit_tiny_patch16_224", global_crop_size=32,
                                          local_crop_size=24, **small).validate())
    build_student_teacher(TrainConfig(arch="timm:vit_tiny_patch16_224", global_crop_size=32, local_crop_size=24,
                                      local_crops_number=0, **small).validate())
    build_student_teacher(TrainConfig(arch="timm:resnet18", global_crop_size=40, local_crop_size=24,
                                      **small).validate())  # no patches


def test_a_timm_vit_trained_below_224_px_is_evaluated_and_exported_at_its_size(tmp_path, capsys):
    """The trainer builds timm ViTs at the global crop size; the evaluations and export rebuilt them at timm's
    default 224 and refused the weights (pos_embed [1, 5, 192] vs [1, 197, 192])."""
    import timm

    from dinokit.cli import main
    from dinokit.trainer import build_student_teacher
    from dinokit.weights import load_backbone

    cfg = TrainConfig(arch="timm:vit_tiny_patch16_224", global_crop_size=32, local_crop_size=16, out_dim=16,
                      head_hidden_dim=32, head_bottleneck_dim=8).validate()
    student, teacher, _ = build_student_teacher(cfg)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "config": config_to_dict(cfg)}, ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = teacher.backbone.eval()(x)
        assert torch.equal(load_backbone(ckpt)(x), want)
        out = tmp_path / "bb.safetensors"
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "img_size=32, " in printed
        assert torch.equal(load_backbone(out)(x), want)  # the export records its size
        m = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=32,
                              pretrained_cfg_overlay=dict(file=str(out))).eval()  # as printed
        assert torch.allclose(m(x), want, atol=1e-5)
        bare = tmp_path / "bare.pth"  # no config: the size is read from the position embedding's grid
        torch.save(teacher.backbone.state_dict(), bare)
        assert torch.equal(load_backbone(bare, arch="timm:vit_tiny_patch16_224")(x), want)
