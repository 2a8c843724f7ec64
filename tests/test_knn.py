"""Weighted k-NN (reference eval_knn.py, dino-reference.md §4.1) against an independent loop
implementation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinokit.eval.knn import extract_features, frozen_features, knn_classifier, knn_eval


def loop_knn(train, train_labels, test, test_labels, k, T, num_classes):
    """Straightforward per-image implementation: sorted neighbours, exp(s/T) votes, stable descending order of
    classes (ties -> lower class index), top-5 over min(5, k, C) classes; a class without a vote is no hit."""
    top1 = top5 = 0
    k = min(k, len(train))
    for x, y in zip(test.tolist(), test_labels.tolist()):
        sims = [sum(a * b for a, b in zip(x, t)) for t in train.tolist()]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        scores = [0.0] * num_classes
        for j in order:
            scores[int(train_labels[j])] += math.exp(sims[j] / T)
        ranked = sorted(range(num_classes), key=lambda c: (-scores[c], c))
        top1 += ranked[0] == y and scores[y] > 0
        top5 += y in ranked[:min(5, k, num_classes)] and scores[y] > 0
    n = len(test_labels)
    return 100.0 * top1 / n, 100.0 * top5 / n


def _data(n_train, n_test, dim, classes, seed, noise=1.5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    ytr = torch.randint(0, classes, (n_train,), generator=g)
    yte = torch.randint(0, classes, (n_test,), generator=g)
    xtr = F.normalize(centers[ytr] + noise * torch.randn(n_train, dim, generator=g), dim=1).double()
    xte = F.normalize(centers[yte] + noise * torch.randn(n_test, dim, generator=g), dim=1).double()
    return xtr, ytr, xte, yte


@pytest.mark.parametrize("classes,k", [(7, 10), (7, 3), (3, 10), (2, 1), (4, 4), (12, 20)])
def test_matches_loop_implementation(classes, k):
    xtr, ytr, xte, yte = _data(60, 25, 8, classes, seed=classes * 31 + k)
    got = knn_classifier(xtr, ytr, xte, yte, k, 0.07, num_classes=classes)
    want = loop_knn(xtr, ytr, xte, yte, k, 0.07, classes)
    assert got == pytest.approx(want, abs=1e-9)


def test_inferred_num_classes_and_k_larger_than_train():
    xtr, ytr, xte, yte = _data(8, 10, 4, 3, seed=3)
    assert knn_classifier(xtr, ytr, xte, yte, 50, 0.1) == pytest.approx(
        loop_knn(xtr, ytr, xte, yte, 50, 0.1, int(max(ytr.max(), yte.max())) + 1))


def test_chunked_equals_unchunked():
    xtr, ytr, xte, yte = _data(200, 97, 16, 10, seed=1)
    full = knn_classifier(xtr.float(), ytr, xte.float(), yte, 20, 0.07, chunk_size=10_000)
    for chunk in (1, 7, 32):
        assert knn_classifier(xtr.float(), ytr, xte.float(), yte, 20, 0.07, chunk_size=chunk) == full


def test_hand_computed_three_points():
    # train: two points of class 0 near (1, 0), one of class 1 at (0, 1); test at 45 degrees, label 1.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]])
    # similarities: 0.7071, 0.9899, 0.7071. k=1 -> class 0 (wrong); k=3, T=1: class 0 gets
    # e^0.7071 + e^0.9899 = 4.719, class 1 gets e^0.7071 = 2.028 -> class 0 (wrong); top-5 contains class 1.
    assert knn_classifier(train, labels, test, torch.tensor([1]), 1, 1.0) == (0.0, 0.0)
    assert knn_classifier(train, labels, test, torch.tensor([1]), 3, 1.0) == (0.0, 100.0)
    assert knn_classifier(train, labels, test, torch.tensor([0]), 3, 1.0) == (100.0, 100.0)
    # k=2: only class 0 votes; class 1 has no vote: no hit, although it fills the second of min(5, k=2, C=2) slots
    assert knn_classifier(train, labels, test, torch.tensor([1]), 2, 1.0) == (0.0, 0.0)
    # a low temperature does not change the argmax here
    assert knn_classifier(train, labels, test, torch.tensor([0]), 3, 0.07) == (100.0, 100.0)


def test_knn_eval_normalises_and_reports_every_k():
    xtr, ytr, xte, yte = _data(80, 30, 8, 5, seed=2, noise=0.5)
    scaled_tr = xtr.float() * (torch.rand(len(xtr), 1) * 10 + 0.1)
    res = knn_eval(scaled_tr, ytr, xte.float() * 3, yte, ks=(1, 5, 20))
    assert set(res) == {1, 5, 20}
    for k in (1, 5, 20):
        want = loop_knn(xtr, ytr, xte, yte, k, 0.07, 5)
        assert (res[k]["top1"], res[k]["top5"]) == pytest.approx(want, abs=1e-9)
    assert res[1]["top1"] > 50  # clusters are separable enough


def test_rejects_unlabelled():
    xtr, ytr, xte, yte = _data(10, 4, 4, 2, seed=0)
    with pytest.raises(ValueError, match="labels"):
        knn_classifier(xtr, ytr, xte, torch.full_like(yte, -1), 5, 0.07)


def test_extract_features_order_and_multiblock():
    from dinokit.models import build_backbone

    model = build_backbone("vit_custom", patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=16)
    images = torch.randn(5, 3, 16, 16)
    ds = torch.utils.data.TensorDataset(images, torch.arange(5))
    feats, labels = extract_features(model, ds, batch_size=2, progress=False)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(feats, model(images), atol=1e-5)
        assert labels.tolist() == [0, 1, 2, 3, 4]
        f2, _ = extract_features(model, ds, batch_size=3, n_last_blocks=2, progress=False)
        inter = model.get_intermediate_layers(images, 2)
        assert torch.allclose(f2, torch.cat([inter[0][:, 0], inter[1][:, 0]], 1), atol=1e-5)
        # n=1 + avgpool interleaves cls and mean patch token (reference eval_linear.py)
        f3 = frozen_features(model, images, 1, True)
        cls, avg = inter[1][:, 0], inter[1][:, 1:].mean(1)
        assert f3.shape == (5, 64) and torch.allclose(f3[:, 0::2], cls) and torch.allclose(f3[:, 1::2], avg)
        pt, _ = extract_features(model, ds, batch_size=4, patch_tokens=True, progress=False)
        assert pt.shape == (5, 4, 32) and torch.allclose(pt, inter[1][:, 1:], atol=1e-5)


def test_validation_labels_are_matched_to_train_classes_by_name():
    """ImageFolder trees number classes by their sorted names: a validation folder missing a class, or holding one
    the train set lacks, must not shift labels. A class absent from the train set is warned about (its images can
    never be predicted); no shared class at all is an error, not a silent 0%."""
    from types import SimpleNamespace

    from dinokit.errors import DataError
    from dinokit.eval.knn import aligned_labels

    train = SimpleNamespace(classes=["bird", "cat", "dog"], labels=torch.tensor([0, 1, 2]))
    same = SimpleNamespace(classes=["bird", "cat", "dog"], labels=torch.tensor([2, 0, 1]))
    assert aligned_labels(train, same).tolist() == [2, 0, 1]
    missing = SimpleNamespace(classes=["cat", "dog"], labels=torch.tensor([0, 1, 1]))  # no bird: cat is 0 here
    assert aligned_labels(train, missing).tolist() == [1, 2, 2]
    extra = SimpleNamespace(classes=["ant", "cat"], labels=torch.tensor([0, 0, 1, -1]))  # -1: unlabelled, kept
    with pytest.warns(UserWarning, match=r"1 validation class\(es\) not in the train set \(ant\): their 2 images"):
        assert aligned_labels(train, extra).tolist() == [3, 3, 1, -1]
    disjoint = SimpleNamespace(classes=["ant", "bee"], labels=torch.tensor([0, 1]))
    with pytest.raises(DataError, match=r"no validation class is a train class \(train: bird, cat, dog; "):
        aligned_labels(train, disjoint)
    unnamed = SimpleNamespace(classes=[], labels=torch.tensor([4, 5]))  # tensor data sets: labels as they are
    assert aligned_labels(train, unnamed).tolist() == [4, 5]


def test_drop_unreadable_keeps_the_rows_of_readable_files_also_through_a_subset(tmp_path):
    import warnings

    from dinokit.data import ImageFolderDataset
    from dinokit.eval.knn import drop_unreadable

    from .helpers import make_image_folder

    root = make_image_folder(tmp_path / "d", n_per_class=3, classes=("a", "b"))
    (root / "a" / "0-bad.jpg").write_bytes(b"not an image")
    ds = ImageFolderDataset(root, transform=lambda im: torch.tensor(im.getpixel((0, 0)), dtype=torch.float32),
                            unreadable="leave_out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = torch.stack([ds[i][0] for i in range(len(ds))])
    assert ds.readable().tolist() == [False] + [True] * 6
    assert torch.equal(rows[0], rows[1])  # the unreadable file's row holds the next file's image
    with pytest.warns(UserWarning, match=r"1 unreadable image\(s\) of the test data left out .*0-bad.jpg.*6 of 7"):
        kept, labels = drop_unreadable(ds, "test", rows, ds.labels)
    assert torch.equal(kept, rows[1:]) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    sub = torch.utils.data.Subset(ds, [0, 2, 5])
    with pytest.warns(UserWarning, match="2 of 3 used"):
        (kept_sub,) = drop_unreadable(sub, "test", rows[[0, 2, 5]])
    assert torch.equal(kept_sub, rows[[2, 5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out: no warning
        (same,) = drop_unreadable(torch.utils.data.Subset(ds, [1, 2]), "test", rows[[1, 2]])
    assert torch.equal(same, rows[[1, 2]])


def test_non_finite_features_are_refused_not_scored():
    """NaN similarities made every comparison False: each target ranked first, 100% top-1 for a diverged model."""
    from dinokit.errors import DataError
    from dinokit.eval.knn import require_finite

    xtr, ytr, xte, yte = _data(10, 4, 4, 2, seed=0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="the test features hold NaN or inf values"):
            knn_classifier(xtr, ytr, torch.full_like(xte, bad), yte, 5, 0.07)
        broken = xtr.clone()
        broken[3, 1] = bad
        with pytest.raises(ValueError, match="the train features hold NaN or inf values"):
            knn_classifier(broken, ytr, xte, yte, 5, 0.07)
    require_finite(xtr)
    require_finite(torch.zeros(0, 4))
    x = torch.zeros(5, 3, 2)
    x[1, 2, 0], x[4, 0, 1] = float("nan"), -float("inf")
    with pytest.raises(DataError, match=r"^the model's features are not finite \(NaN or inf\) for 2 of 5 images: "
                                        r"the weights are diverged or corrupt$"):
        require_finite(x, "the model's features")


def test_extraction_of_non_finite_features_is_a_one_line_data_error():
    from dinokit.errors import DataError
    from dinokit.models import build_backbone

    model = build_backbone("vit_custom", patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=16)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    ds = torch.utils.data.TensorDataset(torch.randn(5, 3, 16, 16), torch.arange(5))
    with pytest.raises(DataError, match="the model's val features are not finite .* for 5 of 5 images"):
        extract_features(model, ds, batch_size=2, progress=False, desc="val features")


@pytest.mark.parametrize("kind", ["tensor", "folder"])
def test_the_training_monitor_stops_on_a_diverged_teacher_instead_of_logging_a_score(tmp_path, kind):
    from dinokit.config import TrainConfig
    from dinokit.errors import DataError
    from dinokit.models import build_backbone
    from dinokit.monitor import online_knn

    from .helpers import make_fashion_like, make_image_folder

    if kind == "tensor":
        spec = f"fashion-mnist:{make_fashion_like(tmp_path / 'fm', n_train=16, n_test=8)}"
    else:
        spec = str(make_image_folder(tmp_path / "imgs", n_per_class=3, classes=("a", "b"), size=(20, 20)))
    cfg = TrainConfig(knn_train=spec, knn_val=spec, global_crop_size=16, knn_subset=0)
    model = build_backbone("vit_custom", patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=16)
    assert 0 <= online_knn(model, cfg, torch.device("cpu"))["knn_top1"] <= 100
    with torch.no_grad():
        model.norm.bias[0] = float("inf")
    with pytest.raises(DataError, match="the model's k-NN monitor features are not finite"):
        online_knn(model, cfg, torch.device("cpu"))


def test_knn_labels_as_lists_arrays_or_columns_and_a_too_small_num_classes():
    import numpy as np

    torch.manual_seed(0)
    xtr, xte = F.normalize(torch.randn(30, 8), dim=1), F.normalize(torch.randn(10, 8), dim=1)
    ytr, yte = torch.randint(0, 3, (30,)), torch.randint(0, 3, (10,))
    want = knn_classifier(xtr, ytr, xte, yte, 5, 0.07)
    assert knn_classifier(xtr, ytr.tolist(), xte, yte.numpy(), 5, 0.07) == want
    assert knn_classifier(xtr, ytr[:, None], xte, yte[:, None], 5, 0.07) == want
    assert knn_classifier(xtr, np.asarray(ytr), xte, yte, 5, 0.07, num_classes=3) == want
    with pytest.raises(ValueError, match=r"num_classes is 2 but a label is 2"):
        knn_classifier(xtr, ytr, xte, yte, 5, 0.07, num_classes=2)
    with pytest.raises(ValueError, match=r"one integer per row, shape \[N\]; got shape \(30, 2\)"):
        knn_classifier(xtr, torch.zeros(30, 2, dtype=torch.long), xte, yte, 5, 0.07)


def test_a_class_without_votes_is_never_a_top5_hit():
    """With at most 5 classes every target sat in the "top 5" (the tied zero-vote classes fill the slots), also a
    test class the train set lacks: top-5 was 100% whatever the features."""
    xtr, ytr, xte, yte = _data(40, 20, 8, 4, seed=5, noise=0.3)
    yte = yte.clone()
    yte[:5] = 4  # a class no train image has: never predicted, top-1 or top-5
    top1, top5 = knn_classifier(xtr, ytr, xte, yte, 20, 0.07, num_classes=5)
    assert (top1, top5) == pytest.approx(loop_knn(xtr, ytr, xte, yte, 20, 0.07, 5), abs=1e-9)
    assert top5 <= 75.0 and top1 <= 75.0
