"""``make bench``: every benchmark side by side, written to docs/benchmarks.md and benchmarks/results.json.

    python benchmarks/run_all.py [--steps 6] [--rounds 2] [--only matmul,train,augment,extract,knn] [--quick]

1. matmul ceilings, fp32 and bf16, at ViT-T and ViT-S shapes (``benchmarks/matmul.py``);
2. one full DINO training step for ViT-T/16, ViT-S/16 and ViT-S/8 (small crops), fp32 and bf16, dinokit vs the
   reference's implementation vs lightly + timm (``benchmarks/train_step.py``): all six candidates interleaved
   step by step in one process (``--steps`` rounds, rotating order, the matmul ceiling probed between rounds) give
   images/s, achieved GFLOP/s, the fraction of the ceiling and the verdict, the median of the per-round ratios
   (paired: same round, same load); then every candidate in its own process (``--rounds`` alternating rounds)
   gives its peak RSS and its own-process images/s, which includes process-wide choices (dinokit's allocator
   setting applies to the whole interleaved process, so the interleaved ratios understate dinokit there);
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


def bench_train(rounds: int, steps: int, impls, precisions, configs, log, mem_steps: int = 2) -> list[dict]:
    """Per configuration: (1) every candidate interleaved step by step in one process, ``steps`` rounds with a
    rotating order and the ceiling probed between rounds -> images/s, GFLOP/s, ceiling fraction and the paired
    per-round ratios (the verdict); (2) every candidate in its own process (``rounds`` alternating rounds of a
    warm-up + ``mem_steps`` steps) -> peak RSS and its own-process images/s (process-wide settings included)."""
    out = []
    for name, cfg in configs:
        base = [PY, str(BENCH / "train_step.py"), *_args(cfg), "--json"]
        fl = _run_json(base + ["--impl", "reference", "--flops-only"], 1800)
        gflop = fl.get("gflop_per_step")
        log(f"[train] {name}: {gflop:.1f} GFLOP per step" if gflop else f"[train] {name}: FLOP count failed {fl}")
        extra = ["--gflop-per-step", repr(gflop)] if gflop else []
        inter = _run_json(base + ["--impl", ",".join(impls), "--precision", ",".join(precisions), "--steps",
                                  str(steps), "--warmup", "1", *extra], 7200)
        res = {(r["impl"], r["precision"]): r for r in inter.get("results", [])}
        log(f"[train] {name} interleaved: " + (", ".join(f"{i}/{p} {r['img_per_s']:.2f} img/s" for (i, p), r in
                                                       res.items()) or str(inter.get("error") or inter)))
        cands = [(i, p) for i in impls for p in precisions]
        own: dict[tuple, list[dict]] = {c: [] for c in cands}
        for r in range(rounds):
            k = r % len(cands)
            for impl, prec in cands[k:] + cands[:k]:
                rec = _run_json(base + ["--impl", impl, "--precision", prec, "--steps", str(mem_steps), "--warmup",
                                        "1", "--no-ceiling", *extra], 3600)
                own[(impl, prec)].append(rec)
                log(f"[train] {name} own process {r + 1}/{rounds} {impl}/{prec}: " +
                    (f"{rec['img_per_s']:.2f} img/s, peak RSS {rec['peak_rss_mib']:.0f} MiB" if "img_per_s" in rec
                     else f"skipped/failed: {rec.get('skipped') or rec.get('error')}"))
        rows = []
        for impl, prec in cands:
            ok = [x for x in own[(impl, prec)] if "img_per_s" in x]
            r = res.get((impl, prec))
            if r is None and not ok:
                rows.append({"impl": impl, "precision": prec,
                             "missing": (inter.get("skipped") or own[(impl, prec)][0].get("skipped")
                                         or own[(impl, prec)][0].get("error"))})
                continue
            row = {"impl": impl, "precision": prec}
            if r is not None:
                row.update({k: r[k] for k in ("img_per_s", "img_per_s_best", "achieved_gflops", "ceiling_gflops",
                                              "frac_of_ceiling", "step_iqr_rel", "step_s_all")})
            if ok:
                row.update(own_img_per_s=_med([x["img_per_s"] for x in ok]),
                           peak_rss_mib=_med([x["peak_rss_mib"] for x in ok]),
                           peak_rss_delta_mib=_med([x["peak_rss_delta_mib"] for x in ok]))
            rows.append(row)
        by = {(r["impl"], r["precision"]): r for r in rows}
        pairs = [(("dinokit", p), ("reference", p)) for p in precisions]
        pairs += [(("dinokit", p), ("lightly", p)) for p in precisions]
        pairs += [(("lightly", p), ("reference", p)) for p in precisions]
        if "bf16" in precisions and "fp32" in precisions:
            pairs += [(("dinokit", "bf16"), ("reference", "fp32")), (("dinokit", "bf16"), ("dinokit", "fp32")),
                      (("reference", "bf16"), ("reference", "fp32"))]
        ratios = {}
        for a, b in pairs:
            ra, rb = by.get(a, {}), by.get(b, {})
            if not (ra.get("step_s_all") and rb.get("step_s_all")):
                continue
            per_round = [tb / ta for ta, tb in zip(ra["step_s_all"], rb["step_s_all"])]  # same round, same load
            own_a = ra.get("own_img_per_s")
            own_b = rb.get("own_img_per_s")
            ratios[f"{a[0]}/{a[1]} vs {b[0]}/{b[1]}"] = {
                "median": _med(per_round), "rounds": per_round, "iqr_rel": _iqr(per_round),
                "best_of": ra["img_per_s_best"] / rb["img_per_s_best"],
                "own_process": own_a / own_b if own_a and own_b else None}
        out.append({"name": name, "config": cfg, "gflop_per_step": gflop, "rows": rows, "ratios": ratios,
                    "raw": {"interleaved": inter, "own_process": {f"{i}/{p}": v for (i, p), v in own.items()}}})
    return out


def _fmt(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}"


def _times(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


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
        rows.append(f"| {what} | {target:.2f}x | {med:.2f}x (spread {_fmt(spread)}; best steps {_times(best)}) "
                    f"| {ok} |")

    row("ViT-S/16 fp32 step vs reference fp32", 1.15, ratio("ViT-S/16", "dinokit/fp32 vs reference/fp32"))
    row("ViT-S/16 bf16 step vs reference bf16 (same autocast)", 1.3,
        ratio("ViT-S/16", "dinokit/bf16 vs reference/bf16"))
    row("ViT-S/16 bf16 step vs reference's default (fp32)", 2.5, ratio("ViT-S/16", "dinokit/bf16 vs reference/fp32"))
    row("ViT-S/8 small crops fp32 vs reference fp32", 1.15, ratio("ViT-S/8", "dinokit/fp32 vs reference/fp32"))
    row("ViT-S/8 small crops bf16 vs reference bf16", 1.3, ratio("ViT-S/8", "dinokit/bf16 vs reference/bf16"))
    row("ViT-T/16 small crops fp32 vs reference fp32", 1.4, ratio("ViT-T/16", "dinokit/fp32 vs reference/fp32"))
    row("ViT-T/16 small crops bf16 vs reference bf16", 1.4, ratio("ViT-T/16", "dinokit/bf16 vs reference/bf16"))
    for key, what in (("augment", "multi-crop augmentation per process, fast vs reference"),
                      ("augment_large", "the same on 2000 x 1500 photos")):
        if key in results:
            aug = results[key].get("ratios", {}).get("fast vs reference")
            rows.append(f"| {what} | 3.00x | {_times(aug)} | {'yes' if aug and aug >= 3 else 'no'} |")
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
    if m.get("native_bf16") is False:
        lines += ["**This CPU has no native bf16** (neither AVX512-BF16 nor AMX): oneDNN emulates bf16 in fp32, so "
                  "every bf16 figure below measures that emulation, not bf16 hardware, and `precision auto` trains "
                  "in fp32 here. The issue's bf16 targets were set for a CPU with bf16 units.", ""]
    lines += _targets(results)
    if "matmul" in results:
        lines += ["### Matmul ceiling (the ViT block's shapes; best of `F.linear` and oneDNN's matmul)", "",
                  "| shapes | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 | fp32 `F.linear` (MKL) | fp32 oneDNN |",
                  "|---|---|---|---|---|---|"]
        for name, rec in results["matmul"].items():
            c, lib = rec.get("ceiling_gflops", {}), rec.get("ceiling_by_library", {}).get("fp32", {})
            lines.append(f"| {name} ({rec.get('tokens')} tokens) | {_fmt(c.get('fp32'), 0)} | {_fmt(c.get('bf16'), 0)} "
                         f"| {_fmt(c['bf16'] / c['fp32'] if c.get('fp32') else None)}x "
                         f"| {_fmt(lib.get('F.linear'), 0)} | {_fmt(lib.get('oneDNN'), 0)} |")
        lines += ["", "Command: `python benchmarks/matmul.py --arch ARCH --tokens N --json`.", ""]
    for cfg in results.get("train", []):
        when = f", measured {cfg['measured']}" if cfg.get("measured") else ""
        lines += [f"### Training step: {cfg['name']} ({_fmt(cfg['gflop_per_step'], 1)} GFLOP per step{when})", "",
                  "| implementation | precision | images/s (interleaved) | achieved GFLOP/s | fraction of ceiling | "
                  "step IQR/median | images/s (own process) | peak RSS MiB (above baseline) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in cfg["rows"]:
            if "missing" in r:
                lines.append(f"| {r['impl']} | {r['precision']} | not run: {r['missing']} | | | | | |")
                continue
            frac = r.get("frac_of_ceiling")
            lines.append(f"| {r['impl']} | {r['precision']} | {_fmt(r.get('img_per_s'))} | "
                         f"{_fmt(r.get('achieved_gflops'), 0)} | {_fmt(frac * 100 if frac else None, 0)}% of "
                         f"{_fmt(r.get('ceiling_gflops'), 0)} | {_fmt(r.get('step_iqr_rel'))} | "
                         f"{_fmt(r.get('own_img_per_s'))} | {_fmt(r.get('peak_rss_mib'), 0)} "
                         f"({_fmt(r.get('peak_rss_delta_mib'), 0)}) |")
        lines += ["", "| ratio | median of paired rounds | per round | spread (IQR / median) | best step vs best "
                  "step | own processes |", "|---|---|---|---|---|---|"]
        for k, v in cfg["ratios"].items():
            lines.append(f"| {k} | **{v['median']:.2f}x** | {', '.join(f'{x:.2f}' for x in v['rounds'])} | "
                         f"{_fmt(v['iqr_rel'])} | {_times(v.get('best_of'))} | {_times(v.get('own_process'))} |")
        c = cfg["config"]
        lines += ["", "Command (one candidate): `python benchmarks/train_step.py " + " ".join(_args(c))
                  + " --impl IMPL --precision PREC --json`.", ""]
    for key, title in (("augment", "Multi-crop augmentation (2 x 224 + 8 x 96 per image, one thread per process)"),
                       ("augment_large", "Multi-crop augmentation on 2000 x 1500 photos (`--upscale 4`)")):
        if key not in results:
            continue
        a = results[key]
        lines += [f"### {title}", ""]
        if "results" in a:
            am = a.get("machine", {})
            when = (f" Measured {am['date']} (git {am.get('git')}, load average {am['loadavg_1m']:.2f})."
                    if am.get("date") and am.get("date") != results["machine"].get("date") else "")
            lines += [f"{a['images']} photographs ({a['image_dir']}).{when}", "",
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
    ap.add_argument("--rounds", type=int, default=2, help="alternating own-process rounds per training candidate "
                    "(peak memory, own-process images/s)")
    ap.add_argument("--steps", type=int, default=6, help="interleaved rounds (one step per candidate each)")
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
        # the same photos at 2000x1500, where JPEG draft decoding pays (reference vs fast only: the others decode
        # like the reference)
        results["augment_large"] = _run_json([PY, str(BENCH / "augment.py"), "--upscale", "4", "--impl",
                                              "reference,fast", "--rounds", "5", "--json"], 3600)
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
