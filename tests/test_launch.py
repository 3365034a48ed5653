"""`tunefleet launch` on this CPU: rendered files, the command, and real multi-process training.

Fast tests pin the dry run, the files in `<output_dir>/launch/`, the hardware choice, the
refusals before anything starts, the exit-code relay and the start-up checks (guard.py).

The slow tests launch real gloo processes with `tunefleet launch --nproc N` (accelerate launch
underneath), the tiny demo model, fp32, no dropout, no warm-up: DDP, DeepSpeed ZeRO-2 and ZeRO-3,
ZeRO-3 + QLoRA nf4, FSDP2 and FSDP-QLoRA (through distributed/cpu_fsdp.py) on 2 processes, ZeRO-2
on 3. Each must give per-step losses equal to one process with the same global batch (<= TOL),
a final adapter equal to that run's (<= TOL) that PEFT loads, plan.json showing the distributed
type, world size, gloo and the sharding in effect, and complete checkpoints. ZeRO-2, ZeRO-3 and
FSDP2 resume from a checkpoint on the same world size with the same losses (FSDP2 resharding on
another world size is tested in test_fsdp_checkpoints.py; ZeRO resharding is ds_reshard.py's, tested there). FSDP without the
compatibility layer must stop with the fallback error (the day it trains sharded instead,
upstream supports FSDP on CPU and the layer can go). FSDP-QLoRA with DoRA trains under bf16 mixed
precision (one fp32 dtype for every trainable parameter).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launched import (
    DEMO,
    SPECS,
    STEPS,
    TOL,
    Launched,
    adapter,
    assert_weights_match,
    env,
    launch_argv,
    losses,
    max_diff,
    run_launch,
)
from tests.launched import QLORA as QLORA_SETS
from tunefleet.distributed import cpu_fsdp, guard
from tunefleet.launch import workstation as ws
from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core.args import StartOptions
from tunefleet.launch.core.errors import RecipeError, TunefleetError
from tunefleet.launch.core.hardware import Hardware
from tunefleet.launch.core.layout import ENV_DISTRIBUTED_TYPE, ENV_EXIT_FILE
from tunefleet.launch.preflight import preflight

QLORA = list(QLORA_SETS)


# ----------------------------------------------------------------------------- fast: files and command


def test_dry_run_prints_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        launch_argv(
            out, 2, "parallel.strategy=deepspeed-zero3", *QLORA, extra=("--dry-run", "--main-port", "29533")
        ),
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert not out.exists(), "--dry-run wrote files"
    assert "parallel.strategy=deepspeed-zero3, 2 CPU (gloo) process(es)" in text and "(new run)" in text
    assert "note: model.quant_storage_dtype=float32" in text  # compat's adjustment is shown
    for name in ("accelerate.yaml", "deepspeed.json", "recipe.yaml", "command.txt"):
        assert f"would write {out / 'launch' / name}" in text and f"--- {out / 'launch' / name}" in text
    assert (
        "distributed_type: DEEPSPEED" in text and '"stage": 3' in text and "main_process_port: 29533" in text
    )
    command = [line for line in text.splitlines() if line.startswith("env ")]
    assert command and "-m tunefleet.distributed.relay accelerate launch --config_file" in command[0]
    assert "TUNEFLEET_DISTRIBUTED_TYPE=DEEPSPEED" in command[0] and "ACCELERATE_USE_CPU" not in command[0]
    assert f"--recipe {out / 'launch' / 'recipe.yaml'}" in command[0]


def test_launcher_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom tunefleet.launch import workstation as ws\n"
        "hw = ws.hardware(nproc=2, gpus=None, visible_gpus=0, main_port=29500)\n"
        f"ws.prepare_launch({str(DEMO)!r}, ['output_dir={tmp_path / 'r'}', 'parallel.strategy=fsdp'], hw)\n"
        "heavy = [m for m in ('torch', 'transformers', 'accelerate', 'deepspeed') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_written_files_are_what_is_launched(tmp_path: Path) -> None:
    from tunefleet.launch.command import format_command
    from tunefleet.launch.core import recipe as R

    out = tmp_path / "run"
    hw = ws.hardware(nproc=2, gpus=None, visible_gpus=0, main_port=29534)
    plan = ws.prepare_launch(
        str(DEMO), [f"output_dir={out}", "parallel.strategy=fsdp-qlora", *QLORA], hw, python="python"
    )
    ws.write_launch_files(plan)
    launch_dir = out / "launch"
    assert sorted(p.name for p in launch_dir.iterdir()) == ["accelerate.yaml", "command.txt", "recipe.yaml"]
    launched = R.load(launch_dir / "recipe.yaml")
    assert launched == plan.recipe  # fully resolved: nothing is left for the ranks to guess
    assert launched.model.quant_storage_dtype == "float32" and launched.parallel.strategy == "fsdp-qlora"
    assert (launch_dir / "command.txt").read_text().splitlines()[-1] == format_command(plan.argv, plan.env)
    assert plan.argv[plan.argv.index("--recipe") + 1] == str(launch_dir / "recipe.yaml")
    assert plan.env["TUNEFLEET_DISTRIBUTED_TYPE"] == "FSDP" and plan.env["TUNEFLEET_WORLD_SIZE"] == "2"
    assert plan.env[ENV_EXIT_FILE] == str(launch_dir / ws.EXIT_FILE)
    assert any("cpu_fsdp.py" in n for n in plan.notes)
    # the entrypoint sees a fresh run, not a foreign directory
    from tunefleet.launch.core import rundir

    assert rundir.decide_start(out, StartOptions()) == rundir.Start("fresh", None)


def test_hardware_choice() -> None:
    assert ws.hardware(nproc=None, gpus=None, visible_gpus=0, main_port=1) == Hardware(
        use_cpu=True, main_process_port=1
    )
    assert ws.hardware(nproc=None, gpus=None, visible_gpus=4, main_port=1).num_processes == 4
    assert ws.hardware(nproc=3, gpus=None, visible_gpus=4, main_port=1).use_cpu
    gpus = ws.hardware(nproc=None, gpus=2, visible_gpus=0, main_port=1)
    assert (gpus.num_processes, gpus.use_cpu) == (2, False)
    with pytest.raises(TunefleetError, match="at least 1"):
        ws.hardware(nproc=0, gpus=None, visible_gpus=0, main_port=1)


def test_refusals_before_anything_starts(tmp_path: Path) -> None:
    hw2 = ws.hardware(nproc=2, gpus=None, visible_gpus=0, main_port=29535)
    with pytest.raises(RecipeError, match="`single` runs one process"):
        ws.prepare_launch(str(DEMO), [f"output_dir={tmp_path / 'a'}", "parallel.strategy=single"], hw2)
    # the shipped default, `auto`, runs several processes as ddp and says so
    auto = ws.prepare_launch(str(DEMO), [f"output_dir={tmp_path / 'a'}"], hw2)
    assert (
        auto.recipe.parallel.strategy == "ddp"
        and "parallel.strategy: auto -> ddp (2 processes)" in auto.notes
    )
    with pytest.raises(RecipeError, match="FSDP1 needs GPUs"):
        ws.prepare_launch(
            str(DEMO),
            [f"output_dir={tmp_path / 'a'}", "parallel.strategy=fsdp", "parallel.fsdp_version=1"],
            hw2,
        )
    finished = tmp_path / "done"
    (finished / "final").mkdir(parents=True)
    (finished / "recipe.yaml").write_text("x")
    with pytest.raises(TunefleetError, match="already holds a finished run"):
        ws.prepare_launch(str(DEMO), [f"output_dir={finished}", "parallel.strategy=ddp"], hw2)
    assert sorted(p.name for p in finished.iterdir()) == ["final", "recipe.yaml"]  # nothing written
    # --overwrite: the old run is moved aside by the launcher, before the new files are written
    plan = ws.prepare_launch(
        str(DEMO),
        [f"output_dir={finished}", "parallel.strategy=ddp"],
        hw2,
        options=StartOptions(overwrite=True),
    )
    assert plan.start == "overwrite"
    ws.write_launch_files(plan)
    assert [p.name for p in finished.iterdir()] == ["launch"]
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("done.old-")]) == 1


def test_checkpoint_layout_refusals() -> None:
    from dataclasses import replace

    from tests.fake_checkpoints import manifest

    zero2 = manifest(1, strategy="deepspeed-zero2", world_size=2)
    ckpt.check_layout(zero2, "deepspeed-zero2", 2)
    with pytest.raises(TunefleetError, match="Automatic adjustment of ZeRO's optimizer state partitioning"):
        ckpt.check_layout(zero2, "deepspeed-zero2", 3)
    with pytest.raises(TunefleetError, match="cannot read it"):
        ckpt.check_layout(zero2, "deepspeed-zero3", 2)
    fsdp2 = manifest(
        1, strategy="fsdp", world_size=2, recipe={"parallel": {"fsdp_version": 2, "state_dict": "sharded"}}
    )
    ckpt.check_layout(fsdp2, "fsdp", 3)  # DCP reshards FSDP2 LoRA shards (tests/test_fsdp_checkpoints.py)
    with pytest.raises(TunefleetError, match="resharding is tested for FSDP2 sharded checkpoints only"):
        ckpt.check_layout(replace(fsdp2, strategy="fsdp-qlora"), "fsdp-qlora", 4)
    with pytest.raises(TunefleetError, match="resharding is tested for FSDP2 sharded checkpoints only"):
        ckpt.check_layout(
            replace(fsdp2, recipe={"parallel": {"fsdp_version": 2, "state_dict": "full"}}), "fsdp", 4
        )
    ckpt.check_layout(manifest(1, strategy="ddp", world_size=2), "single", 1)  # torch: any world size
    with pytest.raises(TunefleetError, match="cannot read it"):
        ckpt.check_layout(manifest(1, strategy="single", world_size=1), "fsdp", 2)


def test_exit_code_relay(tmp_path: Path) -> None:
    """accelerate's launchers turn every failure into 1; rank 0's code (75: requeue) comes through."""
    exit_file = tmp_path / ws.EXIT_FILE
    script = f"import pathlib, sys; pathlib.Path({str(exit_file)!r}).write_text(sys.argv[1]); sys.exit(1)"
    plan = ws.LaunchPlan(
        recipe=None,
        hw=Hardware(),
        notes=[],
        config_dir=tmp_path,
        files={},  # type: ignore[arg-type]
        argv=[sys.executable, "-c", script, "75"],
        env={},
        start="fresh",
    )
    assert ws.run_launch(plan) == 75
    plan = ws.LaunchPlan(**{**plan.__dict__, "argv": [sys.executable, "-c", script, "0"]})
    assert ws.run_launch(plan) == 1  # rank 0 finished, another rank failed: the launcher's code
    exit_file.unlink()
    plan = ws.LaunchPlan(**{**plan.__dict__, "argv": [sys.executable, "-c", "import sys; sys.exit(3)"]})
    assert ws.run_launch(plan) == 3


class _State:
    def __init__(self, kind: str, n: int) -> None:
        from accelerate.utils import DistributedType

        self.distributed_type, self.num_processes = DistributedType(kind), n


def test_guard_stops_silent_fallbacks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    launched = guard.Expectation(distributed_type="FSDP", world_size=2, source="tunefleet launch")
    guard.check_distributed(_State("FSDP", 2), launched, "fsdp")
    with pytest.raises(TunefleetError, match="FSDP silently became DDP"):
        guard.check_distributed(_State("MULTI_CPU", 2), launched, "fsdp")
    zero = guard.Expectation(distributed_type="DEEPSPEED", world_size=2, source="tunefleet launch")
    with pytest.raises(TunefleetError, match="DeepSpeed was not turned on"):
        guard.check_distributed(_State("MULTI_CPU", 2), zero, "deepspeed-zero2")
    with pytest.raises(TunefleetError, match="did not join one world"):
        guard.check_distributed(
            _State("MULTI_CPU", 1),
            guard.Expectation(distributed_type="MULTI_CPU", world_size=2, source="the recipe"),
            "ddp",
        )
    with pytest.raises(TunefleetError, match=r"no DTensor or flat \(FSDP1\) parameter"):
        guard.check_sharding("fsdp", {"kind": "ddp", "params": 3}, 2)
    # FSDP-QLoRA exists to shard the 4-bit base: a replicated frozen base is refused
    half = {
        "kind": "fsdp2",
        "params": 10,
        "sharded_params": 7,
        "trainable_sharded_params": 3,
        "trainable_params": 3,
        "mesh_size": 2,
    }
    guard.check_sharding("fsdp", half, 2)  # plain LoRA: the trainable parameters are what must be sharded
    with pytest.raises(
        TunefleetError, match="only 7 of 10 parameters are sharded .* replicated on every rank"
    ):
        guard.check_sharding("fsdp-qlora", half, 2)
    with pytest.raises(TunefleetError, match="only 1 of 3 parameters are ZeRO-3 partitioned"):
        guard.check_sharding(
            "deepspeed-zero3", {"kind": "deepspeed-zero3", "params": 3, "partitioned_params": 1}, 2
        )
    # launched by hand: the expectation comes from the recipe and WORLD_SIZE
    from tunefleet.launch.core import recipe as R

    monkeypatch.delenv(ENV_DISTRIBUTED_TYPE, raising=False)
    hw = guard.runtime_hardware(2, use_cpu=True)
    checked = preflight(R.load(DEMO, [f"output_dir={tmp_path / 'x'}"]), hw, StartOptions())
    assert checked.recipe.parallel.strategy == "ddp" and "auto -> ddp" in checked.notes[0]
    assert guard.expectation(checked.recipe, hw) == guard.Expectation(
        distributed_type="MULTI_CPU", world_size=2, source="the recipe"
    )
    with pytest.raises(RecipeError, match="`single` runs one process"):  # by hand too
        preflight(
            R.load(DEMO, [f"output_dir={tmp_path / 'x'}", "parallel.strategy=single"]), hw, StartOptions()
        )


def test_cpu_fsdp_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_fsdp.wanted("fsdp", cuda_available=False) and cpu_fsdp.wanted(
        "fsdp-qlora", cuda_available=False
    )
    assert not cpu_fsdp.wanted("fsdp", cuda_available=True)
    assert not cpu_fsdp.wanted("deepspeed-zero3", cuda_available=False)
    monkeypatch.setenv(cpu_fsdp.ENV_SWITCH, "0")
    assert not cpu_fsdp.wanted("fsdp", cuda_available=False)


# ----------------------------------------------------------------------------- slow: real runs

CASES: dict[str, tuple[str, str, str]] = {
    # shared run (tests/launched.py): (reference, distributed type, sharding kind)
    "ddp": ("lora-8", "MULTI_CPU", "ddp"),
    "zero2": ("lora-8", "DEEPSPEED", "deepspeed-zero2"),
    "zero3": ("lora-8", "DEEPSPEED", "deepspeed-zero3"),
    "zero3-qlora": ("qlora-8", "DEEPSPEED", "deepspeed-zero3"),  # qlora-8: what ZeRO-3 resolves to on CPU
    "fsdp": ("lora-8", "FSDP", "fsdp2"),
    "ddp-padding-free": ("lora-8", "MULTI_CPU", "ddp"),
    "fsdp-qlora": ("qlora-8", "FSDP", "fsdp2"),
    "zero2-3proc": ("lora-6", "DEEPSPEED", "deepspeed-zero2"),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("launch")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_launch_trains_like_one_process(launched: Launched, name: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunefleet.distributed.demo_model import ensure_tiny_llama
    from tunefleet.launch.core import recipe as R

    ref_name, dist_type, sharding = CASES[name]
    nproc = SPECS[name].nproc
    ref = launched.get(ref_name)
    out = launched.get(name)

    diff = max_diff(losses(out), losses(ref))
    print(f"{name}: max |loss - 1 process| = {diff:.2e}", flush=True)
    assert sorted(losses(out)) == list(range(1, STEPS + 1)) and diff <= TOL

    effect = json.loads((out / "plan.json").read_text())["in_effect"]
    assert (effect["distributed_type"], effect["world_size"], effect["backend"]) == (dist_type, nproc, "gloo")
    assert effect["sharding"]["kind"] == sharding
    # plain FSDP2: only rank 0 read the base weights (the others received them: losses equal above)
    assert effect["weights_read_by_ranks"] == ([0] if name == "fsdp" else list(range(nproc)))
    if sharding == "fsdp2":  # FSDP really shards: every parameter a DTensor on a mesh of the world size
        assert effect["cpu_fsdp_layer"] is True
        assert effect["sharding"]["dtensor_params"] == effect["sharding"]["params"]
        assert effect["sharding"]["mesh_size"] == nproc and effect["sharding"]["placements"] == ["S(0)"]
    if sharding == "deepspeed-zero3":
        assert effect["sharding"]["partitioned_params"] == effect["sharding"]["params"]

    assert [ckpt.step_of(p) for p in ckpt.complete_checkpoints(out)] == [2, 4]
    manifest = ckpt.read_manifest(out / "checkpoint-4")
    assert manifest.world_size == nproc and manifest.strategy == SPECS[name].overrides[0].split("=")[1]

    # the final adapter is a normal PEFT adapter (gathered from the shards), equal to one process's
    lr = R.load(out / "recipe.yaml").train.lr
    assert_weights_match(adapter(out / "final"), adapter(ref / "final"), name, lr=lr)
    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_llama())
    ids = torch.tensor([[1, 5, 9, 200, 300]])
    with torch.no_grad():
        plain = base(ids).logits
        tuned = PeftModel.from_pretrained(base, out / "final")(ids).logits
    assert not torch.allclose(plain, tuned), "the adapter changed nothing"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2", "zero3", "fsdp"])
def test_resume_on_the_same_world_size(launched: Launched, workdir: Path, name: str) -> None:
    """Continue from checkpoint-2 of the run above in a new output_dir: steps 3-4 as in one process."""
    spec, ref_name = SPECS[name], CASES[name][0]
    source = launched.get(name)
    out = workdir / f"{name}-resumed"
    proc = run_launch(out, spec.nproc, spec.overrides, extra=("--resume", str(source / "checkpoint-2")))
    assert proc.returncode == 0, proc.stdout[-6000:]
    got, want = losses(out), losses(launched.get(ref_name))
    assert sorted(got) == [3, 4]
    assert max(abs(got[s] - want[s]) for s in got) <= TOL
    # FSDP2 shards on another world size: tests/test_fsdp_checkpoints.py


@pytest.mark.slow
def test_fsdp_qdora_in_bf16_trains(workdir: Path) -> None:
    """FSDP-QLoRA with DoRA under bf16 mixed precision: TRL casts LoRA A/B to bf16 and leaves DoRA's
    magnitudes fp32, and FSDP2 refused the mix in the first forward ("FSDP expects uniform original
    parameter dtype"); every trainable parameter is now fp32 (model.adapter_dtype), computed in bf16."""
    out = workdir / "fsdp-qdora-bf16"
    overrides = [
        "parallel.strategy=fsdp-qlora",
        *QLORA,
        "peft.method=dora",
        "train.precision=bf16",
        "model.dtype=auto",
    ]
    proc = run_launch(out, 2, overrides)
    assert proc.returncode == 0, proc.stdout[-6000:]
    values = losses(out)
    assert sorted(values) == list(range(1, STEPS + 1)) and all(v == v for v in values.values())
    effect = json.loads((out / "plan.json").read_text())["in_effect"]
    assert (effect["mixed_precision"], effect["model_dtype"]) == ("bf16", "bfloat16")
    assert effect["trainable_dtypes"] == ["float32"]
    sharding = effect["sharding"]
    assert sharding["kind"] == "fsdp2" and sharding["sharded_params"] == sharding["params"]
    assert any("lora_magnitude_vector" in k for k in adapter(out / "final"))


@pytest.mark.slow
def test_fsdp_without_layer_falls_back(workdir: Path) -> None:
    """Without distributed/cpu_fsdp.py accelerate still runs an FSDP config on CPU as DDP; the
    entrypoint must stop with a clear error. When this starts to train instead, upstream shards on
    CPU by itself and the layer can go."""
    out = workdir / "fsdp-no-layer"
    proc = run_launch(out, 2, ["parallel.strategy=fsdp"], **{cpu_fsdp.ENV_SWITCH: "0"})
    if proc.returncode == 0:
        effect = json.loads((out / "plan.json").read_text())["in_effect"]
        if effect.get("sharding", {}).get("kind") == "fsdp2":
            pytest.fail("upstream now supports FSDP on CPU: remove distributed/cpu_fsdp.py")
    assert proc.returncode == 2, proc.stdout[-6000:]
    assert "asked for distributed type FSDP with 2 process(es), but accelerate runs MULTI_CPU" in proc.stdout
    assert "FSDP silently became DDP" in proc.stdout and f"unset {cpu_fsdp.ENV_SWITCH}" in proc.stdout
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))


@pytest.mark.slow
def test_sigusr1_checkpoints_and_the_launcher_exits_75(workdir: Path) -> None:
    """SIGUSR1 to `tunefleet launch` reaches the ranks through accelerate and torchrun; they save
    a complete checkpoint and stop; the launcher exits 75 (accelerate alone would say 1)."""
    out = workdir / "preempted"
    log = workdir / "preempted.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            launch_argv(
                out,
                2,
                "parallel.strategy=ddp",
                "train.max_steps=200",
                "train.save_steps=1",
                "checkpoint.keep_last=1",
            ),
            env=env(),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while ckpt.latest(out) is None:
            assert proc.poll() is None, log.read_text()[-6000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=120) == 75, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    newest = ckpt.latest(out)
    assert newest is not None and ckpt.step_of(newest) < 200 and not (out / "final").exists()
    assert (out / "launch" / ws.EXIT_FILE).read_text().strip() == "75"
