"""``make bench``: every benchmark side by side, written to docs/benchmarks.md and benchmarks/results.json.

    python benchmarks/run_all.py [--rounds 3] [--steps 3] [--only train,augment,extract,knn,matmul] [--quick]

1. matmul ceilings, fp32 and bf16, at ViT-T and ViT-S shapes (``benchmarks/matmul.py``);
2. one full DINO training step for ViT-T/16, ViT-S/16 and ViT-S/8 (small crops), fp32 and bf16, dinokit vs the
   reference's implementation vs lightly + timm (``benchmarks/train_step.py``). Every (implementation, precision)
   runs in its own process, so that process-wide choices (allocator, threads) belong to the candidate; processes
   alternate round by round with a rotating order, each timing ``--steps`` steps after a warm-up step and probing
   the matmul ceiling between steps. Verdict: the median over rounds of the per-round ratio (paired, same load);
   images/s, achieved GFLOP/s and fraction of the ceiling are medians over rounds; peak RSS per process;
3. the multi-crop augmentation on photographs (``benchmarks/augment.py``), one thread per process;
4. feature extraction (``benchmarks/extract.py``) and, when present, ``benchmarks/knn.py``.

The generated tables replace the block between the ``BEGIN GENERATED`` / ``END GENERATED`` markers of
docs/benchmarks.md; the rest of that file is written by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, machine_info  # noqa: E402

PY = sys.executable
BENCH = ROOT / "benchmarks"
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = BENCH / "results.json"
BEGIN, END = "<!-- BEGIN GENERATED (benchmarks/run_all.py) -->", "<!-- END GENERATED -->"

CONFIGS = [
    ("ViT-T/16, 2x96 + 8x48, batch 32, K 4096",
     dict(arch="vit_tiny", patch_size=16, batch_size=32, global_crop_size=96, local_crop_size=48,
          local_crops_number=8, out_dim=4096)),
    ("ViT-S/16, 2x224 + 8x96, batch 8, K 65536",
     dict(arch="vit_small", patch_size=16, batch_size=8, global_crop_size=224, local_crop_size=96,
          local_crops_number=8, out_dim=65536)),
    ("ViT-S/8, 2x112 + 8x48, batch 8, K 65536",
     dict(arch="vit_small", patch_size=8, batch_size=8, global_crop_size=112, local_crop_size=48,
          local_crops_number=8, out_dim=65536)),
]
IMPLS = ("dinokit", "reference", "lightly")
PRECISIONS = ("fp32", "bf16")


def _args(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def _run_json(cmd: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-3:], "returncode": p.returncode,
                "command": " ".join(cmd)}
    rec = json.loads(lines[-1])
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _iqr(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    if len(xs) < 4:
        return (max(xs) - min(xs)) / max(statistics.median(xs), 1e-12)
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / max(q[1], 1e-12)


def bench_train(rounds: int, steps: int, impls, precisions, configs, log) -> list[dict]:
    out = []
    for name, cfg in configs:
        base = [PY, str(BENCH / "train_step.py"), *_args(cfg), "--json"]
        fl = _run_json(base + ["--impl", "reference", "--flops-only"], 1800)
        gflop = fl.get("gflop_per_step")
        log(f"[train] {name}: {gflop:.1f} GFLOP per step" if gflop else f"[train] {name}: FLOP count failed {fl}")
        cands = [(i, p) for i in impls for p in precisions]
        runs: dict[tuple, list[dict]] = {c: [] for c in cands}
        for r in range(rounds):
            k = r % len(cands)
            for impl, prec in cands[k:] + cands[:k]:
                cmd = base + ["--impl", impl, "--precision", prec, "--steps", str(steps), "--warmup", "1"]
                if gflop:
                    cmd += ["--gflop-per-step", repr(gflop)]
                rec = _run_json(cmd, 3600)
                rec["round"] = r
                runs[(impl, prec)].append(rec)
                msg = (f"{rec['img_per_s']:.2f} img/s, {rec['achieved_gflops']:.0f} GFLOP/s, peak RSS "
                       f"{rec['peak_rss_mib']:.0f} MiB" if "img_per_s" in rec else f"skipped/failed: "
                       f"{rec.get('skipped') or rec.get('error')}")
                log(f"[train] {name} round {r + 1}/{rounds} {impl}/{prec}: {msg}")
        rows = []
        for (impl, prec), recs in runs.items():
            ok = [x for x in recs if "img_per_s" in x]
            if not ok:
                rows.append({"impl": impl, "precision": prec, "missing": recs[0].get("skipped") or
                             recs[0].get("error")})
                continue
            rows.append({"impl": impl, "precision": prec, "img_per_s": _med([x["img_per_s"] for x in ok]),
                         "img_per_s_best": max(x.get("img_per_s_best", x["img_per_s"]) for x in ok),
                         "img_per_s_rounds": [x["img_per_s"] for x in ok],
                         "achieved_gflops": _med([x["achieved_gflops"] for x in ok]),
                         "ceiling_gflops": _med([x["ceiling_gflops"] for x in ok]),
                         "frac_of_ceiling": _med([x["frac_of_ceiling"] for x in ok]),
                         "peak_rss_mib": _med([x["peak_rss_mib"] for x in ok]),
                         "peak_rss_delta_mib": _med([x["peak_rss_delta_mib"] for x in ok]),
                         "step_iqr_rel": _med([x["step_iqr_rel"] for x in ok])})
        # paired per-round ratios
        def rate(impl, prec, r, runs=runs):
            for x in runs.get((impl, prec), []):
                if x.get("round") == r and "img_per_s" in x:
                    return x["img_per_s"]
            return None

        ratios = {}
        pairs = [(("dinokit", p), ("reference", p)) for p in precisions]
        pairs += [(("dinokit", p), ("lightly", p)) for p in precisions]
        pairs += [(("lightly", p), ("reference", p)) for p in precisions]
        if "bf16" in precisions and "fp32" in precisions:
            pairs += [(("dinokit", "bf16"), ("reference", "fp32")), (("dinokit", "bf16"), ("dinokit", "fp32")),
                      (("reference", "bf16"), ("reference", "fp32"))]
        best = {(r["impl"], r["precision"]): r.get("img_per_s_best") for r in rows}
        for (a, b) in pairs:
            per_round = [rate(*a, r) / rate(*b, r) for r in range(rounds) if rate(*a, r) and rate(*b, r)]
            if per_round:
                ratios[f"{a[0]}/{a[1]} vs {b[0]}/{b[1]}"] = {
                    "median": _med(per_round), "rounds": per_round, "iqr_rel": _iqr(per_round),
                    "best_of": best[a] / best[b] if best.get(a) and best.get(b) else None}
        out.append({"name": name, "config": cfg, "gflop_per_step": gflop, "rows": rows, "ratios": ratios,
                    "raw": {f"{i}/{p}": v for (i, p), v in runs.items()}})
    return out


def _fmt(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def _targets(results: dict) -> list[str]:
    """Issue 5's targets against this run."""
    rows = []
    train = {c["name"]: c for c in results.get("train", [])}

    def ratio(cfg_prefix, key):
        for name, c in train.items():
            if name.startswith(cfg_prefix) and key in c["ratios"]:
                r = c["ratios"][key]
                return r["median"], r["iqr_rel"], r.get("best_of")
        return None

    def row(what, target, got):
        if got is None:
            rows.append(f"| {what} | {target:.2f}x | not measured | |")
            return
        med, spread, best = got
        ok = "yes" if med >= target else "no"
        rows.append(f"| {what} | {target:.2f}x | {med:.2f}x (spread {_fmt(spread)}; best steps {_fmt(best)}x) | {ok} |")

    row("ViT-S/16 fp32 step vs reference fp32", 1.15, ratio("ViT-S/16", "dinokit/fp32 vs reference/fp32"))
    row("ViT-S/16 bf16 step vs reference bf16 (same autocast)", 1.3,
        ratio("ViT-S/16", "dinokit/bf16 vs reference/bf16"))
    row("ViT-S/16 bf16 step vs reference's default (fp32)", 2.5, ratio("ViT-S/16", "dinokit/bf16 vs reference/fp32"))
    row("ViT-S/8 small crops fp32 vs reference fp32", 1.15, ratio("ViT-S/8", "dinokit/fp32 vs reference/fp32"))
    row("ViT-S/8 small crops bf16 vs reference bf16", 1.3, ratio("ViT-S/8", "dinokit/bf16 vs reference/bf16"))
    row("ViT-T/16 small crops fp32 vs reference fp32", 1.4, ratio("ViT-T/16", "dinokit/fp32 vs reference/fp32"))
    row("ViT-T/16 small crops bf16 vs reference bf16", 1.4, ratio("ViT-T/16", "dinokit/bf16 vs reference/bf16"))
    aug = results.get("augment", {}).get("ratios", {}).get("fast vs reference")
    rows.append(f"| multi-crop augmentation per process, fast vs reference | 3.00x | "
                f"{_fmt(aug)}x | {'yes' if aug and aug >= 3 else 'no'} |")
    mem = []
    for name, c in train.items():
        by = {(r["impl"], r["precision"]): r for r in c["rows"] if "peak_rss_mib" in r}
        for prec in PRECISIONS:
            d, r = by.get(("dinokit", prec)), by.get(("reference", prec))
            if d and r:
                mem.append(f"{name.split(',')[0]} {prec}: {d['peak_rss_mib']:.0f} vs {r['peak_rss_mib']:.0f} MiB"
                           + ("" if d["peak_rss_mib"] <= r["peak_rss_mib"] else " (above)"))
    ok = all("above" not in m for m in mem) if mem else None
    rows.append(f"| peak RSS <= reference's (dinokit vs reference) | <= | {'; '.join(mem) or 'not measured'} | "
                f"{'yes' if ok else 'no' if ok is False else ''} |")
    return ["### Targets of issue 5 in this run", "",
            "| target | wanted | measured (median of paired rounds) | reached |", "|---|---|---|---|", *rows, ""]


def render(results: dict) -> str:
    m = results["machine"]
    lines = [BEGIN, "",
             f"Generated by `{results['command']}` on {m['date']} — {m['cpu']} ({m['cores']} cores, "
             f"{m['torch_threads']} torch threads; {m['cpu_flags']}), Python {m['python']}, torch {m['torch']}, "
             f"torchvision {m['torchvision']}, timm {m['timm']}, lightly {m['lightly']}, Pillow {m['pillow']}, "
             f"numpy {m['numpy']}; git {m['git']}. Load average at the start: {m['loadavg_1m']:.2f} "
             f"(the machine was shared: read the ratios, which pair candidates measured under the same load).", ""]
    lines += _targets(results)
    if "matmul" in results:
        lines += ["### Matmul ceiling (`F.linear` at the ViT block's shapes)", "",
                  "| shapes | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |", "|---|---|---|---|"]
        for name, rec in results["matmul"].items():
            c = rec.get("ceiling_gflops", {})
            lines.append(f"| {name} ({rec.get('tokens')} tokens) | {_fmt(c.get('fp32'), 0)} | {_fmt(c.get('bf16'), 0)} "
                         f"| {_fmt(c['bf16'] / c['fp32'] if c.get('fp32') else None)}x |")
        lines += ["", "Command: `python benchmarks/matmul.py --arch ARCH --tokens N --json`.", ""]
    for cfg in results.get("train", []):
        when = f", measured {cfg['measured']}" if cfg.get("measured") else ""
        lines += [f"### Training step: {cfg['name']} ({_fmt(cfg['gflop_per_step'], 1)} GFLOP per step{when})", "",
                  "| implementation | precision | images/s | achieved GFLOP/s | fraction of ceiling | "
                  "peak RSS MiB (above baseline) | step IQR/median |", "|---|---|---|---|---|---|---|"]
        for r in cfg["rows"]:
            if "missing" in r:
                lines.append(f"| {r['impl']} | {r['precision']} | not run: {r['missing']} | | | | |")
                continue
            lines.append(f"| {r['impl']} | {r['precision']} | {_fmt(r['img_per_s'])} | {_fmt(r['achieved_gflops'], 0)} "
                         f"| {_fmt(r['frac_of_ceiling'] * 100 if r['frac_of_ceiling'] else None, 0)}% of "
                         f"{_fmt(r['ceiling_gflops'], 0)} | {_fmt(r['peak_rss_mib'], 0)} "
                         f"({_fmt(r['peak_rss_delta_mib'], 0)}) | {_fmt(r['step_iqr_rel'])} |")
        lines += ["", "| ratio (paired per round) | median | per round | spread (IQR or range / median) | "
                  "best step vs best step |", "|---|---|---|---|---|"]
        for k, v in cfg["ratios"].items():
            lines.append(f"| {k} | **{v['median']:.2f}x** | {', '.join(f'{x:.2f}' for x in v['rounds'])} | "
                         f"{_fmt(v['iqr_rel'])} | {_fmt(v.get('best_of'))}x |")
        c = cfg["config"]
        lines += ["", "Command (one candidate): `python benchmarks/train_step.py " + " ".join(_args(c))
                  + " --impl IMPL --precision PREC --json`.", ""]
    if "augment" in results:
        a = results["augment"]
        lines += ["### Multi-crop augmentation (2 x 224 + 8 x 96 per image, one thread per process)", ""]
        if "results" in a:
            lines += [f"{a['images']} photographs ({a['image_dir']}).", "",
                      "| implementation | images/s | IQR/median |", "|---|---|---|"]
            for r in a["results"]:
                lines.append(f"| {r['impl']} | {_fmt(r['img_per_s'], 1)} | {_fmt(r['iqr_rel'])} |")
            lines += ["", "| ratio | value |", "|---|---|"]
            lines += [f"| {k} | **{v:.2f}x** |" for k, v in a["ratios"].items()]
        else:
            lines.append(f"Not run: {a.get('error')}")
        lines += ["", f"Command: `{a.get('command', 'python benchmarks/augment.py --json')}`.", ""]
    if "extract" in results:
        e = results["extract"]
        lines += ["### Feature extraction (backbone forward, eval, no gradients)", ""]
        if "results" in e:
            c = e["config"]
            lines += [f"{c['arch']}/{c['patch_size']}, batch {c['batch_size']}, {c['image_size']} px.", "",
                      "| implementation | precision | images/s | IQR/median |", "|---|---|---|---|"]
            for r in e["results"]:
                lines.append(f"| {r['impl']} | {r['precision']} | {_fmt(r['img_per_s'], 1)} | {_fmt(r['iqr_rel'])} |")
            lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f}x |" for k, v in e["ratios"].items()]
        else:
            lines.append(f"Not run: {e.get('error')}")
        lines += ["", f"Command: `{e.get('command', 'python benchmarks/extract.py --json')}`.", ""]
    if "knn" in results:
        k = results["knn"]
        lines += ["### k-NN (benchmarks/knn.py)", ""]
        if "error" in k or "skipped" in k:
            lines.append(f"Not run: {k.get('skipped') or k.get('error')}")
        else:
            lines += ["```", json.dumps({x: y for x, y in k.items() if x not in ("machine",)}, indent=1)[:3000], "```"]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_doc(block: str) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Latest `make bench` run\n\n" + block + "\n"
    DOC.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating process rounds per training candidate")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per training process")
    ap.add_argument("--only", default="matmul,train,augment,extract,knn")
    ap.add_argument("--configs", default="", help="comma list of config indices (default: all)")
    ap.add_argument("--quick", action="store_true", help="1 round, 2 steps, ViT-T only (smoke test)")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    ap.add_argument("--merge", action="store_true", help="update benchmarks/results.json in place: keep the sections "
                    "and training configurations not re-run (e.g. to re-measure one configuration)")
    a = ap.parse_args(argv)
    only = set(a.only.split(","))
    configs = CONFIGS if not a.configs else [CONFIGS[int(i)] for i in a.configs.split(",")]
    if a.quick:
        a.rounds, a.steps, configs = 1, 2, CONFIGS[:1]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    command = " ".join(["python", "benchmarks/run_all.py", *(sys.argv[1:] if argv is None else argv)])
    results: dict = {"command": command, "machine": machine_info()}
    previous: dict = {}
    if a.merge and RESULTS.exists():
        previous = json.loads(RESULTS.read_text())
        results = {**previous, "command": f"{previous.get('command')}; then {command}",
                   "machine": previous.get("machine", results["machine"])}
    if "matmul" in only:
        results["matmul"] = {}
        for arch, tokens in (("vit_tiny", 32 * (2 * 37 + 8 * 10)), ("vit_small", 8 * (2 * 197 + 8 * 37))):
            rec = _run_json([PY, str(BENCH / "matmul.py"), "--arch", arch, "--tokens", str(tokens), "--json"], 900)
            results["matmul"][arch] = rec
            log(f"[matmul] {arch}: {rec.get('ceiling_gflops')}")
    if "train" in only:
        fresh = bench_train(a.rounds, a.steps, IMPLS, PRECISIONS, configs, log)
        if a.merge and previous.get("train"):
            by_name = {c["name"]: c for c in previous["train"]}
            now = machine_info()["date"]
            by_name.update({c["name"]: {**c, "measured": now} for c in fresh})
            results["train"] = [by_name[n] for n, _ in CONFIGS if n in by_name]
        else:
            results["train"] = fresh
    if "augment" in only:
        results["augment"] = _run_json([PY, str(BENCH / "augment.py"), "--json"], 3600)
        log(f"[augment] {results['augment'].get('ratios') or results['augment'].get('error')}")
    if "extract" in only:
        results["extract"] = _run_json([PY, str(BENCH / "extract.py"), "--json"], 3600)
        log(f"[extract] {results['extract'].get('ratios') or results['extract'].get('error')}")
    if "knn" in only:
        knn = BENCH / "knn.py"
        results["knn"] = (_run_json([PY, str(knn), "--json"], 3600) if knn.exists()
                          else {"skipped": "benchmarks/knn.py is not present"})
        log(f"[knn] {'done' if 'error' not in results['knn'] else results['knn']['error']}")
    RESULTS.write_text(json.dumps(results, indent=1, default=str))
    log(f"wrote {RESULTS}")
    if not a.no_doc:
        write_doc(render(results))
        log(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
