"""Experiment hook (docs/small_data.md, table D8), not a dinokit option: replaces the ViT's linear patch embedding by
a per-patch MLP (7x7/7 convolution to EXP_STEM_HIDDEN channels, GELU, 1x1 convolution) in every Python process
started with this folder on PYTHONPATH, so that the sweep's training subprocess and its evaluation agree:

    PYTHONPATH=benchmarks/experiments/mlp_patch_embed python benchmarks/demo_sweep.py --name mlpstem \\
        --images 582144 --set knn_every_minutes=0
"""

import os

try:
    from torch import nn

    import dinokit.models.vit as _vit

    _HIDDEN = int(os.environ.get("EXP_STEM_HIDDEN", "128"))

    class MlpPatchEmbed(nn.Module):
        def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
            super().__init__()
            self.patch_size = patch_size
            self.proj0 = nn.Conv2d(in_chans, _HIDDEN, kernel_size=patch_size, stride=patch_size)
            self.act = nn.GELU()
            self.proj = nn.Conv2d(_HIDDEN, embed_dim, kernel_size=1)

        def forward(self, x):
            return self.proj(self.act(self.proj0(x))).flatten(2).transpose(1, 2)

    _vit.PatchEmbed = MlpPatchEmbed
except ImportError:  # outside the project's environment: do nothing
    pass
