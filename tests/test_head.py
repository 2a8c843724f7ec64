import math

import pytest
import torch
import torch.nn.functional as F

from dinokit import DINOHead


def test_keys_shapes_and_counts_match_reference():
    head = DINOHead(384, 65536)
    keys = list(head.state_dict())
    assert keys == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
                    "last_layer.weight_g", "last_layer.weight_v"]
    assert head.last_layer.weight_g.shape == (65536, 1)
    assert head.last_layer.weight_v.shape == (65536, 256)
    assert sum(p.numel() for p in head.parameters()) == 22_352_128
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == 22_286_592
    assert torch.all(head.last_layer.weight_g == 1)
    bound = 1 / math.sqrt(256)
    assert head.last_layer.weight_v.abs().max() <= bound


def test_forward_equals_independent_computation():
    head = DINOHead(16, 10, hidden_dim=12, bottleneck_dim=6)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(5, 16)
    l0, l2, l4 = head.mlp[0], head.mlp[2], head.mlp[4]
    h = F.gelu(x @ l0.weight.T + l0.bias)
    h = F.gelu(h @ l2.weight.T + l2.bias)
    u = h @ l4.weight.T + l4.bias
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    expected = torch.stack([g[k, 0] * (u @ v[k]) / v[k].norm() for k in range(10)], dim=1)
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-6)


def test_norm_last_layer_gives_cosine_logits_and_frozen_gain():
    head = DINOHead(8, 20, hidden_dim=16, bottleneck_dim=4, norm_last_layer=True)
    assert not head.last_layer.weight_g.requires_grad
    out = head(torch.randn(7, 8))
    assert out.abs().max() <= 1 + 1e-6
    head2 = DINOHead(8, 20, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    assert head2.last_layer.weight_g.requires_grad


def test_matches_torch_weight_norm_and_loads_both_key_styles():
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(6, 9, bias=False))
    sd = {f"last_layer.{k}": v for k, v in ref.state_dict().items()}
    assert "last_layer.parametrizations.weight.original0" in sd
    head = DINOHead(4, 9, hidden_dim=8, bottleneck_dim=6)
    full = head.state_dict()
    full = {k: v for k, v in full.items() if not k.startswith("last_layer")} | sd
    head.load_state_dict(full)
    x = F.normalize(torch.randn(3, 6), dim=-1)
    torch.testing.assert_close(head.last_layer(x), ref(x))


def test_batchnorm_variant_and_layer_counts():
    head = DINOHead(8, 5, use_bn=True, nlayers=3, hidden_dim=16, bottleneck_dim=4)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    one = DINOHead(8, 5, nlayers=1, bottleneck_dim=4)
    assert isinstance(one.mlp, torch.nn.Linear)
    assert head(torch.randn(4, 8)).shape == (4, 5)


@pytest.mark.parametrize("nlayers", [2, 4])
def test_depth(nlayers):
    head = DINOHead(8, 5, nlayers=nlayers, hidden_dim=16, bottleneck_dim=4)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == nlayers
