"""Backbones: the reference ViTs and CNNs from torchvision / timm, behind one ``build_backbone`` registry."""

from .registry import build_backbone, list_backbones, register_backbone
from .vit import VisionTransformer, interpolate_pos_embed, vit_base, vit_small, vit_tiny

__all__ = [
    "build_backbone", "list_backbones", "register_backbone",
    "VisionTransformer", "interpolate_pos_embed", "vit_tiny", "vit_small", "vit_base",
]
