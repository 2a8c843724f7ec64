import pytest
import torch

from dinokit import (
    DINOHead,
    MultiCropWrapper,
    build_backbone,
    cancel_gradients_last_layer,
    clip_gradients,
    get_params_groups,
)
from dinokit.optim import LARS, build_optimizer


def test_param_groups_match_reference_counts_for_vit_small():
    model = MultiCropWrapper(build_backbone("vit_small"), DINOHead(384, 65536))
    groups = get_params_groups(model)
    assert [len(g["params"]) for g in groups] == [55, 102]
    assert [sum(p.numel() for p in g["params"]) for g in groups] == [43_886_848, 65_408]
    assert groups[1]["weight_decay"] == 0.0
    decayed = {id(p) for p in groups[0]["params"]}
    b = model.backbone
    for p in (b.cls_token, b.pos_embed, b.patch_embed.proj.weight, model.head.last_layer.weight_v):
        assert id(p) in decayed


def test_trainable_weight_g_is_decayed():
    head = DINOHead(8, 5, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    groups = get_params_groups(head)
    assert id(head.last_layer.weight_g) in {id(p) for p in groups[0]["params"]}


def test_clip_gradients_is_per_parameter():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    c = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> clipped
    b.grad = torch.full((2, 2), 0.5)  # norm 1 -> untouched
    c.grad = None
    norms = clip_gradients([a, b, c], clip=2.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 1.0]))
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0, 0.0]) * (2.0 / (5.0 + 1e-6)))
    torch.testing.assert_close(b.grad, torch.full((2, 2), 0.5))


def test_cancel_gradients_last_layer_sets_none_only_while_frozen():
    head = DINOHead(4, 3, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    head(torch.randn(2, 4)).sum().backward()
    cancel_gradients_last_layer(0, head, 1)
    assert head.last_layer.weight_v.grad is None and head.last_layer.weight_g.grad is None
    assert head.mlp[0].weight.grad is not None
    head(torch.randn(2, 4)).sum().backward()
    cancel_gradients_last_layer(1, head, 1)
    assert head.last_layer.weight_v.grad is not None


def test_frozen_last_layer_gets_no_adamw_update_or_decay():
    head = DINOHead(4, 3, hidden_dim=8, bottleneck_dim=4)
    opt = build_optimizer("adamw", get_params_groups(head))
    for g in opt.param_groups:
        g["lr"] = 0.1
    opt.param_groups[0]["weight_decay"] = 0.5
    v0 = head.last_layer.weight_v.detach().clone()
    head(torch.randn(2, 4)).sum().backward()
    cancel_gradients_last_layer(0, head, 1)
    opt.step()
    assert torch.equal(head.last_layer.weight_v, v0)
    assert head.last_layer.weight_v not in opt.state or not opt.state[head.last_layer.weight_v]


def test_lars_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w, bias]}], lr=0.1, weight_decay=0.5, momentum=0.9, eta=0.001)
    w.grad = torch.tensor([[1.0, 0.0]])
    bias.grad = torch.tensor([2.0])
    opt.step()
    dp = torch.tensor([[1.0, 0.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])
    q = 0.001 * 5.0 / dp.norm()
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * dp * q)
    torch.testing.assert_close(bias.detach(), torch.tensor([1.0 - 0.1 * 2.0]))  # 1-D: no decay, no trust ratio


def test_build_optimizer_rejects_unknown():
    with pytest.raises(ValueError):
        build_optimizer("adam", [{"params": [torch.nn.Parameter(torch.zeros(1))]}])
    sgd = build_optimizer("sgd", [{"params": [torch.nn.Parameter(torch.zeros(1))]}])
    assert sgd.param_groups[0]["momentum"] == 0.9
