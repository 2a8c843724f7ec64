"""Multi-process training on torch.distributed (CPU, gloo), launched by ``torchrun`` as users launch it.

Every launch runs ``python -m torch.distributed.run --standalone --nproc_per_node=2 WORKER <train options>``;
WORKER builds the same ``Trainer`` as ``dinokit train``, trains, then saves what each rank holds
(``rankN.pt``: student, teacher, centre, resume point, wrapper types), so per-rank state can be compared.

Tolerances (fp32, CPU): 2 ranks x batch B against 1 process x batch 2B differ only by the order of floating-point
sums (gradient all-reduce, per-rank loss means, centre sum): measured <= 1.2e-7 after 8 AdamW steps (peak lr
7.8e-4); the tests allow 2e-6 absolute (``TOL``), while every compared weight moved by > 1e-3 from its initial
value. The attention key bias is left out of these comparisons (see ``_comparable``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinokit.cli import build_parser
from dinokit.commands.train import config_from_args
from dinokit.trainer import Trainer

from .helpers import TINY_VIT, make_image_folder

TOL = 2e-6

WORKER = r'''
import os, sys, pathlib, torch
from dinokit.cli import build_parser
from dinokit.commands.train import config_from_args
from dinokit.trainer import Trainer
from dinokit import distributed as D


def main():
    torch.set_num_threads(1)
    argv = sys.argv[1:]
    rank_args = os.environ.get("DINOKIT_TEST_RANK_ARGS")  # "rank:arg arg ...": options this rank alone gets
    if rank_args and os.environ.get("RANK") == rank_args.split(":", 1)[0]:
        argv += rank_args.split(":", 1)[1].split()
    if os.environ.get("DINOKIT_TEST_CLI"):  # as `dinokit train` runs: its messages and exit code
        from dinokit.cli import main as cli_main
        sys.exit(cli_main(["train", *argv]))
    cfg = config_from_args(build_parser("train").parse_args(["train", *argv]))
    t = Trainer(cfg)
    resumed_at = t.iteration
    crash = os.environ.get("DINOKIT_TEST_CRASH")  # "rank:iteration:marker": die once, like a lost node
    if crash:
        rank, it, marker = crash.split(":", 2)
        if t.rank == int(rank) and not os.path.exists(marker):
            real_step = t.train_step

            def step(crops):
                if t.iteration == int(it):
                    open(marker, "w").close()
                    os._exit(13)
                return real_step(crops)

            t.train_step = step
    clock = os.environ.get("DINOKIT_TEST_CLOCK")  # "rank:factor": this rank's clock runs factor x fast
    if clock:
        rank, factor = clock.split(":")
        if t.rank == int(rank):
            import time as _time, types, dinokit.trainer as T
            t0 = _time.perf_counter()
            T.time = types.SimpleNamespace(**{k: getattr(_time, k) for k in dir(_time) if not k.startswith("_")})
            T.time.perf_counter = lambda: t0 + (_time.perf_counter() - t0) * float(factor)
    plans = []
    real_plan = t._plan_from_budget
    def record_plan(sec_per_iter, again=False):
        real_plan(sec_per_iter, again)
        plans.append((t.iteration, t.plan.total_iters))
    t._plan_from_budget = record_plan
    knn_calls = []
    real_knn = t.run_knn
    def knn():
        knn_calls.append(t.iteration)
        if t.main:  # a slow evaluation on rank 0: the other rank must not count the wait as training time
            __import__("time").sleep(float(os.environ.get("DINOKIT_TEST_KNN_SLEEP", "0")))
        return real_knn()
    t.run_knn = knn
    term = os.environ.get("DINOKIT_TEST_TERM")  # "rank:iteration": this rank alone gets SIGTERM after it
    if term:
        rank, it = map(int, term.split(":"))
        if t.rank == rank:
            inner_step = t.train_step

            def step_then_term(crops):
                out = inner_step(crops)
                if t.iteration + 1 == it:  # the loop counts the iteration after train_step
                    os.kill(os.getpid(), __import__("signal").SIGTERM)
                return out

            t.train_step = step_then_term
    nan = os.environ.get("DINOKIT_TEST_NAN")  # "rank:iteration": this rank alone gets a NaN loss there
    if nan:
        rank, it = map(int, nan.split(":"))
        if t.rank == rank:
            inner_loss = t.dino_loss.forward

            def nan_loss(*a, **k):
                out = inner_loss(*a, **k)
                return out * float("nan") if t.iteration == it else out

            t.dino_loss.forward = nan_loss
    from dinokit.trainer import Stopped
    stopped = None
    w0 = __import__("time").perf_counter()
    try:
        t.fit()
    except Stopped as e:
        stopped = str(e)
    fit_wall = __import__("time").perf_counter() - w0
    student, teacher, _ = t._model_states()
    is_ddp = lambda m: isinstance(m, torch.nn.parallel.DistributedDataParallel)
    torch.save({"resumed_at": resumed_at, "iteration": t.iteration, "center": t.dino_loss.center.cpu(),
                "student": student, "teacher": teacher, "fsdp": t.fsdp,
                "syncbn": [any(isinstance(m, torch.nn.SyncBatchNorm) for m in x.modules())
                           for x in (t.student, t.teacher)],
                "student_ddp": is_ddp(t.student_ddp), "teacher_ddp": is_ddp(t.teacher_fwd),
                "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", -1)),
                "plans": plans, "total_iters": t.plan.total_iters, "knn_calls": knn_calls,
                "train_seconds": t.train_seconds, "fit_wall": fit_wall, "stopped": stopped},
               pathlib.Path(cfg.output_dir) / f"rank{t.rank}.pt")
    D.cleanup()


# everything above lives in main()'s frame, freed (and the process group destroyed) while the interpreter
# is alive: torch objects that hold gloo work, freed during interpreter finalisation, can abort the process
main()
__import__("gc").collect()
'''

# 16 images: 2 ranks x 2 = 1 process x 4 = 4 iterations per epoch; 2 epochs = 8 AdamW steps. No drop path (random
# per rank), fp32, a high lr and a fast teacher so that the weights move far more than the tolerance.
COMMON = [*TINY_VIT, "--drop-path-rate", "0", "--epochs", "2", "--warmup-epochs", "1", "--lr", "0.05",
          "--momentum-teacher", "0.9", "--saveckp-freq", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    make_image_folder(root / "imgs", n_per_class=8)
    (root / "worker.py").write_text(WORKER)
    return root


def torchrun(work: Path, out: Path, *args: str, nproc: int = 2, launcher: tuple[str, ...] = (), env=None,
             timeout: int = 240, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *launcher,
           str(work / "worker.py"), "--data", str(work / "imgs"), "--output-dir", str(out), *COMMON, *args]
    # own session: on a time-out the launcher *and* its workers are killed (no orphaned ranks)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
    r = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
    # on failure show enough to find the failing rank's own traceback above torchrun's summary of it
    assert r.returncode == 0 or not check, (f"exit {r.returncode}\n--- stdout ---\n{r.stdout[-3000:]}\n"
                               f"--- stderr ---\n{r.stderr[-12000:]}")
    return r


def rank_state(out: Path, rank: int) -> dict:
    return torch.load(out / f"rank{rank}.pt", weights_only=True)


def _comparable(key: str, t: torch.Tensor) -> torch.Tensor:
    """The attention *key* bias (the middle third of ``qkv.bias``) gets an exactly-zero gradient (softmax is
    invariant to a constant added to every logit of a row), so in both runs its gradient is rounding noise that
    AdamW normalises into lr-sized steps: it is excluded from comparisons between different reductions."""
    if key.endswith("attn.qkv.bias"):
        d = t.shape[0] // 3
        return torch.cat([t[:d], t[2 * d:]])
    return t


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((_comparable(k, a[k]).float() - _comparable(k, b[k]).float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def ddp_run(work):
    """2 processes x batch 2, 8 steps (shared by the equivalence, resume, elastic and FSDP tests)."""
    out = work / "ddp"
    r = torchrun(work, out, "--batch-size-per-gpu", "2")
    return out, r


@pytest.fixture(scope="module")
def single_run(work):
    """The same training in one process with batch 4 (global batch equal to the 2-process run)."""
    argv = ["--data", str(work / "imgs"), "--output-dir", str(work / "single"), *COMMON, "--batch-size-per-gpu", "4"]
    t = Trainer(config_from_args(build_parser("train").parse_args(["train", *argv])))
    init = {k: v.clone() for k, v in t.student.state_dict().items()}
    t.fit()
    return t, init


def test_two_ranks_equal_one_process_with_the_global_batch(ddp_run, single_run):
    out, _ = ddp_run
    single, init = single_run
    r0, r1 = rank_state(out, 0), rank_state(out, 1)
    assert r0["student_ddp"] and not r0["teacher_ddp"] and r0["iteration"] == single.iteration == 8
    ref_student, ref_teacher = single.student.state_dict(), single.teacher.state_dict()
    # the weights really moved, so agreement below TOL is meaningful
    assert min(float((ref_student[k] - init[k]).abs().max()) for k in init if "weight_g" not in k) > 1e-3
    # student (DDP) and teacher (EMA on every rank) identical on both ranks and equal to the 1-process run
    for key, ref in (("student", ref_student), ("teacher", ref_teacher)):
        assert max_diff(r0[key], r1[key]) == 0.0, key
        assert max_diff(r0[key], ref) < TOL, key
    # the centre is all-reduced: the same on both ranks and equal to the single-process centre
    assert torch.equal(r0["center"], r1["center"])
    torch.testing.assert_close(r0["center"], single.dino_loss.center, rtol=0, atol=TOL)
    assert float(single.dino_loss.center.abs().max()) > 1e-3
    # lr is scaled by the global batch: the same peak lr in both runs
    assert single.base_lr == pytest.approx(0.05 * 4 / 256)


def resume_copy(src: Path, dst: Path, work: Path, *args: str) -> Path:
    """Copy a finished run and launch it again with ``--epochs 3`` (one more epoch): it must resume."""
    shutil.copytree(src, dst)
    for f in dst.glob("rank*.pt"):
        f.unlink()
    torchrun(work, dst, "--batch-size-per-gpu", "2", "--epochs", "3", *args)
    return dst


@pytest.fixture(scope="module")
def ddp_resumed(work, ddp_run):
    return resume_copy(ddp_run[0], work / "resumed", work)


def test_rank0_alone_writes_and_every_rank_resumes_from_the_same_checkpoint(ddp_run, ddp_resumed):
    out, r = ddp_run
    assert r.stdout.count("done:") == 0  # the worker does not print; the CLI prints on rank 0 only (test_trainer)
    logs = (out / "log.jsonl").read_text().splitlines()
    assert sum('"type": "epoch"' in line for line in logs) == 2  # one writer, not two
    assert sum('"type": "train"' in line for line in logs) == 8
    assert r.stderr.count("world 2, global batch 4") == 1  # rank 0's console only
    resumed = ddp_resumed
    r0, r1 = rank_state(resumed, 0), rank_state(resumed, 1)
    assert r0["resumed_at"] == r1["resumed_at"] == 8
    assert r0["iteration"] == 12 and max_diff(r0["student"], r1["student"]) == 0.0
    ckpt = torch.load(resumed / "checkpoint.pth", weights_only=True)
    assert ckpt["iteration"] == 12 and ckpt["epoch"] == 3


def test_elastic_restart_resumes_from_the_last_checkpoint(work, ddp_run):
    """Rank 1 dies once at iteration 5; torchrun (--max-restarts 1) restarts both workers, which resume from the
    iteration-4 checkpoint and finish with exactly the weights of the uninterrupted run."""
    out = work / "elastic"
    marker = work / "crashed-once"
    r = torchrun(work, out, "--batch-size-per-gpu", "2", "--save-every-steps", "2", launcher=("--max-restarts", "1"),
                 env={"DINOKIT_TEST_CRASH": f"1:5:{marker}"})
    assert marker.exists(), r.stderr[-2000:]
    r0, r1 = rank_state(out, 0), rank_state(out, 1)
    assert r0["restart"] == r1["restart"] == 1  # the second attempt finished
    assert r0["resumed_at"] == r1["resumed_at"] == 4
    assert r0["iteration"] == 8
    ref = rank_state(ddp_run[0], 0)
    for key in ("student", "teacher"):
        assert max_diff(r0[key], ref[key]) < TOL, key
    torch.testing.assert_close(r0["center"], ref["center"], rtol=0, atol=TOL)


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_agreed_iteration(work):
    """Only rank 1 is signalled (after iteration 3): the ranks agree at the next check (at most
    STOP_CHECK_EVERY = 10 iterations apart, fewer for slow iterations), both stop there and the checkpoint is
    that iteration's — no rank waits forever in a collective the other left."""
    out = work / "term"
    torchrun(work, out, "--batch-size-per-gpu", "2", "--epochs", "4", env={"DINOKIT_TEST_TERM": "1:3"})
    r0, r1 = rank_state(out, 0), rank_state(out, 1)
    it = r0["iteration"]
    assert r1["iteration"] == it and 4 <= it <= Trainer.STOP_CHECK_EVERY == 10
    assert r0["stopped"] == r1["stopped"]
    assert r0["stopped"].startswith(f"SIGTERM at iteration {it}, checkpoint saved in ")
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == it


@pytest.mark.parametrize(("iteration", "sec_per_iter", "expected"), [
    (0, 0.01, 10), (10, 0.01, 20), (13, 0.2, 20),  # fast: every 10 iterations, on multiples of 10
    (13, 1.0, 15), (15, 1.0, 20),  # 1 s per iteration: every 5 (about STOP_CHECK_SECONDS)
    (13, 2.4, 14), (13, 30.0, 14), (0, 0.0, 10),  # slower: every iteration; a zero clock cannot divide by 0
])
def test_stop_agreements_come_every_few_seconds_at_iterations_all_ranks_compute_alike(iteration, sec_per_iter,
                                                                                      expected):
    assert Trainer.STOP_CHECK_SECONDS == 5.0
    assert Trainer._next_stop_check(iteration, sec_per_iter) == expected


def test_time_budget_ranks_agree_on_one_plan(work):
    """A time-budgeted run under torchrun: rank 1's clock runs 3x fast, so alone it would plan a third of rank
    0's iterations and rank 0 would wait for it for ever at the end. The ranks agree on the slowest clock (max),
    re-plan at the same iterations, and stop together at the planned iteration."""
    out = work / "budget"
    torchrun(work, out, "--batch-size-per-gpu", "2", "--epochs", "100000", "--time-budget-minutes", "0.12",
             "--log-every", "0", env={"DINOKIT_TEST_CLOCK": "1:3"}, timeout=180)
    r0, r1 = rank_state(out, 0), rank_state(out, 1)
    assert r0["plans"] == r1["plans"]  # same (iteration, planned total) at every plan, on both ranks
    assert len(r0["plans"]) >= 2  # the first plan and at least one re-plan
    assert r0["iteration"] == r1["iteration"] == r0["total_iters"] == r0["plans"][-1][1]
    # planned from rank 1's (fast) clock: rank 1 used about the budget by its own clock, rank 0 about a third
    assert r0["iteration"] > 8


def test_timed_online_knn_stops_every_rank_at_the_same_iteration(work):
    """Online k-NN every few seconds of training under torchrun: the ranks agree when it is due (every
    KNN_CHECK_EVERY iterations, on the slowest clock), all stop at the same iterations, rank 0 evaluates (made
    2 s slower here) while the others wait at a barrier, and nobody counts the pause as training time."""
    out = work / "knn_timed"
    torchrun(work, out, "--batch-size-per-gpu", "2", "--epochs", "100000", "--time-budget-minutes", "0.15",
             "--log-every", "0", "--knn-train", str(work / "imgs"), "--knn-val", str(work / "imgs"),
             "--set", "knn_every_minutes=0.05", "knn_subset=0", env={"DINOKIT_TEST_KNN_SLEEP": "2"}, timeout=180)
    r0, r1 = rank_state(out, 0), rank_state(out, 1)
    assert r0["knn_calls"] == r1["knn_calls"] and len(r0["knn_calls"]) >= 1
    assert all(it % Trainer.KNN_CHECK_EVERY == 0 for it in r0["knn_calls"])
    for r in (r0, r1):  # each pause (>= 2 s) is outside the training time, on both ranks
        assert r["fit_wall"] - r["train_seconds"] >= 2.0 * len(r["knn_calls"]) - 0.2
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    knn = [r for r in logged if r["type"] == "knn"]
    assert [r["iteration"] for r in knn] == r0["knn_calls"] and all(0 <= r["knn_top1"] <= 100 for r in knn)


def test_batchnorm_head_on_cpu_processes_keeps_the_reference_wrapping(work):
    """``--use-bn-in-head`` under 2 CPU processes: the teacher is DDP-wrapped as the reference does (its BN
    buffers broadcast from rank 0), training runs. torch's SyncBatchNorm is GPU-only (DDP raises "SyncBatchNorm
    layers only work with GPU modules"), so on CPU the statistics stay per process and the trainer says so."""
    out = work / "bn"
    r = torchrun(work, out, "--batch-size-per-gpu", "2", "--use-bn-in-head", "--epochs", "1")
    r0, r1 = rank_state(out, 0), rank_state(out, 1)
    assert r0["syncbn"] == [False, False] and "SyncBatchNorm needs GPUs" in r.stderr
    assert r0["student_ddp"] and r0["teacher_ddp"]
    assert r0["iteration"] == 4
    # DDP keeps the parameters in step (BN buffers are broadcast from rank 0 before each forward, then each rank's
    # forward updates its own copy)
    params = [k for k in r0["student"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) < len(r0["student"])
    assert all(torch.equal(r0["student"][k], r1["student"][k]) for k in params)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm needs 2 GPUs (torch supports it on GPU only)")
def test_syncbatchnorm_on_gpus(work):
    out = work / "syncbn"
    torchrun(work, out, "--batch-size-per-gpu", "2", "--use-bn-in-head", "--epochs", "1", "--device", "cuda")
    r0, r1 = rank_state(out, 0), rank_state(out, 1)
    assert r0["syncbn"] == [True, True] and r0["student_ddp"] and r0["teacher_ddp"]
    stats = [k for k in r0["student"] if k.endswith("running_mean")]
    assert stats and all(torch.equal(r0["student"][k], r1["student"][k]) for k in stats)


def test_fsdp_and_activation_checkpointing_train_like_ddp(work, ddp_run, ddp_resumed, single_run, tmp_path):
    """FSDP2 (fully_shard on gloo) with activation checkpointing gives the DDP weights (same tolerance); a DDP
    checkpoint resumes under FSDP and an FSDP checkpoint (full state dicts, name-keyed optimiser) in a plain
    process; activation checkpointing alone changes nothing in one process."""
    out = work / "fsdp"
    torchrun(work, out, "--batch-size-per-gpu", "2", "--fsdp", "--grad-checkpointing")
    r0 = rank_state(out, 0)
    assert r0["fsdp"] and not r0["student_ddp"]
    ref = rank_state(ddp_run[0], 0)
    for key in ("student", "teacher"):
        assert max_diff(r0[key], ref[key]) < TOL, key
    torch.testing.assert_close(r0["center"], ref["center"], rtol=0, atol=TOL)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert max_diff(ckpt["student"], ref["student"]) < TOL
    assert all(isinstance(k, str) for k in ckpt["optimizer"]["state"])

    # a DDP checkpoint (integer-keyed optimiser state) resumes under FSDP and continues like DDP does
    both = resume_copy(ddp_run[0], work / "ddp_then_fsdp", work, "--fsdp")
    r0, r1 = rank_state(both, 0), rank_state(both, 1)
    assert r0["fsdp"] and r0["resumed_at"] == r1["resumed_at"] == 8 and r0["iteration"] == 12
    ref = rank_state(ddp_resumed, 0)
    for key in ("student", "teacher"):
        assert max_diff(r0[key], ref[key]) < TOL, key

    # the FSDP checkpoint resumes without FSDP in one process (batch 4 = the same global batch)
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    argv = ["--data", str(work / "imgs"), "--output-dir", str(plain), *COMMON, "--batch-size-per-gpu", "4",
            "--epochs", "3"]
    t = Trainer(config_from_args(build_parser("train").parse_args(["train", *argv])))
    assert t.iteration == 8
    qkv = t.student.backbone.blocks[0].attn.qkv.weight
    assert len(t.optimizer.state[qkv]) == 3 and float(t.optimizer.state[qkv]["exp_avg_sq"].abs().max()) > 0

    # activation checkpointing alone: identical to the plain single-process run
    single, _ = single_run
    argv = ["--data", str(work / "imgs"), "--output-dir", str(tmp_path / "ckpt"), *COMMON,
            "--batch-size-per-gpu", "4", "--grad-checkpointing"]
    t = Trainer(config_from_args(build_parser("train").parse_args(["train", *argv])))
    assert t.student.backbone.grad_checkpointing
    t.fit()
    assert max_diff(t.student.state_dict(), single.student.state_dict()) < TOL


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r.get("type") == kind]


def test_the_log_shows_the_global_batch_as_one_process_with_it_would(ddp_run, single_run, work):
    """Each rank's loss is its half batch's: the logged loss (every iteration, the epoch means) and the epoch's
    collapse diagnostics are those of the global batch, equal to the 1-process run's (rank 0's half was logged)."""
    out, _ = ddp_run
    single = work / "single"
    two, one = _records(out, "train"), _records(single, "train")
    assert [r["iteration"] for r in two] == [r["iteration"] for r in one] == list(range(1, 9))
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    two, one = _records(out, "epoch"), _records(single, "epoch")
    assert len(two) == len(one) == 2
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["teacher_entropy"] == pytest.approx(b["teacher_entropy"], abs=1e-4)
        assert a["kl_mean_to_uniform"] == pytest.approx(b["kl_mean_to_uniform"], abs=1e-4)
        assert a["distinct_prototypes"] == b["distinct_prototypes"]


def test_a_non_finite_loss_on_one_rank_is_skipped_by_every_rank(work, ddp_run):
    """--nan-policy skip decided per rank let the rank with the NaN return before backward while the other waited
    in DDP's gradient all-reduce (gloo: a size-mismatch abort; NCCL: a hang). The ranks now agree: the step is
    skipped everywhere and training goes on."""
    out = work / "nan"
    torchrun(work, out, "--batch-size-per-gpu", "2", "--nan-policy", "skip", env={"DINOKIT_TEST_NAN": "1:5"})
    r0, r1 = rank_state(out, 0), rank_state(out, 1)
    assert r0["iteration"] == r1["iteration"] == 8
    assert max_diff(r0["student"], r1["student"]) == 0.0 and torch.equal(r0["center"], r1["center"])
    epochs = _records(out, "epoch")
    assert epochs[-1]["skipped_steps"] == 1
    skipped = [r for r in _records(out, "train") if r["iteration"] == 6]
    assert len(skipped) == 1 and skipped[0]["loss"] is None  # rank 0's log names it (non-finite: null)
    assert max_diff(r0["student"], rank_state(ddp_run[0], 0)["student"]) > 0  # the skipped step changed the run


def test_an_error_on_another_rank_is_one_line_on_this_one(work, tmp_path):
    """Rank 0 refuses an output folder under a file and exits; rank 1 only sees its next collective fail. It
    printed a raw gloo traceback; now one line saying another process stopped, exit 2 on every rank."""
    (tmp_path / "afile").write_text("x")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dinokit",
           "train", "--data", str(work / "imgs"), "--output-dir", str(tmp_path / "afile" / "sub"), *COMMON,
           "--batch-size-per-gpu", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    ranks = r.stderr.split("torch/distributed/elastic")[0]  # what the ranks printed, before torchrun's summary
    assert ranks.count("is not writable") == 1 and "Traceback" not in ranks, r.stderr[-3000:]
    # rank 1 (unless torchrun ended it before its first collective failed): one line naming the cause's place
    lines = [x for x in ranks.splitlines() if x.startswith("dinokit train:")]
    assert len(lines) in (1, 2) and all("is not writable" in x or "another process of this job stopped" in x
                                        for x in lines), lines


def test_peer_failures_are_recognised_only_in_multi_process_jobs(monkeypatch):
    from dinokit.cli import _peer_failed

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:7")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _peer_failed(gloo) and _peer_failed(torch.distributed.DistBackendError("NCCL error"))
    assert not _peer_failed(RuntimeError("shape mismatch")) and not _peer_failed(ValueError("x"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not _peer_failed(gloo)


@pytest.mark.parametrize("rank_args,what", [
    ("--seed 1", "disagree on options: seed (0, 1 by rank) (every process must be given the same)"),
    ("--out-dim 128", "disagree on options: out_dim (64, 128 by rank)"),  # DDP's own shape check came first
    ("--data {other}", "disagree on the number of training images (16..18)")])
def test_ranks_that_disagree_on_options_or_data_stop_before_the_first_step(work, tmp_path, rank_args, what):
    """Only the resume iteration was compared: another --seed (or same-size data) on one node trained silently on
    other permutations; another image count made the ranks meet in different collectives and gloo aborted
    mid-epoch (SIGABRT, no dinokit line)."""
    other = make_image_folder(tmp_path / "other", n_per_class=9)
    out = tmp_path / "out"
    r = torchrun(work, out, "--batch-size-per-gpu", "2", check=False,
                 env={"DINOKIT_TEST_RANK_ARGS": "1:" + rank_args.format(other=other), "DINOKIT_TEST_CLI": "1"})
    assert r.returncode != 0
    assert f"dinokit train: error: the 2 processes of this job {what}" in r.stderr, r.stderr[-3000:]
    assert "terminate called" not in r.stderr  # the process group ended before exit (it aborted: SIGABRT)
    assert not (out / "checkpoint.pth").exists()
