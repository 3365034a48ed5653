"""What only a CUDA GPU can show (skipped elsewhere by the `gpu` marker, see conftest.py).

Not run on the CPU machines CI uses, and never run yet (no GPU was available): these are the
checks to run on a GPU box (`.venv/bin/python -m pytest -m gpu`, or `tools/gpu_smoke.sh`, which
runs them and then the same SMOKE_RUNS with a summary of exit codes, sharding and peak memory).
Each needs CUDA for a stated reason: bitsandbytes' CUDA kernels and paged optimizers, NCCL,
accelerate's FSDP1 (it looks up a GPU for sync_module_states), FSDP/DeepSpeed on CUDA devices,
DeepSpeed's CPU-Adam offload next to a GPU, fp16 mixed precision and its gradient scaler.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from tunefleet.distributed import sft
from tunefleet.launch.core import recipe as R

pytestmark = pytest.mark.gpu

DEMO = Path(str(resources.files("tunefleet.recipes"))) / "demo.yaml"
QUICK = [
    "train.max_steps=4",
    "train.logging_steps=1",
    "train.save_steps=0",
    "batch.micro_batch_size=4",
    "batch.global_batch_size=8",
    "data.max_length=128",
]


def losses(out: Path) -> list[float]:
    return [
        json.loads(line)["loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


@pytest.mark.parametrize(
    "extra",
    [
        ["model.quantization=nf4", "train.optimizer=paged_adamw_8bit"],
        ["model.quantization=nf4", "train.optimizer=paged_adamw_32bit", "peft.method=dora"],
        ["model.quantization=int8", "train.optimizer=adamw_torch_fused"],
    ],
    ids=["qlora-paged8", "qdora-paged32", "int8-fused"],
)
def test_quantized_training_on_cuda(tmp_path: Path, extra: list[str]) -> None:
    """bitsandbytes CUDA kernels and paged optimizers: trains in bf16, finite losses, adapter saved."""
    out = tmp_path / "run"
    recipe = R.load(
        DEMO, [f"output_dir={out}", *QUICK, "train.precision=bf16", "model.dtype=bfloat16", *extra]
    )
    assert sft.run(recipe) == 0
    values = losses(out)
    assert len(values) == 4 and all(v == v for v in values)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["in_effect"]["device"].startswith("cuda")


def test_nccl_ddp_two_gpus(tmp_path: Path) -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs for an NCCL run")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "tunefleet.launch.cli",
        "launch",
        str(DEMO),
        "--gpus",
        "2",
        "--set",
        f"output_dir={out}",
        "--set",
        "parallel.strategy=ddp",
    ]
    for o in QUICK:
        cmd += ["--set", o]
    subprocess.run(cmd, check=True, timeout=600)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["in_effect"]["backend"] == "nccl" and plan["in_effect"]["world_size"] == 2


def test_flash_attention_padding_free_equals_padded(tmp_path: Path) -> None:
    """flash attention's varlen kernels on packed micro batches (what `auto` picks on GPUs): the same
    losses as grouped padded micro batches (bf16 tolerance)."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed (pip install flash-attn --no-build-isolation)")
    runs = {}
    for mode, padding_free in (("packed", "auto"), ("padded", "false")):
        out = tmp_path / mode
        recipe = R.load(
            DEMO,
            [
                f"output_dir={out}",
                *QUICK,
                "train.precision=bf16",
                "model.dtype=bfloat16",
                "model.attn_implementation=flash_attention_2",
                f"batch.padding_free={padding_free}",
            ],
        )
        assert sft.run(recipe) == 0
        runs[mode] = losses(out)
        batching = json.loads((out / "plan.json").read_text())["in_effect"]["batching"]
        assert batching["padding_free"] is (mode == "packed")
    assert max(abs(a - b) for a, b in zip(runs["packed"], runs["padded"], strict=True)) < 2e-2


def test_liger_kernel_trains(tmp_path: Path) -> None:
    """train.liger_kernel through transformers' integration: trains, finite losses."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed (pip install liger-kernel)")
    out = tmp_path / "run"
    recipe = R.load(
        DEMO,
        [
            f"output_dir={out}",
            *QUICK,
            "train.precision=bf16",
            "model.dtype=bfloat16",
            "train.liger_kernel=true",
        ],
    )
    assert sft.run(recipe) == 0
    values = losses(out)
    assert len(values) == 4 and all(v == v for v in values)


def test_loftq_on_cuda(tmp_path: Path) -> None:
    """PEFT 0.21 runs LoftQ on CUDA only (`loftq_utils.py` moves the weights to "cuda"; refused on CPU by
    launch/compat.py): trains, the loss falls, and the adapter reloads (PEFT redoes LoftQ's quantized
    base on load) to the run's own last evaluation loss; merge gives base+adapter's logits."""
    from peft import AutoPeftModelForCausalLM

    from tests.test_lora_variants import eval_loss
    from tunefleet.distributed.merge import merge

    out = tmp_path / "run"
    recipe = R.load(
        DEMO, [f"output_dir={out}", *QUICK, "peft.init=loftq", "data.limit=80", "data.eval_ratio=0.1"]
    )
    assert sft.run(recipe) == 0
    values = losses(out)
    assert values[-1] < values[0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None][-1]
    model = AutoPeftModelForCausalLM.from_pretrained(out / "final")
    assert eval_loss(model, out) == pytest.approx(last, abs=1e-4)
    result = merge(out, tmp_path / "merged")
    assert result.max_logit_diff is not None and result.max_logit_diff < 1e-3


def test_eva_on_cuda(tmp_path: Path) -> None:
    """EVA's forward passes run where the model is (the trainer moves it to the GPU later): the CPU path is
    tested in tests/test_eva.py; this shows it completes on a GPU and the run trains."""
    out = tmp_path / "run"
    recipe = R.load(DEMO, [f"output_dir={out}", *QUICK, "peft.init=eva", "peft.r=4", "data.limit=80"])
    assert sft.run(recipe) == 0
    assert json.loads((out / "plan.json").read_text())["in_effect"]["eva"]["ranks"]


SMOKE_COMMON = [
    "train.max_steps=4",
    "train.logging_steps=1",
    "train.save_steps=2",
    "train.warmup_ratio=0",
    "data.limit=64",
    "data.max_length=128",
    "batch.micro_batch_size=4",
    "batch.global_batch_size=8",
    "train.precision=bf16",
    "model.dtype=auto",
]
"""tools/gpu_smoke.sh's COMMON."""

SMOKE_RUNS: dict[str, tuple[list[str], str]] = {
    # name: (--set values, sharding kind in plan.json); tools/gpu_smoke.sh runs the same list
    "fsdp-qlora": (
        ["parallel.strategy=fsdp-qlora", "model.quantization=nf4", "train.optimizer=adamw_torch"],
        "fsdp2",
    ),
    "fsdp-qdora": (
        [
            "parallel.strategy=fsdp-qlora",
            "model.quantization=nf4",
            "train.optimizer=adamw_torch",
            "peft.method=dora",
        ],
        "fsdp2",
    ),
    "fsdp1": (["parallel.strategy=fsdp", "parallel.fsdp_version=1"], "fsdp1"),
    "fsdp2-ckpt": (["parallel.strategy=fsdp", "train.gradient_checkpointing=true"], "fsdp2"),
    "zero3-qlora": (["parallel.strategy=deepspeed-zero3", "model.quantization=nf4"], "deepspeed-zero3"),
    "zero3-offload": (
        ["parallel.strategy=deepspeed-zero3", "parallel.offload=optimizer", "train.optimizer=adamw_torch"],
        "deepspeed-zero3",
    ),
    "fp16-qlora": (["model.quantization=nf4", "train.precision=fp16"], "none"),
    # full and partial fine-tuning: fp32 master weights, bf16 compute, sharded, peak memory recorded
    "full-fsdp2": (["parallel.strategy=fsdp", "peft.method=full", "train.lr=1e-4"], "fsdp2"),
    "full-zero3": (
        ["parallel.strategy=deepspeed-zero3", "peft.method=full", "train.lr=1e-4"],
        "deepspeed-zero3",
    ),
    "freeze-fsdp2": (
        ["parallel.strategy=fsdp", "peft.method=freeze", "peft.trainable_layers=1", "train.lr=1e-4"],
        "fsdp2",
    ),
    "freeze-zero3": (
        [
            "parallel.strategy=deepspeed-zero3",
            "peft.method=freeze",
            "peft.trainable_layers=1",
            "train.lr=1e-4",
        ],
        "deepspeed-zero3",
    ),
}


@pytest.mark.parametrize("name", list(SMOKE_RUNS))
def test_smoke_run_on_one_gpu(tmp_path: Path, name: str) -> None:
    """`tunefleet launch --gpus 1` of each path that would otherwise meet a GPU first in a user's
    run: it trains 4 steps, checkpoints, the sharding check passes (FSDP1's flat parameters, the
    4-bit base sharded under FSDP-QLoRA), every trainable parameter is fp32, peak memory recorded."""
    overrides, kind = SMOKE_RUNS[name]
    out = tmp_path / name
    cmd = [sys.executable, "-m", "tunefleet.launch.cli", "launch", str(DEMO), "--gpus", "1"]
    for o in [f"output_dir={out}", *SMOKE_COMMON, *overrides]:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    values = losses(out)
    assert len(values) == 4 and all(v == v for v in values)
    effect = json.loads((out / "plan.json").read_text())["in_effect"]
    assert effect["device"].startswith("cuda") and effect["sharding"]["kind"] == kind
    if kind in ("fsdp1", "fsdp2"):
        assert effect["sharding"]["sharded_params"] == effect["sharding"]["params"]
    if name == "zero3-offload":
        assert effect["sharding"]["offload_optimizer"] is True
    if "model.quantization=nf4" in overrides:
        assert effect["trainable_dtypes"] == ["float32"]
    assert effect["mixed_precision"] == ("fp16" if name == "fp16-qlora" else "bf16")
    assert effect["gpu_peak_gib"] > 0 and effect["gpu_peak_after_load_gib"] > 0
    assert effect["peak_memory_gib_per_rank"][0] > 0
    if "peft.method=full" in overrides or "peft.method=freeze" in overrides:
        assert effect["model_dtype"] == "float32"  # fp32 master weights, bf16 compute
        assert effect["trainable_dtypes"] == ["float32"]
        assert (out / "final" / "model.safetensors.index.json").exists()
        assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    else:
        assert (out / "final" / "adapter_model.safetensors").exists()
