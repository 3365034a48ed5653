"""Full and partial fine-tuning (`peft.method` full / freeze) for real on CPU: the demo model, fp32,
gloo processes, the session's shared runs (tests/launched.py).

- one process: the loss falls; final/ is a Hugging Face model directory that `AutoModelForCausalLM`
  loads and that gives the run's last eval loss; under freeze every frozen tensor of final/ equals
  the base bit for bit and every trained one changed;
- 2 processes train like 1 with the same global batch (per-step losses <= TOL, final weights <=
  ADAPTER_TOL) under ddp, fsdp (FSDP2), deepspeed-zero2 and deepspeed-zero3 (full), fsdp and ddp
  (freeze); the sharding really is in effect, checkpoints hold the ranks' shards and never a whole
  model gathered on one rank; each rank's peak memory is recorded;
- partial under FSDP2: frozen and trained parameters are sharded alike, optimizer state exists
  for the trained ones only;
- stopped by SIGUSR1 on 1 process and resumed on 2, and resumed from a 2-process checkpoint on 1:
  the losses of the uninterrupted run (fsdp, deepspeed-zero3); an FSDP2 checkpoint whose optimizer
  state was removed continues its weights with a fresh optimizer only when asked;
- `tunefleet plan` counts what the run trains; generate works on final/; merge has nothing to merge.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launched import (
    ADAPTER_TOL,
    BASE,
    DEMO,
    SPECS,
    STEPS,
    TOL,
    Launched,
    env,
    launch_argv,
    losses,
    max_diff,
    metrics,
    plan_in_effect,
    run_launch,
    weights_differ,
)
from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core import rundir
from tunefleet.launch.core.args import StartOptions
from tunefleet.launch.core.errors import RunDirError

pytestmark = pytest.mark.slow

PAIRS = {  # shared 2-process run -> its 1-process reference, sharding kind
    "full-ddp": ("full-8", "ddp"),
    "full-fsdp": ("full-8", "fsdp2"),
    "full-zero2": ("full-8", "deepspeed-zero2"),
    "full-zero3": ("full-8", "deepspeed-zero3"),
    "freeze-fsdp": ("freeze-8", "fsdp2"),
    "freeze-ddp": ("freeze-8", "ddp"),
}


def weights(final: Path) -> dict:
    """Every tensor of a final/ model directory (through its index)."""
    from safetensors.torch import load_file

    index = json.loads((final / "model.safetensors.index.json").read_text())
    out: dict = {}
    for name in sorted(set(index["weight_map"].values())):
        out.update(load_file(final / name))
    assert sorted(out) == sorted(index["weight_map"])
    return out


def eval_loss(out: Path) -> float:
    rows = [r for r in metrics(out) if "eval_loss" in r]
    assert rows, "the run logged no evaluation"
    return rows[-1]["eval_loss"]


def recomputed_eval_loss(final: Path, run: Path) -> float:
    """The eval split's loss with final/ loaded by `AutoModelForCausalLM`, as the trainer's evaluation
    computes it: the eval rows in order, in micro batches padded by the run's collator, each batch's
    mean token loss weighted by its samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefleet.distributed.prepare import load_or_prepare
    from tunefleet.launch import hf_compat
    from tunefleet.launch.core import recipe as R

    recipe = R.load(run / "recipe.yaml")
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    data = load_or_prepare(recipe, tokenizer, main=True, world_size=1, show=False)
    collate = hf_compat.language_modeling_collator(tokenizer.pad_token_id, padding_free=False)
    rows = [data.eval[i] for i in range(len(data.eval))]
    micro = recipe.batch.micro_batch_size
    total, samples = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), micro):
            batch = collate(rows[start : start + micro])
            loss = model(
                **{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            ).loss
            n = len(rows[start : start + micro])
            total, samples = total + float(loss) * n, samples + n
    return total / samples


# ----------------------------------------------------------------------------- one process


@pytest.mark.parametrize("name", ["full-8", "freeze-8"])
def test_one_process_trains_and_final_is_a_model_that_loads(launched: Launched, name: str) -> None:
    out = launched.get(name)
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1)) and got[STEPS] < got[1], got
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert (final / "generation_config.json").is_file() and (final / "tokenizer.json").is_file()
    assert not (final / "adapter_config.json").exists()
    recomputed, logged = recomputed_eval_loss(final, out), eval_loss(out)
    print(f"{name}: eval loss logged {logged:.6f}, final/ {recomputed:.6f}", flush=True)
    assert abs(recomputed - logged) <= 1e-5
    effect = plan_in_effect(out)
    plan = json.loads((out / "plan.json").read_text())
    assert effect["trainable_params"] == plan["trainable_params"]  # `tunefleet plan` counts what trains
    assert len(effect["peak_memory_gib_per_rank"]) == 1 and effect["peak_memory_gib_per_rank"][0] > 0
    assert all(len(r["peak_memory_gib"]) == 1 for r in metrics(out))


def test_freeze_leaves_every_frozen_tensor_bit_for_bit(launched: Launched, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    base = load_file(tiny_model_dir / "model.safetensors")
    tuned = weights(launched.get("freeze-8") / "final")
    assert sorted(tuned) == sorted(base)
    trained = [n for n in tuned if n.startswith("model.layers.1.") or n == "lm_head.weight"]
    frozen = [n for n in tuned if n not in trained]
    assert trained and frozen
    assert all((tuned[n] == base[n]).all() for n in frozen)  # bit for bit
    assert all(not (tuned[n] == base[n]).all() for n in trained)
    counted = json.loads((launched.get("freeze-8") / "plan.json").read_text())["trainable_params"]
    assert counted == sum(base[n].numel() for n in trained)


# ----------------------------------------------------------------------------- 2 processes = 1


@pytest.mark.parametrize("name", list(PAIRS))
def test_two_processes_train_like_one(launched: Launched, name: str) -> None:
    ref_name, kind = PAIRS[name]
    ref, out = launched.get(ref_name), launched.get(name)
    diff = max_diff(losses(out), losses(ref))
    print(f"{name}: max |loss - 1 process| = {diff:.2e}", flush=True)
    assert sorted(losses(out)) == list(range(1, STEPS + 1)) and diff <= TOL
    worst, _, _ = weights_differ(weights(out / "final"), weights(ref / "final"))  # the same names
    print(f"{name}: max |final weight - 1 process| = {worst:.2e}", flush=True)
    assert worst <= ADAPTER_TOL
    assert json.loads((out / "final" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    effect = plan_in_effect(out)
    assert effect["world_size"] == 2 and effect["sharding"]["kind"] == kind
    if kind == "fsdp2":  # frozen and trained parameters alike are DTensors on the 2-rank mesh
        assert effect["sharding"]["dtensor_params"] == effect["sharding"]["params"]
        assert effect["sharding"]["mesh_size"] == 2
    if kind == "deepspeed-zero3":
        assert effect["sharding"]["partitioned_params"] == effect["sharding"]["params"]
    peaks = effect["peak_memory_gib_per_rank"]
    assert len(peaks) == 2 and all(p > 0 for p in peaks)
    assert all(len(r["peak_memory_gib"]) == 2 for r in metrics(out))

    # checkpoints hold each rank's shard: no whole model gathered on one rank to save them
    files = ckpt.read_manifest(out / "checkpoint-2").files
    if kind == "fsdp2":
        assert any(f.endswith(".distcp") for f in files) and not any("safetensors" in f for f in files)
    elif kind.startswith("deepspeed"):
        assert {f"global_step2/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(files)
        assert not any(f.startswith("model") and "safetensors" in f for f in files) or kind.endswith("zero2")
    else:  # ddp: the replicated model as it is, and the whole optimizer (any world size reads them)
        assert "model.safetensors" in files and "optimizer.pt" in files


def test_partial_under_fsdp_keeps_optimizer_state_for_the_trained_part_only(launched: Launched) -> None:
    out = launched.get("freeze-fsdp")
    effect = plan_in_effect(out)
    trained = effect["trainable_params"]
    state = effect["optimizer_state_elements_per_rank"]
    # AdamW: two moments per trained element, split over 2 ranks (FSDP2 pads a dim-0 shard by < 1 row)
    assert len(state) == 2 and abs(sum(state) - 2 * trained) <= 2 * 2 * 128, (state, trained)
    full = plan_in_effect(launched.get("full-fsdp"))
    assert sum(full["optimizer_state_elements_per_rank"]) >= 2 * full["trainable_params"] > sum(state)


# ----------------------------------------------------------------------------- stop, resume elsewhere


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("full")


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed-zero3"])
def test_stop_and_resume_on_another_world_size(launched: Launched, workdir: Path, strategy: str) -> None:
    """1 process, SIGUSR1 while checkpoint 2 is being written: a checkpoint at step 3 and exit 75;
    the rerun on 2 processes finishes; and the 2-process run's checkpoint 2 resumed on 1 process.
    Every step's loss equals the uninterrupted 1-process run's."""
    overrides = [f"parallel.strategy={strategy}", *SPECS["full-fsdp"].overrides[1:]]
    want = losses(launched.get("full-8"))
    out = workdir / f"{strategy}-1to2"
    log = workdir / f"{strategy}-1to2.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            launch_argv(out, 1, *overrides),
            env=env(TUNEFLEET_TEST_SAVE_DELAY_S="2"),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while not ckpt.tmp_dir_for(out, 2).is_dir():  # checkpoint 2 is being written
            assert proc.poll() is None, log.read_text()[-6000:]
            assert time.monotonic() < deadline, "checkpoint 2 never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=300) == 75, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = ckpt.latest(out)
    assert stopped is not None and ckpt.step_of(stopped) == 3 and not (out / "final").exists()
    assert ckpt.read_manifest(stopped).world_size == 1
    proc2 = run_launch(out, 2, overrides)  # the same command on 2 processes continues it
    assert proc2.returncode == 0, proc2.stdout[-6000:]
    assert "written by 1 process(es), now 2" in proc2.stdout
    assert max_diff(losses(out), want) <= TOL

    shared = launched.get("full-fsdp" if strategy == "fsdp" else "full-zero3")
    back = workdir / f"{strategy}-2to1"
    proc3 = run_launch(back, 1, overrides, extra=("--resume", str(shared / "checkpoint-2")))
    assert proc3.returncode == 0, proc3.stdout[-6000:]
    got = losses(back)
    assert sorted(got) == [3, 4] and max(abs(got[s] - want[s]) for s in got) <= TOL


def test_fsdp_checkpoint_without_optimizer_state_continues_its_weights(
    launched: Launched, workdir: Path
) -> None:
    """The 2-process FSDP2 run's checkpoint 2 with its optimizer shards and scheduler.pt removed:
    refused without --resume-weights-only; with it, continued on 1 process: step 3's loss is the
    uninterrupted run's (the same weights, resharded), so are the learning rates, and the fresh
    optimizer moves step 4 elsewhere."""
    import shutil

    overrides = ["parallel.strategy=fsdp", *SPECS["full-fsdp"].overrides[1:]]
    pruned = workdir / "pruned" / "checkpoint-2"
    shutil.copytree(launched.get("full-fsdp") / "checkpoint-2", pruned)
    removed = ckpt.optimizer_files(pruned)
    assert removed and all(rel.startswith("optimizer_0/") for rel in removed)  # DCP's optimizer shards
    shutil.rmtree(pruned / "optimizer_0")
    (pruned / "scheduler.pt").unlink()
    out = workdir / "fsdp-weights-only"
    with pytest.raises(RunDirError, match="add --resume-weights-only"):  # what the launcher asks first
        rundir.decide_start(out, StartOptions(resume=str(pruned)))

    proc = run_launch(out, 1, overrides, extra=("--resume", str(pruned), "--resume-weights-only"))
    assert proc.returncode == 0, proc.stdout[-6000:]
    got = {r["step"]: r for r in metrics(out) if "loss" in r}
    want = {r["step"]: r for r in metrics(launched.get("full-8")) if "loss" in r}
    assert sorted(got) == [3, 4] and abs(got[3]["loss"] - want[3]["loss"]) <= TOL
    assert all(abs(got[s]["lr"] - want[s]["lr"]) <= 1e-12 for s in got)
    assert abs(got[4]["loss"] - want[4]["loss"]) > 10 * TOL


def test_zero2_full_checkpoint_on_another_world_size_is_refused(launched: Launched) -> None:
    from tunefleet.launch.core.errors import TunefleetError

    manifest = ckpt.read_manifest(launched.get("full-zero2") / "checkpoint-2")
    with pytest.raises(TunefleetError, match="not ZeRO-2's"):
        ckpt.check_layout(manifest, "deepspeed-zero2", 1)
    ckpt.check_layout(manifest, "deepspeed-zero2", 2)  # the same world size resumes


# ----------------------------------------------------------------------------- the commands on final/


def test_generate_answers_with_the_full_model_and_the_base(launched: Launched) -> None:
    from tunefleet.distributed import generate as gen

    run = launched.get("full-8")
    adapter, results = gen.generate_for_run(
        run, ["What is the capital of France?"], compare_base=True, max_new_tokens=4
    )
    assert adapter.kind == "model" and adapter.adapter_dir == run / "final"
    assert results[0]["answer"] is not None and "base_answer" in results[0]


def test_merge_says_there_is_nothing_to_merge(launched: Launched, tmp_path: Path) -> None:
    from tunefleet.distributed.merge import merge
    from tunefleet.launch.core.errors import TunefleetError

    with pytest.raises(TunefleetError, match="there is nothing to merge"):
        merge(launched.get("full-8"), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_export_streams_into_several_files_that_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The exporter lays the files out from the shapes, writes each header, then streams the tensors:
    with a small shard limit the model spans several files, each a valid safetensors file, and
    `from_pretrained` gives back every tensor (cast to the export dtype)."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefleet.distributed.export import export_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = SimpleNamespace(
        model=model,
        args=SimpleNamespace(process_index=0),
        accelerator=SimpleNamespace(unwrap_model=lambda m: m, wait_for_everyone=lambda: None),
    )
    out = tmp_path / "final"
    limit = 200_000
    written = export_model(
        trainer,
        AutoTokenizer.from_pretrained(tiny_model_dir),
        out,
        dtype=torch.bfloat16,
        max_shard_bytes=limit,
    )
    assert len(written["files"]) > 2 and written["total_bytes"] == sum(
        p.numel() * 2 for p in model.parameters()
    )
    loaded = weights(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == set(written["files"])
    for f in written["files"]:  # within the limit (+ its header), or one tensor larger than it
        held = [k for k, v in index.items() if v == f]
        assert (out / f).stat().st_size < limit + 4096 or len(held) == 1, (f, held)
    want = model.state_dict()
    assert all(torch.equal(loaded[k], want[k].to(torch.bfloat16)) for k in loaded)
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.dtype == torch.bfloat16 and set(back.state_dict()) == set(want)


def test_base_recipe_is_the_shared_one() -> None:
    """The pairs compare runs that differ only in the processes and the strategy."""
    for name, (ref_name, _) in PAIRS.items():
        a, b = SPECS[name].overrides, SPECS[ref_name].overrides
        assert [o for o in a if not o.startswith("parallel.")] == [
            o for o in b if o != "batch.group_by_length=false"
        ]
    assert "train.max_steps=4" in BASE and DEMO.is_file()


# ----------------------------------------------------------------------------- several machines, SLURM


def test_two_machines_shard_a_full_fine_tune_like_one_process(launched: Launched, workdir: Path) -> None:
    """`tunefleet launch --nnodes 2` (two launchers on loopback, 1 process each), FSDP2 full
    fine-tuning: the same losses and final weights as one process."""
    from tests.test_launch_nodes import log as node_log
    from tests.test_launch_nodes import start_nodes, wait_all

    out = workdir / "two-machines"
    procs = start_nodes(out, "parallel.strategy=fsdp", *SPECS["full-fsdp"].overrides[1:])
    codes = wait_all(procs, out)
    assert codes == [0, 0], node_log(out, 0)[-4000:] + node_log(out, 1)[-4000:]
    ref = launched.get("full-8")
    assert max_diff(losses(out), losses(ref)) <= TOL
    effect = plan_in_effect(out)
    assert (effect["world_size"], effect["sharding"]["kind"], effect["sharding"]["mesh_size"]) == (
        2,
        "fsdp2",
        2,
    )
    assert weights_differ(weights(out / "final"), weights(ref / "final"))[0] <= ADAPTER_TOL


@pytest.mark.slurm
@pytest.mark.parametrize(
    ("strategy", "sharding"), [("deepspeed-zero3", "deepspeed-zero3"), ("fsdp", "fsdp2")]
)
def test_a_slurm_job_shards_a_full_fine_tune(  # type: ignore[no-untyped-def]
    launched: Launched, workdir: Path, slurm_cluster, strategy: str, sharding: str
) -> None:
    """`tunefleet slurm --nodes 2 --submit` on CPU nodes: ZeRO-3 and FSDP2 full fine-tuning over 2
    emulated nodes train like one process and export final/ from the shards (the job starts them
    with accelerate launch and the rendered configs: under plain torchrun DeepSpeed stayed off)."""
    import os
    import re
    import sys

    out = workdir / f"slurm-full-{strategy}"
    overrides = [
        f"output_dir={out}",
        *BASE,
        f"parallel.strategy={strategy}",
        *SPECS["full-fsdp"].overrides[1:],
    ]
    argv = [sys.executable, "-m", "tunefleet.launch.cli", "slurm", str(DEMO), "--nodes", "2"]
    argv += ["--gpus-per-node", "0", "--time", "10", "--env", "OMP_NUM_THREADS=1", "--submit"]
    for item in overrides:
        argv += ["--set", item]
    run_env = {**os.environ, "SLURM_CONF": slurm_cluster.env["SLURM_CONF"], "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = re.search(r"submitted job (\d+)", proc.stdout)
    assert job, proc.stdout
    slurm_cluster.wait(job.group(1), "COMPLETED", timeout_s=300)
    assert max_diff(losses(out), losses(launched.get("full-8"))) <= TOL
    effect = plan_in_effect(out)
    assert (effect["world_size"], effect["sharding"]["kind"]) == (2, sharding)
    assert json.loads((out / "final" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
