import torch

from dinokit import DINOHead, MultiCropWrapper, build_backbone


class CountingBackbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.lin(x.mean((2, 3)))


class CountingHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def test_one_forward_per_resolution_and_head_once_in_crop_order():
    bb, head = CountingBackbone(), CountingHead()
    w = MultiCropWrapper(bb, head)
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)] + [torch.randn(2, 3, 8, 8) for _ in range(3)]
    out = w(crops)
    assert bb.calls == [(4, 3, 16, 16), (6, 3, 8, 8)]
    assert head.calls == 1
    expected = torch.cat([bb.lin(c.mean((2, 3))) for c in crops])
    torch.testing.assert_close(out, expected)


def test_vit_student_output_shape():
    w = MultiCropWrapper(build_backbone("vit_custom", patch_size=8, embed_dim=32, depth=1, num_heads=2),
                         DINOHead(32, 10, hidden_dim=16, bottleneck_dim=8))
    out = w([torch.randn(3, 3, 16, 16)] * 2 + [torch.randn(3, 3, 8, 8)] * 4)
    assert out.shape == (18, 10)


def test_an_empty_crop_list_is_named():
    import pytest

    with pytest.raises(ValueError, match="at least one batch of crops"):
        MultiCropWrapper(CountingBackbone(), torch.nn.Identity())([])
