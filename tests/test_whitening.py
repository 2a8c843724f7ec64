"""Global descriptors (``eval.whitening.describe``) of the retrieval and copy-detection evaluations."""

import re

import pytest
import torch

from dinokit import build_backbone
from dinokit.errors import ConfigError
from dinokit.eval.whitening import describe, gem


def test_descriptors_are_the_cls_token_and_gem_of_the_normed_patch_tokens():
    vit = build_backbone("vit_custom", patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=16).eval()
    x = torch.randn(2, 3, 20, 27)  # cropped to 16 x 24 (the reference's convolution drops the remainder)
    with torch.no_grad():
        tokens = vit.prepare_tokens(x[..., :16, :24])
        for blk in vit.blocks:
            tokens = blk(tokens)
        tokens = vit.norm(tokens)
        cls = describe(vit, x, "cls")
        torch.testing.assert_close(cls, tokens[:, 0])
        want = tokens[:, 1:].clamp(min=1e-6).pow(4).mean(1).pow(0.25)
        torch.testing.assert_close(describe(vit, x, "gem"), want)
        torch.testing.assert_close(describe(vit, x, "cls+gem"), torch.cat((tokens[:, 0], want), 1))
        torch.testing.assert_close(gem(tokens[:, 1:], p=1.0), tokens[:, 1:].clamp(min=1e-6).mean(1))


@pytest.mark.parametrize("arch", ["timm:vit_tiny_patch16_224", "resnet18"])
def test_patch_descriptors_of_other_backbones_are_refused_not_guessed(arch):
    """timm's get_intermediate_layers drops the CLS token and the final norm: 'cls+gem' took the first patch
    token as the CLS token; a CNN has no patch tokens."""
    pytest.importorskip("timm")
    model = build_backbone(arch, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert describe(model, x, "cls").shape == (1, model.num_features)
        for d in ("gem", "cls+gem"):
            msg = re.escape(f"descriptor '{d}'") + " needs the patch tokens of a dinokit ViT"
            with pytest.raises(ConfigError, match=msg):
                describe(model, x, d)
