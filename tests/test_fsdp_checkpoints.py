"""FSDP2 checkpoints on CPU (gloo): the gathered adapter in every checkpoint, and resume on another world size.

Real `tunefleet launch` runs of the demo model (helpers from tests/test_launch.py). A 2-process FSDP2
LoRA run is stopped by SIGUSR1 after its first checkpoint (exit 75), resumed on 3 processes from
that checkpoint, and a checkpoint of the 3-process run is resumed on 2 processes again: every
per-step loss must equal an uninterrupted single-process run with the same global batch (6 = 1 x 3 x 2 = 1 x 2 x 3).
`torch.distributed.checkpoint` reshards the DTensor model and optimizer shards on load. Every
checkpoint also holds a normal PEFT adapter gathered from the shards, so `tunefleet merge` works
from an FSDP checkpoint (merged logits == base + adapter).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launched import DEMO, TOL, adapter, env, launch_argv, losses, run_launch
from tunefleet.launch.core import checkpoints as ckpt

pytestmark = pytest.mark.slow

STEPS = 6
OVERRIDES = [
    "parallel.strategy=fsdp",
    "batch.micro_batch_size=1",
    "batch.global_batch_size=6",
    f"train.max_steps={STEPS}",
    "train.save_steps=1",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fsdp-ckpt")


@pytest.fixture(scope="module")
def reference(workdir: Path) -> dict[int, float]:
    """One process, in this process, the same global batch and steps."""
    from tests.launched import BASE
    from tunefleet.distributed import sft
    from tunefleet.launch.core import recipe as R

    out = workdir / "ref"
    assert (
        sft.run(
            R.load(
                DEMO,
                [
                    *BASE,
                    f"output_dir={out}",
                    "batch.micro_batch_size=1",
                    "batch.global_batch_size=6",
                    f"train.max_steps={STEPS}",
                    "train.save_steps=0",
                ],
            )
        )
        == 0
    )
    return losses(out)


@pytest.fixture(scope="module")
def preempted(workdir: Path) -> Path:
    """2 FSDP2 processes, SIGUSR1 once the first checkpoint is complete: a checkpoint, then exit 75."""
    out = workdir / "fsdp-2"
    log = workdir / "fsdp-2.log"
    started = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(
            launch_argv(out, 2, *OVERRIDES), env=env(), stdout=f, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 300
        while ckpt.latest(out) is None:
            assert proc.poll() is None, log.read_text()[-6000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=180) == 75, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"fsdp 2 processes, preempted: {time.monotonic() - started:.1f} s", flush=True)
    newest = ckpt.latest(out)
    assert newest is not None and ckpt.step_of(newest) < STEPS and not (out / "final").exists()
    return out


def test_fsdp2_resume_on_another_world_size(
    workdir: Path, reference: dict[int, float], preempted: Path
) -> None:
    first = ckpt.latest(preempted)
    assert first is not None
    k = ckpt.step_of(first)
    manifest = ckpt.read_manifest(first)
    assert manifest.world_size == 2 and any(f.endswith(".distcp") for f in manifest.files)

    # 2 -> 3 processes
    three = workdir / "fsdp-3"
    started = time.monotonic()
    proc = run_launch(three, 3, OVERRIDES, extra=("--resume", str(first)))
    assert proc.returncode == 0, proc.stdout[-6000:]
    print(f"fsdp 2 -> 3 processes from step {k}: {time.monotonic() - started:.1f} s", flush=True)
    assert "written by 2 process(es), now 3" in proc.stdout
    effect = json.loads((three / "plan.json").read_text())["in_effect"]
    assert (effect["distributed_type"], effect["world_size"]) == ("FSDP", 3)
    assert effect["sharding"]["kind"] == "fsdp2" and effect["sharding"]["mesh_size"] == 3
    got = {s: v for s, v in losses(preempted).items() if s <= k} | losses(three)
    assert sorted(got) == list(range(1, STEPS + 1))
    diff = max(abs(got[s] - reference[s]) for s in got)
    print(f"fsdp 2 -> 3: max |loss - 1 process| = {diff:.2e}", flush=True)
    assert diff <= TOL

    # 3 -> 2 processes, from the 3-process run's first checkpoint
    second = three / f"checkpoint-{k + 1}"
    assert ckpt.read_manifest(second).world_size == 3
    two = workdir / "fsdp-3-to-2"
    started = time.monotonic()
    proc = run_launch(two, 2, OVERRIDES, extra=("--resume", str(second)))
    assert proc.returncode == 0, proc.stdout[-6000:]
    print(f"fsdp 3 -> 2 processes from step {k + 1}: {time.monotonic() - started:.1f} s", flush=True)
    got = losses(two)
    assert sorted(got) == list(range(k + 2, STEPS + 1))
    diff = max(abs(got[s] - reference[s]) for s in got)
    print(f"fsdp 3 -> 2: max |loss - 1 process| = {diff:.2e}", flush=True)
    assert diff <= TOL

    # the adapter gathered into the last checkpoint is the final adapter
    last, final = adapter(three / f"checkpoint-{STEPS}"), adapter(three / "final")
    assert sorted(last) == sorted(final) and all((last[n] == final[n]).all() for n in final)


def test_merge_from_fsdp_checkpoint(workdir: Path, preempted: Path) -> None:
    import torch

    from tests.test_merge_generate import _assert_merge_equal
    from tunefleet.distributed.artifacts import find_adapter
    from tunefleet.distributed.merge import merge

    first = ckpt.latest(preempted)
    assert first is not None and list(first.rglob("*.distcp"))
    gathered = adapter(first)  # trainable weights only (299k of the demo model's 1.16M parameters)
    assert gathered and all("lora_" in name for name in gathered)
    assert sum(t.numel() for t in gathered.values()) == 299_008
    assert find_adapter(preempted).adapter_dir == first  # no final/: the newest complete checkpoint
    merge(first, workdir / "merged")
    _assert_merge_equal(workdir / "merged", first, torch.float32, atol=1e-5, rtol=1e-5)
