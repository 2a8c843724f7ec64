"""torchvision backbones (``--arch resnet50`` ...): only the final class-score layer is removed, so the backbone
outputs the penultimate representation ``[B, num_features]`` whatever the layout of the model's head. No weights
are downloaded (every model is built with ``weights=None``)."""

import warnings

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from dinokit.config import TrainConfig
from dinokit.models.registry import _NarrowInputSafeConv2d, build_backbone

# (name, input size, D, state-dict prefix of the removed class-score layer). 224 only where the model needs it.
HEADS = [
    ("resnet18", 64, 512, "fc."),  # fc: Linear, replaced whole as the reference does
    ("convnext_tiny", 64, 768, "classifier.2."),  # LayerNorm2d, Flatten, Linear
    ("mobilenet_v3_small", 64, 1024, "classifier.3."),  # Linear(576, 1024), Hardswish, Dropout, Linear
    ("mobilenet_v2", 64, 1280, "classifier.1."),  # Dropout, Linear
    ("efficientnet_b0", 64, 1280, "classifier.1."),
    ("vgg11", 64, 4096, "classifier.6."),  # Linear(25088, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU, Dropout, Lin.
    ("alexnet", 64, 4096, "classifier.6."),  # Dropout, Linear(9216, 4096), ReLU, Dropout, Linear, ReLU, Linear
    ("squeezenet1_0", 64, 512, "classifier.1."),  # Dropout, Conv2d(512, classes, 1), ReLU, AdaptiveAvgPool2d
    ("densenet121", 64, 1024, "classifier."),  # classifier: Linear
    ("shufflenet_v2_x0_5", 64, 1024, "fc."),
    ("mnasnet0_5", 64, 1280, "classifier.1."),
    ("regnet_x_400mf", 64, 400, "fc."),
    ("googlenet", 64, 1024, "fc."),  # and its auxiliary classifiers aux1 / aux2
    ("swin_t", 224, 768, "head."),  # head: Linear
    ("vit_b_16", 224, 768, "heads.head."),  # heads: Sequential(head=Linear)
    ("maxvit_t", 224, 512, "classifier.5."),  # AdaptiveAvgPool2d, Flatten, LayerNorm, Linear(512, 512), Tanh, Linear
]


def _state_dict_keys(name: str) -> set[str]:
    """The untouched torchvision classifier's, built on the meta device where it can be (no memory, no init)."""
    with warnings.catch_warnings():  # googlenet's FutureWarning about its default initialisation
        warnings.simplefilter("ignore", FutureWarning)
        try:
            with torch.device("meta"):
                return set(tvm.get_model(name, weights=None).state_dict())
        except NotImplementedError:  # regnets compute their widths with tensors
            return set(tvm.get_model(name, weights=None).state_dict())


def _backbone(name: str, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return build_backbone(name, **kwargs)


@pytest.mark.parametrize("name,size,dim,removed", HEADS)
def test_torchvision_backbone_outputs_its_penultimate_representation(name, size, dim, removed):
    """Used to replace the whole classifier / head by Identity while reading D from a Linear inside it:
    convnext_tiny gave [B, 768, 1, 1], mobilenet_v3_small [B, 576] for num_features 1024, vgg11 [B, 25088]
    for 4096, maxvit_t [B, 512, 7, 7]; squeezenet1_0 was refused."""
    m = _backbone(name).eval()
    assert m.num_features == dim
    with torch.no_grad():
        out = m(torch.randn(2, 3, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, m.num_features)
    # every layer is kept except the class-score layer (and googlenet's auxiliary classifiers)
    kept, full = set(m.state_dict()), _state_dict_keys(name)
    assert kept < full
    assert all(k.startswith((removed, "aux")) for k in full - kept), sorted(full - kept)
    assert any(k.startswith(removed) for k in full - kept)


def test_every_torchvision_classifier_gets_a_consistent_feature_size():
    """Shapes only (meta tensors, no memory, no arithmetic), for every torchvision classifier at 224 px. RegNets
    cannot be built on the meta device (their block widths are computed with tensors); they all share the plain
    ``fc`` Linear of regnet_x_400mf above."""
    names = tvm.list_models(module=tvm)
    assert len(names) > 70
    checked = 0
    for name in names:
        try:
            with torch.device("meta"):
                m = _backbone(name).eval()
        except NotImplementedError:
            assert name.startswith("regnet_"), name
            continue
        with torch.no_grad():
            out = m(torch.empty(2, 3, 224, 224, device="meta"))
        assert out.shape == (2, m.num_features), name
        checked += 1
    assert checked > 50


def test_training_mode_returns_features_alone_and_keeps_stochastic_depth():
    g = _backbone("googlenet").train()
    assert g.aux1 is None and g.aux2 is None and not g.aux_logits
    out = g(torch.randn(2, 3, 64, 64))  # used to be a namedtuple with the auxiliary class scores
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1024)
    m = _backbone("mobilenet_v3_small").train()
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 1024)
    c = _backbone("convnext_tiny", drop_path_rate=0.1)
    assert max(x.p for x in c.modules() if type(x).__name__ == "StochasticDepth") == pytest.approx(0.1)
    assert c.num_features == 768
    r = _backbone("resnet18", drop_path_rate=0.1, patch_size=8, img_size=64)  # no stochastic depth: ignored
    assert isinstance(r.fc, nn.Identity) and r.num_features == 512
    assert type(r.conv1) is _NarrowInputSafeConv2d  # the strided-conv guard stays applied


def test_a_head_that_does_not_end_in_a_class_score_layer_is_refused(monkeypatch):
    def fake(layout):
        def get_model(name, weights=None, **kwargs):
            m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            if layout is not None:
                m.classifier = layout
            return m

        return get_model

    layouts = [None, nn.Sequential(nn.Flatten()), nn.Sequential(nn.Linear(8, 1000), nn.LayerNorm(1000)),
               nn.Linear(8, 10), nn.Sequential(nn.Conv2d(8, 1000, 1), nn.AdaptiveAvgPool2d(2))]
    for layout in layouts:
        monkeypatch.setattr(tvm, "get_model", fake(layout))
        with pytest.raises(ValueError, match="cannot find the classifier of torchvision model 'resnet18'"):
            build_backbone("resnet18")
    monkeypatch.setattr(tvm, "get_model", fake(nn.Linear(8, 10)))
    assert build_backbone("resnet18", num_classes=10).num_features == 8


def test_student_teacher_on_mobilenet_v3_small_run_multi_crop():
    """``dinokit train --arch mobilenet_v3_small`` died with a shape mismatch at the DINO head."""
    from dinokit.trainer import build_student_teacher

    cfg = TrainConfig(arch="mobilenet_v3_small", global_crop_size=64, local_crop_size=32, out_dim=16,
                      head_hidden_dim=32, head_bottleneck_dim=8).validate()
    student, teacher, embed_dim = build_student_teacher(cfg)
    assert embed_dim == 1024
    crops = [torch.randn(2, 3, 64, 64)] * 2 + [torch.randn(2, 3, 32, 32)] * 2
    assert student(crops).shape == (8, 16)
    with torch.no_grad():
        assert teacher(crops[:2]).shape == (4, 16)


def test_torchvision_vits_are_refused_for_crop_sizes_they_cannot_take():
    """torchvision's VisionTransformer asserts its one image size at the first forward (a traceback after the
    run had started); with local crops at another size it cannot train DINO at all."""
    from dinokit.config import TrainConfig
    from dinokit.errors import ConfigError
    from dinokit.trainer import build_student_teacher

    small = dict(out_dim=16, head_hidden_dim=32, head_bottleneck_dim=8)
    with pytest.raises(ConfigError, match="torchvision's vit_b_16 takes only 224-px images, not the crop sizes "
                                          "96, 224; use dinokit's vit_tiny/vit_small/vit_base"):
        build_student_teacher(TrainConfig(arch="vit_b_16", **small).validate())
    student, _, dim = build_student_teacher(TrainConfig(arch="vit_b_16", local_crops_number=0, **small).validate())
    assert dim == 768


def test_crops_too_small_for_a_cnn_are_refused_before_the_run(tmp_path):
    """alexnet/squeezenet at 32/16 px crops, and a BatchNorm CNN whose one local crop of a batch of 1 reaches a
    1x1 map, ended in a traceback at the first step with the output directory already written."""
    from dinokit.errors import ConfigError
    from dinokit.trainer import build_student_teacher

    small = dict(out_dim=16, head_hidden_dim=32, head_bottleneck_dim=8)
    with pytest.raises(ConfigError, match=r"alexnet cannot take global_crop_size 32: .*Output size is too small "
                                          r"\(use larger crops\)"):
        build_student_teacher(TrainConfig(arch="alexnet", global_crop_size=32, local_crop_size=16, **small))
    with pytest.raises(ConfigError, match=r"squeezenet1_0 cannot take local_crop_size 16"):
        build_student_teacher(TrainConfig(arch="squeezenet1_0", global_crop_size=64, local_crop_size=16, **small))
    one = dict(arch="resnet18", global_crop_size=32, local_crop_size=16, local_crops_number=1, batch_size_per_gpu=1)
    with pytest.raises(ConfigError, match=r"resnet18's BatchNorm 'layer3.0.bn1' would see one value per channel: "
                                          r"the local_crops \(16 px\) reach it at 1x1 and a batch of 1 gives 1 "
                                          r"image\(s\) per step"):
        build_student_teacher(TrainConfig(**one, **small))
    # each remedy the message names works; a SyncBatchNorm over 2 GPU processes pools their batches
    for fix in (dict(batch_size_per_gpu=2), dict(local_crops_number=2), dict(local_crop_size=48)):
        student, _, _ = build_student_teacher(TrainConfig(**{**one, **fix}, **small))
        b = {**one, **fix}
        crops = [torch.randn(b["batch_size_per_gpu"], 3, 32, 32)] * 2 + \
            [torch.randn(b["batch_size_per_gpu"], 3, b["local_crop_size"], b["local_crop_size"])] * \
            b["local_crops_number"]
        assert student(crops).shape == (b["batch_size_per_gpu"] * (2 + b["local_crops_number"]), 16)
    build_student_teacher(TrainConfig(**one, **small), bn_ranks=2)
    # the CLI: one line, exit 2, no output directory
    import subprocess
    import sys

    from .helpers import make_image_folder

    data = make_image_folder(tmp_path / "imgs", n_per_class=2)
    r = subprocess.run([sys.executable, "-m", "dinokit", "train", "--data", str(data), "--output-dir",
                        str(tmp_path / "out"), "--arch", "alexnet", "--global-crop-size", "32", "--local-crop-size",
                        "16", "--out-dim", "16", "--num-workers", "0", "--epochs", "1", "--batch-size", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "alexnet cannot take" in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_probe_leaves_the_backbone_as_it_was():
    from dinokit.trainer import _check_backbone_takes_the_crops

    m = build_backbone("resnet18").train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    _check_backbone_takes_the_crops(TrainConfig(arch="resnet18", global_crop_size=64, local_crop_size=32), m)
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not any(hasattr(x, "dinokit_name") for x in m.modules()) and not m.layer1[0].bn1._forward_pre_hooks


def test_grad_checkpointing_on_a_model_without_it_is_named(tmp_path):
    from dinokit.cli import build_parser
    from dinokit.commands.train import config_from_args
    from dinokit.trainer import Trainer

    from .helpers import make_image_folder

    data = make_image_folder(tmp_path / "imgs", n_per_class=2)
    cfg = config_from_args(build_parser("train").parse_args(
        ["train", "--data", str(data), "--output-dir", str(tmp_path / "o"), "--arch", "resnet18", "--global-crop-size",
         "64", "--local-crop-size", "32", "--local-crops-number", "2", "--batch-size", "2", "--out-dim", "16",
         "--num-workers", "0", "--grad-checkpointing", "--device", "cpu"]))
    with pytest.warns(UserWarning, match="grad_checkpointing ignored: resnet18 has no activation checkpointing"):
        Trainer(cfg)
