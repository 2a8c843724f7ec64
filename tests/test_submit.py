"""``dinokit submit``: the sbatch job it builds, and real runs through submitit's local executor (a job process
started by a controller, as on SLURM), including a preemption that requeues the job and resumes training."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from dinokit.cli import main
from dinokit.submitit_launcher import SubmitSettings, TrainJob, submit_training

from .helpers import TINY_VIT, make_image_folder

needs_submitit = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                    reason="submitit not installed (pip install 'dinokit[slurm]')")


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "imgs", n_per_class=6)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job processes inherit it


@needs_submitit
def test_dry_run_prints_the_multi_node_sbatch_job(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["submit", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--partition", "P",
                 "--timeout-min", "600", "--output-dir", str(out), "--", "--data", "/data/imagenet",
                 "--arch", "vit_small"]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=P", "#SBATCH --time=600", "#SBATCH --signal=USR2@120",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --mem=320GB", "srun --unbuffered",
                 "-m submitit.core._submit"):
        assert line in script, line
    assert f"dinokit train --data /data/imagenet --arch vit_small --output-dir {out}" in script


def test_clear_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    assert main(["submit", "--dry-run", "--output-dir", str(tmp_path), "--", "--data", "x"]) == 2
    err = capsys.readouterr().err
    assert "needs submitit" in err and "dinokit[slurm]" in err and "Traceback" not in err
    monkeypatch.undo()
    if importlib.util.find_spec("submitit") is None:
        return
    assert main(["submit", "--dry-run", "--output-dir", str(tmp_path), "--", "--arch", "vit_small"]) == 2
    assert "no training data" in capsys.readouterr().err
    assert main(["submit", "--dry-run", "--output-dir", str(tmp_path), "--", "--data", "x", "--output-dir",
                 "y"]) == 2
    assert "give --output-dir to dinokit submit" in capsys.readouterr().err
    assert main(["submit", "--cluster", "local", "--nodes", "2", "--output-dir", str(tmp_path), "--", "--data",
                 str(tmp_path)]) == 2
    assert "--nodes 1" in capsys.readouterr().err


@needs_submitit
def test_paths_are_made_absolute_and_checked_before_submitting(tmp_path, capsys, monkeypatch):
    """The job may start elsewhere: relative data/config paths go to it absolute; a missing one is an error for
    a job on this machine (nothing is submitted) and a warning for a cluster (its nodes may see other disks)."""
    from dinokit.commands import submit

    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    argv, _ = submit._absolute_paths(["--data", "imgs", "--knn-train=fashion-mnist", "--knn-val",
                                      "fashion-mnist:fm", "--arch", "vit_small"])
    assert argv == ["--data", str(tmp_path / "imgs"), "--knn-train=fashion-mnist", "--knn-val",
                    f"fashion-mnist:{tmp_path / 'fm'}", "--arch", "vit_small"]
    submitted = []
    monkeypatch.setattr("dinokit.submitit_launcher.submit_training", lambda *a, **k: submitted.append(a))
    assert main(["submit", "--cluster", "local", "--output-dir", str(tmp_path / "o"), "--", "--data",
                 "nope"]) == 2
    assert capsys.readouterr().err.strip() == (f"dinokit submit: error: --data {tmp_path / 'nope'}: not found "
                                               "(checked before submitting)")
    assert not submitted
    with pytest.warns(UserWarning, match="--data nope: not found on this machine; the compute nodes must see it"):
        submit._report_missing(["--data nope"], local=False)
    assert main(["submit", "--dry-run", "--output-dir", str(tmp_path / "o"), "--", "--data", "imgs"]) == 0
    assert f"dinokit train --data {tmp_path / 'imgs'} --output-dir" in capsys.readouterr().out


@needs_submitit
def test_local_executor_runs_a_two_task_job_to_completion(folder, tmp_path, capsys):
    """2 tasks, as SLURM would start on a node with 2 GPUs: each gets RANK / WORLD_SIZE / MASTER_* from submitit's
    JobEnvironment, they form one gloo process group of world 2 and train together."""
    out = tmp_path / "run"
    assert main(["submit", "--cluster", "local", "--gpus-per-node", "0", "--tasks-per-node", "2",
                 "--timeout-min", "10", "--output-dir", str(out), "--wait", "--", "--data", str(folder), *TINY_VIT,
                 "--batch-size-per-gpu", "2", "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "world 2" in printed and "done: 1 epoch, 3 iterations" in printed  # 12 images / (2 x 2)
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 3
    logs = {p.name: p.read_text() for p in (out / "submitit").glob("*_log.err")}
    assert len(logs) == 2  # one log per task; rank 0 alone reports
    assert sum("world 2, global batch 4" in text for text in logs.values()) == 1


class PreemptedOnce(TrainJob):
    """Like TrainJob, but the first time the iteration-2 checkpoint is written the job receives SIGUSR2, the
    signal SLURM sends before preempting or timing out a job."""

    def __init__(self, train_argv, marker):
        super().__init__(train_argv)
        self.marker = marker

    def __call__(self):
        import dinokit.trainer as T

        marker, real_save = Path(self.marker), T.Trainer.save

        def save(trainer, numbered=False):
            real_save(trainer, numbered)
            if trainer.iteration == 2 and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGUSR2)

        T.Trainer.save = save
        return super().__call__()


@needs_submitit
def test_preemption_requeues_and_resumes_from_the_checkpoint(folder, tmp_path):
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job process need not import this test
    out = tmp_path / "run"
    marker = tmp_path / "preempted"
    settings = SubmitSettings(output_dir=str(out), gpus_per_node=0, timeout_min=60, cluster="local")
    argv = ["--data", str(folder), *TINY_VIT, "--batch-size-per-gpu", "4", "--epochs", "2", "--save-every-steps", "1"]
    job = submit_training(argv, settings, job_class=lambda a: PreemptedOnce(a, str(marker)))
    result = job.result()
    assert marker.exists()
    assert result["iterations"] == 6 and result["epochs"] == 2
    log = (job.stderr() or "") + (job.stdout() or "")
    # a preemption (well within the time limit): checkpoint() requeues without using up a time-out
    assert "this job is preempted" in log and "Calling checkpoint method" in log
    assert "Requeued job" in log and "(30 remaining timeouts)" in log
    assert "resumed from" in log and "at epoch 0, iteration 2" in log
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 6


@needs_submitit
def test_a_failed_job_waited_for_is_one_line(folder, tmp_path, capsys, monkeypatch):
    class FailedJob:
        job_id = "42"

        def results(self):
            # submitit's FailedJobError: the task's traceback, then the paths of its logs
            raise RuntimeError("Job (task=0) failed during processing with trace:\n----------------------\n"
                               "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                               "dinokit.errors.DataError: none of the 3 image files under D could be read\n"
                               "----------------------\nYou can check full logs with 'job.stderr(0)' and "
                               "'job.stdout(0)'or at paths:\n  - /o/submitit/42_0_log.err\n"
                               "  - /o/submitit/42_0_log.out")

    monkeypatch.setattr("dinokit.submitit_launcher.submit_training", lambda *a, **k: FailedJob())
    assert main(["submit", "--cluster", "local", "--output-dir", str(tmp_path / "o"), "--wait", "--", "--data",
                 str(folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("dinokit submit: error: job 42 failed: dinokit.errors.DataError: none of the 3 image "
                          "files under D could be read (logs in ") and "\n" not in err


@needs_submitit
def test_a_failed_local_job_reports_its_error_line_and_log(tmp_path, capsys):
    """A real job that fails (every image unreadable): the one-line error is the job's exception, not the list
    of log paths that ends submitit's message, and names the task's log (a flat file for the local executor)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(4):
        (bad / f"x{i}.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    assert main(["submit", "--cluster", "local", "--gpus-per-node", "0", "--timeout-min", "10", "--output-dir",
                 str(out), "--wait", "--", "--data", str(bad), *TINY_VIT, "--batch-size-per-gpu", "2"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    (log,) = (out / "submitit").glob("*_0_log.err")
    job_id = log.name.split("_")[0]
    assert f"logs {out / 'submitit'}/{job_id}_<task>_log.out|err" in captured.out
    assert err == (f"dinokit submit: error: job {job_id} failed: dinokit.errors.DataError: none of the 4 image "
                   f"files under {bad} could be read (log: {log})")


class ExitsWithAnError(TrainJob):
    """A job that stops the way ``dinokit train`` does on a bad option: its one-line error on stderr and exit
    status 2 (a SystemExit, so submitit records no result and raises UncompletedJobError with the error stream)."""

    def __call__(self):
        print("some output\ndinokit train: error: --data X: no such folder", file=sys.stderr, flush=True)
        print("submitit-like noise after it", file=sys.stderr, flush=True)
        raise SystemExit(2)


@needs_submitit
def test_a_job_that_exits_with_dinokits_error_line_reports_that_line(folder, tmp_path, capsys, monkeypatch):
    import cloudpickle

    import dinokit.submitit_launcher as launcher

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    real = launcher.submit_training
    monkeypatch.setattr(launcher, "submit_training", lambda argv, s: real(argv, s, job_class=ExitsWithAnError))
    out = tmp_path / "run"
    assert main(["submit", "--cluster", "local", "--gpus-per-node", "0", "--timeout-min", "10", "--output-dir",
                 str(out), "--wait", "--", "--data", str(folder), *TINY_VIT]) == 1
    err = capsys.readouterr().err.strip()
    (log,) = (out / "submitit").glob("*_0_log.err")
    assert err == (f"dinokit submit: error: job {log.name.split('_')[0]} failed: --data X: no such folder "
                   f"(log: {log})")


def test_the_error_line_comes_from_the_log_when_the_exception_has_none(tmp_path):
    from dinokit.commands.submit import _job_failure

    log = tmp_path / "7_1_log.err"
    log.write_text("submitit INFO (...) - Starting\nTraceback (most recent call last):\n  File \"t.py\", line 3\n"
                   "    f()\nValueError: bad value\n  with a second line\nsubmitit ERROR (...) - failed\n")

    class Job:
        job_id = "7"

        def task(self, i):
            assert i == 1  # the failed task named by submitit's message
            return type("T", (), {"paths": type("P", (), {"stderr": str(log)})})()

    assert _job_failure(Job(), RuntimeError("Job 7 (task: 1) has not produced any output (state: FAILED)"),
                        tmp_path) == f"job 7 failed: ValueError: bad value (log: {log})"
    assert _job_failure(Job(), RuntimeError("Job 7 (task: 1) with path X\nhas not produced any output"),
                        tmp_path).startswith("job 7 failed: ValueError: bad value")
    log.write_text("nothing useful\n")
    assert _job_failure(Job(), RuntimeError("Job 7 (task: 1) timed out\n  - /a/path"),
                        tmp_path) == f"job 7 failed: Job 7 (task: 1) timed out (log: {log})"


def test_a_builtin_recipe_name_is_passed_on_as_a_name(tmp_path, monkeypatch):
    """``--config vit_small_100ep`` names a recipe shipped in the package: found where the job runs, not a
    missing local path."""
    from dinokit.commands import submit

    monkeypatch.chdir(tmp_path)
    argv, missing = submit._absolute_paths(["--config", "vit_small_100ep", "--data", "imgs"])
    assert argv == ["--config", "vit_small_100ep", "--data", str(tmp_path / "imgs")]
    assert missing == [f"--data {tmp_path / 'imgs'}"]
    argv, missing = submit._absolute_paths(["--config=nope.yaml"])
    assert argv == [f"--config={tmp_path / 'nope.yaml'}"] and missing == [f"--config {tmp_path / 'nope.yaml'}"]
