"""Atomic checkpoints and exact resume: real processes, real signals, CPU.

Every test compares per-step losses with an uninterrupted run of the same recipe and seed.
The recipe crosses epoch boundaries (40 rows, global batch 8: 5 steps per epoch, 2 epochs).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.short_run import DEMO, OVERRIDES, STEPS
from tunefleet.distributed import sft
from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core import recipe as R
from tunefleet.launch.core.errors import TunefleetError
from tunefleet.launch.core.layout import EXIT_REQUEUE

pytestmark = pytest.mark.slow


def recipe(out: Path, *extra: str) -> R.Recipe:
    return R.load(DEMO, [f"output_dir={out}", *OVERRIDES, *extra])


def cli_args(out: Path, *extra: str) -> list[str]:
    args = ["--recipe", str(DEMO)]
    for o in [f"output_dir={out}", *OVERRIDES, *extra]:
        args += ["--set", o]
    return args


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_losses(got: dict[int, float], want: dict[int, float], tol: float) -> None:
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= tol, {s: (got[s], want[s]) for s in want}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted single-process run, a complete checkpoint after every step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert sft.run(recipe(out)) == 0
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.pop("TUNEFLEET_TEST_SAVE_DELAY_S", None)
    return e


def start(out: Path, *, nproc: int = 1, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    if nproc == 1:
        cmd = [sys.executable, "-m", "tunefleet.distributed.sft"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "tunefleet.distributed.sft",
        ]
    log = open(out.parent / f"{out.name}-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
    return subprocess.Popen(
        cmd + cli_args(out),
        env={**env(), **(extra_env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def descendants(pid: int) -> list[int]:
    """The whole process tree under `pid` (torchrun starts workers in their own session)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def wait_for(cond, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def newest_step(out: Path) -> int:
    newest = ckpt.latest(out)
    return ckpt.step_of(newest) if newest else 0


def test_reference_checkpoints_are_complete(reference: Path) -> None:
    found = ckpt.complete_checkpoints(reference)
    assert [ckpt.step_of(p) for p in found] == list(range(1, STEPS + 1))
    m = ckpt.read_manifest(found[4])
    assert m.step == 5 and m.samples_seen == 40 and m.epoch == 1.0
    assert m.world_size == 1 and m.strategy == "single" and m.batch_plan["grad_accum_steps"] == 2
    assert m.recipe_hash == R.fingerprint(R.load(reference / "recipe.yaml"))  # the resolved recipe
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(m.files)
    assert m.save_s > 0


@pytest.mark.parametrize("at", [3, 5, 6], ids=["mid-epoch", "epoch-end", "epoch-start"])
def test_resume_from_any_checkpoint_is_exact(reference: Path, tmp_path: Path, at: int) -> None:
    """--resume a copy of checkpoint `at` in a fresh run: the remaining losses equal the reference."""
    out = tmp_path / "run"
    assert sft.run(recipe(out), resume=str(reference / f"checkpoint-{at}")) == 0
    got = losses(out)
    want = losses(reference)
    assert sorted(got) == list(range(at + 1, STEPS + 1))
    assert max(abs(got[s] - want[s]) for s in got) <= 1e-6


def test_sigkill_at_random_moments_then_rerun(reference: Path, tmp_path: Path) -> None:
    """Kill the process tree at random moments (one inside a checkpoint write); reruns finish exactly."""
    out = tmp_path / "run"
    rng = random.Random(1234)
    # 1) in the middle of writing checkpoint 2: its temporary directory exists, no marker yet
    proc = start(out, extra_env={"TUNEFLEET_TEST_SAVE_DELAY_S": "3"})
    wait_for(
        lambda: (
            (out / f"{ckpt.TMP_PREFIX}2").is_dir() and (out / f"{ckpt.TMP_PREFIX}2" / "optimizer.pt").exists()
        )
    )
    kill_tree(proc)
    assert newest_step(out) == 1, "an incomplete checkpoint was counted"
    # 2) at random moments a few steps later (saves slowed a little so kills land inside them too)
    for _ in range(2):
        target = newest_step(out) + rng.randint(1, 3)
        if target >= STEPS - 1:
            break
        proc = start(out, extra_env={"TUNEFLEET_TEST_SAVE_DELAY_S": "0.2"})
        wait_for(lambda t=target, p=proc: newest_step(out) >= t or p.poll() is not None)
        time.sleep(rng.uniform(0.0, 0.4))
        kill_tree(proc)
    assert not (out / "final").exists(), "the run finished before it could be killed"
    proc = start(out)
    assert proc.wait(timeout=300) == 0
    assert not list(out.glob(f"{ckpt.TMP_PREFIX}*")), "a temporary checkpoint was left behind"
    assert all(ckpt.is_complete(p) for p in out.glob("checkpoint-*"))
    assert_same_losses(losses(out), losses(reference), 1e-6)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_and_exits_for_requeue(
    reference: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "run"
    proc = start(out)
    wait_for(lambda: newest_step(out) >= 3)
    proc.send_signal(sig)
    proc.send_signal(sig)  # a second signal during the save changes nothing
    assert proc.wait(timeout=120) == EXIT_REQUEUE
    stopped_at = newest_step(out)
    assert 3 <= stopped_at < STEPS and not (out / "final").exists()
    proc = start(out)
    assert proc.wait(timeout=300) == 0
    assert_same_losses(losses(out), losses(reference), 1e-6)


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_on_another_world_size(reference: Path, tmp_path: Path, first: int, second: int) -> None:
    """DDP on CPU/gloo: stop with SIGUSR1 on one rank, resume with the other world size
    (accumulation changes, the global batch does not)."""
    out = tmp_path / "run"
    proc = start(out, nproc=first)
    wait_for(lambda: newest_step(out) >= 4)
    workers = [p for p in descendants(proc.pid) if p != proc.pid] if first > 1 else [proc.pid]
    os.kill(workers[-1], signal.SIGUSR1)  # any one rank
    proc.wait(timeout=120)
    stopped_at = newest_step(out)
    assert 4 <= stopped_at < STEPS and not (out / "final").exists()
    assert ckpt.read_manifest(out / f"checkpoint-{stopped_at}").world_size == first
    proc = start(out, nproc=second)
    assert proc.wait(timeout=300) == 0
    assert_same_losses(losses(out), losses(reference), 1e-5)


def test_changed_recipe_is_refused_harmless_change_allowed(reference: Path, tmp_path: Path) -> None:
    with pytest.raises(TunefleetError) as err:
        sft.run(
            recipe(tmp_path / "a", "peft.r=8", "batch.global_batch_size=16"),
            resume=str(reference / "checkpoint-8"),
        )
    assert "peft.r: 64 -> 8" in str(err.value) and "batch.global_batch_size: 8 -> 16" in str(err.value)
    out = tmp_path / "b"
    assert (
        sft.run(
            recipe(out, "train.logging_steps=2", "batch.micro_batch_size=2"),
            resume=str(reference / "checkpoint-8"),
        )
        == 0
    )
    assert sorted(losses(out)) == [10]


def test_incomplete_checkpoints_are_never_used(reference: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "final")
    for step in range(7, STEPS + 1):
        shutil.rmtree(out / f"checkpoint-{step}")
    (out / "checkpoint-6" / ckpt.COMPLETE).unlink()  # half-written: no marker
    (out / "checkpoint-5" / "optimizer.pt").write_bytes(b"truncated")  # size no longer matches
    shutil.copytree(out / "checkpoint-4", out / f"{ckpt.TMP_PREFIX}9")  # leftover temp dir
    assert ckpt.latest(out) == out / "checkpoint-4"
    assert sft.run(recipe(out)) == 0
    assert not (out / f"{ckpt.TMP_PREFIX}9").exists()
    assert_same_losses(losses(out), losses(reference), 1e-6)


def test_a_checkpoint_without_optimizer_state_continues_only_when_asked(
    reference: Path, tmp_path: Path
) -> None:
    """checkpoint-6's optimizer.pt and scheduler.pt removed (to save space): a plain rerun is refused
    with the ways out, and nothing is moved or deleted. With --resume-weights-only its weights
    continue: step 7's loss is the uninterrupted run's (same weights, same samples), so is every
    step's learning rate (the schedule brought to step 6 without scheduler.pt), and Adam starts
    afresh (step 8 differs)."""
    import shutil

    from tunefleet.launch.core.args import StartOptions

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "final")
    for step in range(7, STEPS + 1):
        shutil.rmtree(out / f"checkpoint-{step}")
    for name in ("optimizer.pt", "scheduler.pt"):
        (out / "checkpoint-6" / name).unlink()
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(TunefleetError) as err:
        sft.run(recipe(out))
    assert "checkpoint-6 has no optimizer state (optimizer.pt removed)" in err.value.problem
    assert "--resume-weights-only" in err.value.fix and str(out / "checkpoint-5") in err.value.fix
    assert sorted(p.name for p in out.iterdir()) == before

    assert sft.run(recipe(out), options=StartOptions(weights_only=True)) == 0
    rows = {
        r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    }
    want = {
        r["step"]: r
        for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    }
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert all(abs(rows[s]["lr"] - want[s]["lr"]) <= 1e-12 for s in want)
    assert abs(rows[7]["loss"] - want[7]["loss"]) <= 1e-6
    assert abs(rows[8]["loss"] - want[8]["loss"]) > 1e-5  # a fresh Adam moved the weights otherwise
    assert (out / "final").is_dir() and (out / "checkpoint-6" / "adapter_model.safetensors").is_file()


def test_retention_keeps_newest(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert sft.run(recipe(out, "checkpoint.keep_last=2", "train.epochs=1")) == 0
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["checkpoint-4", "checkpoint-5"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_checkpoint_at_the_last_step_goes_straight_to_final(tmp_path: Path, nproc: int) -> None:
    """7 steps (5 per epoch: the run ends inside epoch 2), interrupted after its checkpoint at
    step 7 and before final/: the rerun trains no step and writes the same final adapter."""
    import shutil

    from safetensors.torch import load_file

    done = tmp_path / "done"
    assert sft.run(recipe(done, "train.max_steps=7")) == 0
    interrupted = tmp_path / "interrupted"
    shutil.copytree(done, interrupted)
    shutil.rmtree(interrupted / "final")  # the SIGUSR1-at-the-last-step state: checkpoint-7, no final/
    proc = start_recipe(interrupted, nproc, "train.max_steps=7")
    assert proc.wait(timeout=300) == 0
    assert sorted(losses(interrupted)) == list(range(1, 8))  # no step 8
    assert ckpt.step_of(ckpt.latest(interrupted)) == 7  # and no checkpoint-8
    want, got = (
        load_file(done / "final" / "adapter_model.safetensors"),
        load_file(interrupted / "final" / "adapter_model.safetensors"),
    )
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)


def start_recipe(out: Path, nproc: int, *extra: str) -> subprocess.Popen:
    """Like `start`, with extra overrides."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", str(free_port())]
    cmd += ["-m", "tunefleet.distributed.sft", *cli_args(out, *extra)]
    log = open(out.parent / f"{out.name}-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
    return subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_a_mixture_resumes_in_its_exact_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixture (alpaca 2 : chat 1, 48 examples: 6 steps per epoch) stopped at step 4 and resumed
    continues the mixture's sample order exactly, across the epoch boundary: the same micro batches
    and the same losses as the uninterrupted run, on 1 process and on 2; other weights are refused."""
    from tests.test_train import MIXTURE, recording_sampler

    data = MIXTURE.parent / "data"
    sets = [
        f"data.mixture=[{{path: {data / 'alpaca_demo.jsonl'}, weight: 2, limit: 24}}, "
        f"{{path: {data / 'chat_demo.jsonl'}, format: messages, limit: 24}}]",
        "data.eval_ratio=0",
        "data.max_length=128",
        "batch.micro_batch_size=4",
        "batch.global_batch_size=8",
        "train.max_steps=8",
        "train.logging_steps=1",
        "train.save_steps=1",
        "checkpoint.keep_last=null",
    ]
    seen = recording_sampler(monkeypatch)
    reference = tmp_path / "reference"
    assert sft.run(R.load(MIXTURE, [f"output_dir={reference}", *sets])) == 0
    full = list(seen)
    seen.clear()
    assert json.loads((reference / "plan.json").read_text())["steps_per_epoch"] == 6  # 8 steps cross an epoch
    out = tmp_path / "resumed"
    assert sft.run(R.load(MIXTURE, [f"output_dir={out}", *sets]), resume=str(reference / "checkpoint-4")) == 0
    accum = 2
    assert seen[: 4 * accum] == full[4 * accum : 8 * accum]  # steps 5-8: the rest of epoch 0, then epoch 1
    got, want = losses(out), losses(reference)
    assert sorted(got) == [5, 6, 7, 8] and max(abs(got[s] - want[s]) for s in got) <= 1e-6
    # the same checkpoint resumed on 2 processes (DDP, gloo; accumulation 2 -> 1): the same losses
    two = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
    ]
    cmd += ["--master_port", str(free_port()), "-m", "tunefleet.distributed.sft", "--recipe", str(MIXTURE)]
    cmd += [a for s in [f"output_dir={two}", *sets] for a in ("--set", s)]
    done = subprocess.run(
        [*cmd, "--resume", str(reference / "checkpoint-4")],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = losses(two)
    assert sorted(got) == [5, 6, 7, 8] and max(abs(got[s] - want[s]) for s in got) <= 1e-5
    reweighted = [x.replace("weight: 2", "weight: 3") for x in sets]
    with pytest.raises(TunefleetError, match=r"data.mixture: \[\{'path'"):  # other weights: refused
        sft.run(
            R.load(MIXTURE, [f"output_dir={tmp_path / 'other'}", *reweighted]),
            resume=str(reference / "checkpoint-4"),
        )
