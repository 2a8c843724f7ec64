"""Weighted k-NN classifier speed: dinokit's ``knn_classifier`` / ``knn_eval`` vs the reference procedure.

    python benchmarks/knn.py [--n-train 60000] [--n-test 10000] [--dim 384] [--classes 10] [--k 20]
                             [--ks 10,20,100,200] [--rounds 3] [--threads N] [--json]

Random L2-normalised features with class structure. Two timings, interleaved round by round (rotating order):

* single k (``--k``): ``knn_classifier`` vs a straightforward re-implementation of the reference's
  ``eval_knn.knn_classifier`` (dino-reference.md §4.1): 100 test chunks; per chunk the similarity matmul,
  sorted top-k, a ``[chunk * k, C]`` one-hot of the neighbour labels, ``exp(s / T)`` weights, the product
  summed over k, a full descending sort of the class scores. C is the data's class count (the reference
  hard-codes 1000; ``--reference-classes 1000`` reproduces that).
* every k of ``--ks``: ``knn_eval`` (one neighbour search for the largest k) vs the reference run once per k,
  as its ``eval_knn.py`` main loop does.

Both give the same accuracies (checked and printed). Prints the times and ratios; ``--json`` one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import interleaved, machine_info, median, spread  # noqa: E402


def reference_knn(train_features, train_labels, test_features, test_labels, k, T, num_classes):
    """The reference procedure, step by step (100 chunks, one-hot votes, full sort), written afresh."""
    n_test = len(test_labels)
    per_chunk = n_test // 100
    bank = train_features.t()
    hits1 = hits5 = 0
    one_hot = torch.zeros(k, num_classes)
    for start in range(0, n_test, per_chunk):
        feats = test_features[start:start + per_chunk]
        targets = test_labels[start:start + per_chunk]
        b = len(targets)
        sims = torch.mm(feats, bank)
        dist, idx = sims.topk(k, largest=True, sorted=True)
        neighbour_labels = torch.gather(train_labels.view(1, -1).expand(b, -1), 1, idx)
        one_hot.resize_(b * k, num_classes).zero_()
        one_hot.scatter_(1, neighbour_labels.view(-1, 1), 1)
        w = dist.clone().div_(T).exp_()
        scores = torch.sum(one_hot.view(b, -1, num_classes) * w.view(b, -1, 1), 1)
        _, pred = scores.sort(1, True)
        correct = pred.eq(targets.view(-1, 1))
        hits1 += correct.narrow(1, 0, 1).sum().item()
        hits5 += correct.narrow(1, 0, min(5, k)).sum().item()
    return 100.0 * hits1 / n_test, 100.0 * hits5 / n_test


def make_data(n_train: int, n_test: int, dim: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    ytr = torch.randint(0, classes, (n_train,), generator=g)
    yte = torch.randint(0, classes, (n_test,), generator=g)
    xtr = F.normalize(centers[ytr] + 4.0 * torch.randn(n_train, dim, generator=g), dim=1)
    xte = F.normalize(centers[yte] + 4.0 * torch.randn(n_test, dim, generator=g), dim=1)
    return xtr, ytr, xte, yte


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=60_000)
    ap.add_argument("--n-test", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--reference-classes", type=int, default=None,
                    help="num_classes of the reference's one-hot (default: --classes; reference: 1000)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--ks", default="10,20,100,200")
    ap.add_argument("--T", type=float, default=0.07)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from dinokit.eval.knn import knn_classifier, knn_eval

    ks = [int(k) for k in args.ks.split(",") if k]
    ref_c = args.reference_classes or args.classes
    xtr, ytr, xte, yte = make_data(args.n_train, args.n_test, args.dim, args.classes)

    ours_single = knn_classifier(xtr, ytr, xte, yte, args.k, args.T)
    ref_single = reference_knn(xtr, ytr, xte, yte, args.k, args.T, ref_c)
    ours_all = knn_eval(xtr, ytr, xte, yte, ks, args.T)
    ref_all = {k: reference_knn(xtr, ytr, xte, yte, k, args.T, ref_c) for k in ks}
    agree = (abs(ours_single[0] - ref_single[0]) < 1e-9
             and all(abs(ours_all[k]["top1"] - ref_all[k][0]) < 1e-9 for k in ks))

    single = interleaved({
        "dinokit": lambda: knn_classifier(xtr, ytr, xte, yte, args.k, args.T),
        "reference": lambda: reference_knn(xtr, ytr, xte, yte, args.k, args.T, ref_c),
    }, rounds=args.rounds)
    multi = interleaved({
        "dinokit": lambda: knn_eval(xtr, ytr, xte, yte, ks, args.T),
        "reference": lambda: [reference_knn(xtr, ytr, xte, yte, k, args.T, ref_c) for k in ks],
    }, rounds=args.rounds)
    res = {
        "config": {"n_train": args.n_train, "n_test": args.n_test, "dim": args.dim, "classes": args.classes,
                   "reference_classes": ref_c, "k": args.k, "ks": ks, "T": args.T, "rounds": args.rounds,
                   "threads": torch.get_num_threads()},
        "single_k_s": {n: median(t) for n, t in single.items()},
        "single_k_iqr_rel": {n: spread(t) for n, t in single.items()},
        "all_ks_s": {n: median(t) for n, t in multi.items()},
        "all_ks_iqr_rel": {n: spread(t) for n, t in multi.items()},
        "accuracy": {"dinokit": {"k": args.k, "top1": ours_single[0], "top5": ours_single[1]},
                     "reference": {"k": args.k, "top1": ref_single[0], "top5": ref_single[1]},
                     "top1_identical": agree},
        "machine": machine_info(),
    }
    one, every = res["single_k_s"], res["all_ks_s"]
    res["ratios"] = {"single_k_reference_over_dinokit": one["reference"] / one["dinokit"],
                     "all_ks_reference_over_dinokit": every["reference"] / every["dinokit"]}
    res["command"] = "python benchmarks/knn.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        print(json.dumps(res))
        return 0
    c = res["config"]
    print(f"k-NN {c['n_train']} train x {c['n_test']} test, dim {c['dim']}, {c['classes']} classes, "
          f"{c['threads']} threads, median of {args.rounds}")
    r = res["ratios"]
    print(f"  k={args.k}: dinokit {one['dinokit']:.3f} s, reference {one['reference']:.3f} s, "
          f"ratio {r['single_k_reference_over_dinokit']:.2f}x")
    print(f"  k in {ks}: dinokit {every['dinokit']:.3f} s, reference {every['reference']:.3f} s, "
          f"ratio {r['all_ks_reference_over_dinokit']:.2f}x")
    print(f"  top-1 k={args.k}: dinokit {ours_single[0]:.2f}%  reference {ref_single[0]:.2f}%  "
          f"(all k identical: {agree})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
