"""EVA initialisation (`peft.init: eva`) for real on CPU: one process, two gloo processes, resume.

EVA sets each adapted layer's A from the SVD of its input activations over the run's first micro
batches and moves rank between layers (r=4 here: the demo's alpaca answers give every micro batch
enough trained tokens for 4 x rho = 8 components). The adapter's shapes come out of the data, so
under DDP every rank must end with the same adapter; and the micro batches EVA reads do not depend
on the world size, so two processes must start from the one-process adapter.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.short_run import DEMO
from tests.test_lora_variants import (
    SHORT,
    adapter_config,
    adapter_shapes,
    assert_loss_falls,
    assert_merge_equal,
    assert_reload_reproduces_the_run,
    metrics,
)
from tests.test_train import QUICK, quick
from tunefleet.distributed import sft

pytestmark = pytest.mark.slow

EVA = ["peft.init=eva", "peft.r=4", "train.save_steps=1", "checkpoint.keep_last=null"]


def torchrun(out: Path, nproc: int, *extra: str, resume: Path | None = None) -> subprocess.CompletedProcess:
    """`tunefleet.distributed.sft` on `nproc` gloo processes, the recipe of `quick` + SHORT + EVA."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = [f"output_dir={out}", *QUICK, *SHORT, *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "tunefleet.distributed.sft"]
    cmd += ["--recipe", str(DEMO), *[a for s in sets for a in ("--set", s)]]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def eva_in_effect(out: Path) -> dict:
    return json.loads((out / "plan.json").read_text())["in_effect"]["eva"]


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("eva") / "one"
    assert sft.run(quick(out, *SHORT, *EVA)) == 0
    return out


def test_eva_trains_and_its_ranks_are_in_the_saved_adapter(one: Path, tmp_path: Path) -> None:
    assert_loss_falls(one)
    eva = eva_in_effect(one)
    ranks = eva["ranks"]
    assert eva["digest_per_rank"] and eva["micro_batches"] > 0
    assert set(ranks.values()) != {4}, ranks  # EVA moved rank between layers (rho 2)
    assert sum(ranks.values()) == 4 * len(ranks)  # within the budget of r per layer
    config = adapter_config(one)
    assert config["init_lora_weights"] == "eva" and config["eva_config"]["rho"] == 2.0
    shapes = adapter_shapes(one / "final")
    saved = {
        name.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): shape[0]
        for name, shape in shapes.items()
        if name.endswith(".lora_A.weight")
    }
    assert saved == {name: rank for name, rank in ranks.items() if rank > 0}
    assert_reload_reproduces_the_run(one)
    assert_merge_equal(one, tmp_path)


def test_eva_under_ddp_every_rank_starts_from_the_same_adapter(one: Path, tmp_path: Path) -> None:
    """Two gloo processes: every rank holds rank 0's EVA result (equal digests), which is the one-process
    result (same ranks, same losses), and the run trains on as one process does."""
    out = tmp_path / "two"
    torchrun(out, 2, *EVA)
    two = eva_in_effect(out)
    assert len(two["digest_per_rank"]) == 2 and len(set(two["digest_per_rank"])) == 1
    assert two["ranks"] == eva_in_effect(one)["ranks"]
    got, want = losses(out), losses(one)
    assert sorted(got) == sorted(want) and max(abs(got[s] - want[s]) for s in want) <= 1e-5, (got, want)
    assert adapter_config(out)["rank_pattern"] == adapter_config(one)["rank_pattern"]


def test_eva_resume_on_another_world_size_keeps_its_ranks(one: Path, tmp_path: Path) -> None:
    """Resuming never recomputes EVA: the adapter takes the checkpoint's ranks (then its weights)."""
    out = tmp_path / "resumed"
    torchrun(out, 2, *EVA, resume=one / "checkpoint-2")
    assert eva_in_effect(out)["ranks_from"] == str(one / "checkpoint-2")
    got, want = losses(out), losses(one)
    assert sorted(got) == [3, 4] and max(abs(got[s] - want[s]) for s in got) <= 1e-5, (got, want)
    assert adapter_shapes(out / "final") == adapter_shapes(one / "final")


def _eva_on_rank(rank: int, port: int, model_dir: str, out: str) -> None:
    """One of two gloo processes: EVA over data that differs by rank (as a GPU's non-deterministic
    kernels could make it differ), then `eva.initialize`, which must leave rank 0's result on both."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunefleet.distributed import eva

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="eva", eva_config={"rho": 2.0}
        )
        peft_model = get_peft_model(model, config)
        ids = torch.randint(5, 500, (16, 24), generator=torch.Generator().manual_seed(rank)).tolist()
        dataset = Dataset.from_list([{"input_ids": row, "labels": row} for row in ids])
        micro_batches = [list(range(i, i + 4)) for i in range(0, 16, 4)]
        own = eva.eva_state_dict(peft_model, dataset, micro_batches, pad_token_id=0)
        own_digest = json.dumps({k: v.sum().item() for k, v in sorted(own.items())})
        result = eva.initialize(peft_model, dataset, micro_batches, pad_token_id=0)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"own": own_digest, **result}))
    finally:
        torch.distributed.destroy_process_group()


def test_eva_result_is_rank_0s_on_every_rank_even_when_the_ranks_computed_different_ones(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The broadcast itself: each rank's own EVA differs here (its data differs), and after
    `eva.initialize` both hold rank 0's adapter (the digests `agree` compares are equal)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_eva_on_rank, args=(port, str(tiny_model_dir), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["own"] != ranks[1]["own"]  # the premise: without the broadcast they would differ
    assert (
        ranks[0]["digest_per_rank"] == ranks[1]["digest_per_rank"]
        and len(set(ranks[0]["digest_per_rank"])) == 1
    )
    assert ranks[0]["ranks"] == ranks[1]["ranks"]
