import base64
import json
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from dinokit.cli import build_parser
from dinokit.commands.train import config_from_args
from dinokit.report import write_report
from dinokit.trainer import Trainer

from .helpers import TINY_VIT, make_image_folder

SECTIONS = ("results", "curves", "attention", "projection", "config", "environment")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    data = make_image_folder(tmp / "imgs", n_per_class=6)
    out = tmp / "run"
    cfg = config_from_args(build_parser("train").parse_args(
        ["train", "--data", str(data), "--output-dir", str(out), *TINY_VIT, "--batch-size-per-gpu", "4",
         "--epochs", "2", "--log-every", "1"]))
    Trainer(cfg).fit()
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"type": "knn", "knn_top1": 55.0, "knn_top5": 90.0, "epoch": 1, "iteration": 6,
                            "train_minutes": 0.01}) + "\n")
    (out / "results.json").write_text(json.dumps({"knn_top1": 55.0, "knn_top1_random_init": 40.0}))
    return out


def test_report_has_every_section_and_only_embedded_images(run_dir):
    r = subprocess.run([sys.executable, "-m", "dinokit", "report", str(run_dir), "--points", "12"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    page = (run_dir / "report.html").read_text()
    for s in SECTIONS:
        assert f'id="{s}"' in page
    assert not re.search(r"""(src|href)=["']https?://""", page)  # self-contained
    srcs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(srcs) >= 8  # curves, attention grid, projection
    import io

    for s in srcs[:5]:
        Image.open(io.BytesIO(base64.b64decode(s))).verify()
    assert "head 0" in page and "head 1" in page and "outline" in page and "vit_custom" in page


def test_report_degrades_without_checkpoint(tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps({"type": "epoch", "epoch": 0, "iteration": 3, "loss": 2.0,
                                                    "lr": 0.1}) + "\n")
    page = write_report(tmp_path).read_text()
    assert "no checkpoint.pth yet" in page and 'id="curves"' in page


def test_report_plots_the_koleo_term_when_the_run_has_one(tmp_path):
    (tmp_path / "log.jsonl").write_text("".join(
        json.dumps({"type": "train", "epoch": 0, "iteration": i, "loss": 3.0 - i / 10, "koleo": -1.0 - i / 10,
                    "lr": 0.1}) + "\n" for i in range(1, 4)))
    page = write_report(tmp_path).read_text()
    assert "KoLeo term (unweighted)" in page and "loss (DINO + weighted KoLeo)" in page
    (tmp_path / "log.jsonl").write_text(json.dumps({"type": "train", "epoch": 0, "iteration": 1, "loss": 3.0}) + "\n")
    page = write_report(tmp_path).read_text()
    assert "KoLeo" not in page and "DINO loss" in page


def test_missing_run_dir_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dinokit", "report", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "run directory not found" in r.stderr and "Traceback" not in r.stderr


def test_a_folder_that_is_not_a_run_is_refused_and_left_alone(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")  # e.g. the images folder instead of the output folder
    r = subprocess.run([sys.executable, "-m", "dinokit", "report", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "is not a dinokit run directory" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "report.html").exists()


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (make test installs it)")
    if not (run_dir / "report.html").exists():
        write_report(run_dir, projection_points=12)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'u'}"]
    url = (run_dir / "report.html").resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for s in SECTIONS:
        assert f'id="{s}"' in dom.stdout
    shot = tmp_path / "shot.png"
    r = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2400", url], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    im = Image.open(shot).convert("L")
    lo, hi = im.getextrema()
    assert hi - lo > 100  # not a blank page


def _copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("report.html", "*.lock"))
    return dest


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_report_without_an_intact_checkpoint_is_written_from_the_log_with_a_warning(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / "run")
    for p in run.glob("checkpoint*.pth"):
        _truncate(p)
    r = subprocess.run([sys.executable, "-m", "dinokit", "report", str(run), "--points", "12"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "dinokit report: warning: " in r.stderr and "checkpoint.pth" in r.stderr
    page = (run / "report.html").read_text()
    assert "no intact checkpoint" in r.stderr and "no intact checkpoint" in page and "head 0" not in page
    assert "DINO loss" in page


def test_report_falls_back_to_the_newest_intact_checkpoint(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / "run")
    for p in run.glob("checkpoint?*.pth"):
        p.unlink()
    shutil.copy(run / "checkpoint.pth", run / "checkpoint0001.pth")
    _truncate(run / "checkpoint.pth")
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        page = write_report(run, n_images=2, projection_points=12).read_text()
    assert "Teacher from checkpoint0001.pth" in page and "head 0" in page and 'alt="projection"' in page


def test_report_option_and_path_errors_are_one_line_before_any_work(run_dir, tmp_path, capsys):
    from dinokit.cli import main

    run = _copy_run(run_dir, tmp_path / "run")
    for argv, msg in ((["--points", "0"], "--points must be > 0, got 0"),
                      (["--images", "-1"], "--images must be >= 0, got -1")):
        assert main(["report", str(run), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err
    (run / "report.html").mkdir()
    (run / "report.html" / "keep.txt").write_text("mine")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "report.html is a folder" in err
    assert (run / "report.html" / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "log.jsonl"
    a_file.write_text("{}\n")
    assert main(["report", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a run directory" in err


def test_report_with_no_attention_images(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / "run")
    page = write_report(run, n_images=0, projection_points=12).read_text()
    assert "No attention grid (--images 0)" in page and 'alt="projection"' in page and "head 0" not in page


def test_report_notes_a_checkpoint_it_cannot_rebuild_and_an_unreadable_results_file(tmp_path):
    import torch

    (tmp_path / "log.jsonl").write_text(json.dumps({"type": "epoch", "epoch": 0, "iteration": 3, "loss": 2.0}) + "\n")
    torch.save({"student": {}, "config": {}}, tmp_path / "checkpoint.pth")  # intact, but no teacher
    (tmp_path / "results.json").write_text('{"knn_top1": 5')  # cut by a crash
    with pytest.warns(UserWarning, match="cannot rebuild the teacher"):
        page = write_report(tmp_path).read_text()
    assert "cannot rebuild the teacher" in page and "results.json is unreadable" in page and "DINO loss" in page


def test_a_run_trained_with_a_relative_data_path_reports_from_elsewhere_with_data(tmp_path, monkeypatch):
    """config.yaml keeps --data as given: from another folder a relative path is not found. The note says so,
    and --data (write_report's ``data``) names the images instead."""
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "imgs", n_per_class=6)
    cfg = config_from_args(build_parser("train").parse_args(
        ["train", "--data", "imgs", "--output-dir", "run", *TINY_VIT, "--batch-size-per-gpu", "4", "--epochs", "1"]))
    Trainer(cfg).fit()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    page = write_report(tmp_path / "run", n_images=2, projection_points=12).read_text()
    assert "imgs is relative to the folder training ran in: run the report from there, or pass --data" in page
    page = write_report(tmp_path / "run", n_images=2, projection_points=12, data=str(tmp_path / "imgs")).read_text()
    assert "relative to the folder" not in page and 'alt="projection"' in page


_COLLAPSE_FIELDS = ("teacher_entropy", "entropy_max", "kl_mean_to_uniform", "center_norm", "distinct_prototypes")


def test_report_tolerates_records_missing_fields(run_dir, tmp_path):
    """Logs of older versions: a run stopped by SIGTERM on an epoch's last iteration and resumed logged that epoch
    without the collapse fields and with images_per_s 0; any other field may be missing too. The report plots
    what exists."""
    run = _copy_run(run_dir, tmp_path / "run")
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    for r in records:
        if r["type"] == "epoch" and r["epoch"] == 0:  # an earlier epoch: the old code read every epoch's fields
            for k in _COLLAPSE_FIELDS:
                r.pop(k)
            r.update(images_per_s=0, loss=0.0, lr=None)
    records += [{"type": "epoch"}, {"type": "train", "loss": 1.0}, {"type": "knn", "train_minutes": 0.02}, {}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = subprocess.run([sys.executable, "-m", "dinokit", "report", str(run), "--points", "12", "--images", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    page = (run / "report.html").read_text()
    assert "collapse diagnostics" in page and "online k-NN" in page and "DINO loss" in page
    assert "No collapse diagnostics logged for epochs 0, ?" in page
    assert "The record of epoch 0 has no steps of its own" in page and "placeholders" in page


def test_report_of_a_diverged_run_notes_non_finite_features(run_dir, tmp_path):
    import torch

    run = _copy_run(run_dir, tmp_path / "run")
    for p in run.glob("checkpoint*.pth"):
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
        for v in ckpt["teacher"].values():
            if v.is_floating_point():
                v.fill_(float("nan"))
        torch.save(ckpt, p)
    r = subprocess.run([sys.executable, "-m", "dinokit", "report", str(run), "--points", "12", "--images", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    page = (run / "report.html").read_text()
    assert "the features are not finite: the run diverged" in page
    assert "the attention is not finite: the run diverged" in page and "head 0" not in page
    assert "DINO loss" in page and 'id="environment"' in page


def test_attention_captions_name_a_class_only_where_there_is_one():
    """An unlabelled folder's images were captioned 'class -1'."""
    from PIL import Image

    from dinokit import build_backbone
    from dinokit.config import TrainConfig
    from dinokit.report import _attention_section

    vit = build_backbone("vit_custom", patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=32).eval()
    img = Image.new("RGB", (40, 40), (200, 30, 30))
    page = _attention_section(vit, TrainConfig(global_crop_size=32), [(img, -1), (img, 2)])
    assert "<figcaption>input</figcaption>" in page and "<figcaption>class 2</figcaption>" in page
    assert "class -1" not in page
    page = _attention_section(vit, TrainConfig(global_crop_size=32), [(img, 1), (img, 5)],
                              classes=["cat", "dog <b>"])
    assert "<figcaption>class dog &lt;b&gt;</figcaption>" in page  # names where known, escaped
    assert "<figcaption>class 5</figcaption>" in page


def test_a_projection_of_fewer_than_three_images_is_a_note_not_a_crash(run_dir, tmp_path):
    """--points 1 (or a one-image run) raised IndexError from the 2-D PCA; the report promises notes instead."""
    run = _copy_run(run_dir, tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "dinokit", "report", str(run), "--points", "1", "--images", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "No projection: 1 image(s); it needs at least 3." in (run / "report.html").read_text()


def test_report_data_that_does_not_exist_is_an_error(run_dir, tmp_path, capsys):
    """Asked for explicitly, a missing --data folder gave exit 0 and only a note in the page."""
    from dinokit.cli import main

    run = _copy_run(run_dir, tmp_path / "run")
    for spec in (str(tmp_path / "nope"), f"fashion-mnist:{tmp_path / 'nope'}"):
        assert main(["report", str(run), "--data", spec]) == 2
        assert f"--data {spec}: {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert not (run / "report.html").exists()


def test_the_results_section_summarises_the_run_from_its_log(run_dir):
    """The report showed no epochs, images/s or k-NN as text; 'No results.json' although the log had them."""
    from dinokit.report import _run_summary, read_log

    log = read_log(run_dir)
    epochs = [r for r in log if r.get("type") == "epoch"]
    s = _run_summary(log)
    assert s["epochs done"] == 2 and s["iterations"] == epochs[-1]["iteration"] == 6
    assert s["training minutes"] == round(epochs[-1]["train_minutes"], 2)
    lo, hi = sorted(r["images_per_s"] for r in epochs)
    assert lo * 0.999 <= s["images / s"] <= hi * 1.001  # time-weighted over the epochs
    assert s["last epoch's loss"] == round(epochs[-1]["loss"], 4)
    knn = [r for r in log if r.get("type") == "knn"]
    from dinokit.trainer import format_duration

    assert s["online k-NN top-1 (last)"] == s["online k-NN top-1 (best)"] == \
        f"55.00% at {format_duration(60 * knn[-1]['train_minutes'])}"
    assert s["online k-NN top-1 (last)"].endswith(" s")  # a short run: seconds, not "0.0 min"
    page = write_report(run_dir, n_images=1, projection_points=8).read_text()
    assert "epochs done" in page and "online k-NN top-1 (best)" in page and "No results.json" not in page
    assert _run_summary([]) == {} and _run_summary([{"type": "epoch"}, {}]) == {}


def _has_line_colour(src: str) -> bool:
    """Whether a curve PNG shows matplotlib's first line colour (C0, #1f77b4) anywhere."""
    import io

    import numpy as np

    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")).astype(int)
    return bool((np.abs(img - np.array([31, 119, 180])).sum(axis=-1) < 40).any())


def test_single_point_curves_are_drawn_and_a_run_without_an_epoch_is_described(tmp_path):
    """A run with one logged iteration showed blank axes (a line through one point draws nothing), and a run
    stopped on a non-finite loss in its first epoch read "No log records" above curves of its records."""
    from dinokit.report import _curves

    one = [{"type": "train", "epoch": 0, "iteration": 1, "loss": 3.0, "lr": 1e-4, "wd": 0.04, "momentum": 0.996,
            "teacher_temp": 0.04}]
    pics, _ = _curves(one)
    assert len(pics) == 5 and all(_has_line_colour(src) for _, src in pics)
    log = one + [{**one[0], "iteration": 2, "loss": None}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    page = write_report(tmp_path).read_text()
    assert "No epoch completed: the log holds 2 iteration record(s), the last at iteration 2 with a non-finite " \
           "loss" in page and "No log records" not in page


def test_a_results_file_from_an_earlier_checkpoint_is_flagged(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "results.json").write_text(json.dumps({"knn_top1": 55.0, "iterations": 2}))
    page = write_report(run, n_images=1, projection_points=8).read_text()
    assert "results.json was computed at iteration 2; the run's log goes to iteration 6" in page
    (run / "results.json").write_text(json.dumps({"knn_top1": 55.0, "iterations": 6}))
    assert "results.json was computed at" not in write_report(run, n_images=1, projection_points=8).read_text()


def test_long_spiky_curves_stay_readable():
    """100k raw points with a few spikes of 50 drew the converged loss (~2) as a flat band at the bottom of a 0-60
    axis; one epoch's collapse panel had ticks at -0.05..0.05."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dinokit.report import _integer_x, _plot_curve

    rng = np.random.default_rng(0)
    y = 2 + np.exp(-np.arange(20_000) / 3000) * 8 + 0.1 * rng.standard_normal(20_000)
    y[::2000] = 50.0
    fig, ax = plt.subplots()
    note = _plot_curve(ax, list(range(1, 20_001)), y.tolist(), "loss")
    assert note == "10 point(s) above the plot, up to 50"
    assert ax.get_ylim()[1] < 12 and ax.get_ylabel() == "nats"
    assert any("running mean" in t.get_text() for t in ax.get_legend().get_texts())
    fig.canvas.draw()
    assert all("e" not in t.get_text() for t in ax.get_xticklabels())  # 5k, 10k, ...: no offset notation
    plt.close(fig)
    fig, ax = plt.subplots()
    assert _plot_curve(ax, [3], [1.5], "lr") is None and ax.get_ylabel() == "learning rate"
    ax2 = fig.add_subplot(2, 1, 2)
    ax2.plot([0], [1.0])
    _integer_x(ax2)
    fig.canvas.draw()
    assert [t.get_text() for t in ax2.get_xticklabels()] == ["-1", "0", "1"]
    plt.close(fig)


def test_curve_clipping_on_short_curves_and_corrupt_values():
    """40 points with one spike of 1e4 were not clipped (the interpolated quantile fell inside the spike);
    entropy_max 800 (exp overflow) and a loss of +-1e308 raised out of the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dinokit.report import _curves, _plot_curve

    y = [1.0 + 0.01 * i for i in range(40)]
    y[20] = 1e4
    fig, ax = plt.subplots()
    assert _plot_curve(ax, list(range(40)), y, "loss") == "1 point(s) above the plot, up to 1e+04"
    assert ax.get_ylim()[1] < 2
    plt.close(fig)
    fig, ax = plt.subplots()  # a plateau whose newest points fall: the fall is the news, not clipped away
    assert _plot_curve(ax, list(range(402)), [11.0 + 0.01 * (i % 5) for i in range(400)] + [9.0, 6.0], "loss") is None
    assert ax.get_ylim()[0] < 6
    plt.close(fig)
    log = [{"type": "train", "iteration": i, "loss": v} for i, v in enumerate([1.0] * 30 + [1e308, -1e308])]
    log += [{"type": "epoch", "epoch": 0, "iteration": 32, "teacher_entropy": 5.0, "entropy_max": 800.0,
             "kl_mean_to_uniform": 0.1, "distinct_prototypes": 3}]
    pics, _ = _curves(log)
    assert any(t.startswith("DINO loss") for t, _ in pics) and any(t == "collapse diagnostics" for t, _ in pics)
