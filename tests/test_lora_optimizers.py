"""LoRA+ and LoRA-FA (`peft.loraplus_lr_ratio`, `peft.lora_fa`): PEFT's optimizers inside the
recipe's schedule, checkpoints and resume, for real on CPU.

Each variant trains one process with a checkpoint after every step (the loss falls, the final
adapter loads with PEFT and merges to base+adapter's logits), then a fresh run resumes its checkpoint 2 on two gloo processes: the
remaining losses equal the uninterrupted run's, which they would not if the optimizer state of
the param groups were lost (checked directly too: the resumed optimizer has taken every step).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_eva import losses, torchrun
from tests.test_lora_variants import (
    SHORT,
    assert_loss_falls,
    assert_merge_equal,
    assert_reload_reproduces_the_run,
)
from tests.test_train import quick
from tunefleet.distributed import sft

pytestmark = pytest.mark.slow

SAVE = ["train.save_steps=1", "checkpoint.keep_last=null", "train.weight_decay=0.01"]
VARIANTS = {"loraplus": ["peft.loraplus_lr_ratio=16"], "lorafa": ["peft.lora_fa=true"]}


@pytest.fixture(scope="module", params=list(VARIANTS))
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    name = request.param
    out = tmp_path_factory.mktemp(name) / "one"
    assert sft.run(quick(out, *SHORT, *SAVE, *VARIANTS[name])) == 0
    return name, out


def optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.pt", weights_only=False)


def lora_a(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items() if "lora_A" in k}


def test_trains_with_the_variant_optimizer(reference: tuple[str, Path], tmp_path: Path) -> None:
    name, out = reference
    assert_loss_falls(out)
    assert_reload_reproduces_the_run(out)
    assert_merge_equal(out, tmp_path)
    plan = json.loads((out / "plan.json").read_text())  # LoRA-FA: plan counts B only, as the run has it
    assert plan["trainable_params"] == plan["in_effect"]["trainable_params"]
    state = optimizer_state(out / "checkpoint-2")
    groups = [g for g in state["param_groups"] if g["params"]]
    if name == "loraplus":  # A (and 1-D) params at lr, B at 16 x lr, through the schedule
        lrs = sorted({round(g["lr"] / groups[0]["lr"], 6) for g in groups})
        assert lrs == [1.0, 16.0], [g["lr"] for g in groups]
        assert {g["weight_decay"] for g in groups} == {0.01}  # train.weight_decay (PEFT would use 0)
    else:  # LoRA-FA: A never moves (frozen at its initialisation), B does
        assert len(groups) == 1 and groups[0]["weight_decay"] == 0.01
        first, last = lora_a(out / "checkpoint-1"), lora_a(out / "final")
        assert first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first)


def test_optimizer_state_survives_a_resume_on_another_world_size(
    reference: tuple[str, Path], tmp_path: Path
) -> None:
    name, one = reference
    out = tmp_path / "two"
    torchrun(out, 2, *SAVE, *VARIANTS[name], resume=one / "checkpoint-2")
    got, want = losses(out), losses(one)
    assert sorted(got) == [3, 4] and max(abs(got[s] - want[s]) for s in got) <= 1e-5, (got, want)
    steps = [s["step"] for s in optimizer_state(out / "checkpoint-4")["state"].values() if "step" in s]
    assert steps and {int(s) for s in steps} == {4}, steps  # not 2: the state came back with the checkpoint
    if name == "lorafa":
        start = lora_a(one / "checkpoint-1")
        end = lora_a(out / "final")
        assert all(torch.equal(start[k], end[k]) for k in start)


def test_loraplus_under_zero2_checkpoints_and_resumes_on_another_world_size(tmp_path: Path) -> None:
    """LoRA+'s A and B groups under DeepSpeed ZeRO-2 (2 processes): the losses equal one plain process,
    the rank-independent checkpoint state (`ds_reshard.save`) gathers both groups' Adam moments (it
    failed before with "exp_avg not found in optimizer state fragment"), and one process resumes it
    with the same losses."""
    import subprocess

    from tests.launched import BASE, DEMO, TOL, env, launch_argv
    from tests.launched import losses as launch_losses
    from tunefleet.launch.core import checkpoints as ckpt
    from tunefleet.launch.core import recipe as R

    ratio = "peft.loraplus_lr_ratio=16"
    ref = tmp_path / "ref"
    assert sft.run(R.load(DEMO, [*BASE, ratio, f"output_dir={ref}"])) == 0

    def launch(out: Path, nproc: int, *extra: str) -> None:
        argv = launch_argv(out, nproc, "parallel.strategy=deepspeed-zero2", ratio, extra=extra)
        proc = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    two = tmp_path / "two"
    launch(two, 2)
    want = launch_losses(ref)
    got = launch_losses(two)
    assert sorted(got) == sorted(want) and max(abs(got[s] - want[s]) for s in want) <= TOL, (got, want)
    assert ckpt.ZERO_STATE_FILE in ckpt.read_manifest(two / "checkpoint-2").files
    one = tmp_path / "one"
    launch(one, 1, "--resume", str(two / "checkpoint-2"))
    got = launch_losses(one)
    assert sorted(got) == [3, 4] and max(abs(got[s] - want[s]) for s in got) <= TOL, (got, want)
