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
    assert "head 0" in page and "mask 1" in page and "vit_custom" in page


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
