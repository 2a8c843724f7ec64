"""``MultiCropWrapper`` (reference ``utils.MultiCropWrapper``): one backbone forward per run of consecutive
same-resolution crops, then the head once on all features, rows in crop order ``[crop0 x B, crop1 x B, ...]``.
``forward(crops, return_backbone=True)`` also returns the backbone features (the KoLeo regulariser's input)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MultiCropWrapper"]


class MultiCropWrapper(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        # The reference disables classifier layers of the backbone.
        for attr in ("fc", "head"):
            if isinstance(getattr(backbone, attr, None), nn.Linear):
                setattr(backbone, attr, nn.Identity())
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor | list[torch.Tensor],
                return_backbone: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        crops = x if isinstance(x, (list, tuple)) else [x]
        if not crops:
            raise ValueError("MultiCropWrapper needs at least one batch of crops, got an empty list")
        outputs = []
        start = 0
        while start < len(crops):
            end = start + 1
            shape = crops[start].shape[-2:]
            while end < len(crops) and crops[end].shape[-2:] == shape:
                end += 1
            batch = crops[start] if end == start + 1 else torch.cat(crops[start:end])
            out = self.backbone(batch)
            if isinstance(out, tuple):
                out = out[0]
            outputs.append(out)
            start = end
        features = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return (self.head(features), features) if return_backbone else self.head(features)
