"""Compare tunefleet's per-GPU memory estimate with published measurements (README table).

    .venv/bin/python tools/memory_compare.py

Each case is a recipe built in code from the published setup, planned with the stored
config.json fixtures (no download); the published figure is what its authors reported.
"""

from __future__ import annotations

from pathlib import Path

from tunefleet.launch.core import recipe as R
from tunefleet.launch.params import read_model_config
from tunefleet.launch.plan import build_plan

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "model_configs"

CASES = [
    {
        "name": "Answer.AI FSDP-QLoRA, Llama-2-70B, 2 GPUs, batch 2 x 512 tokens, ckpt, CPU offload",
        "config": "llama-2-70b",
        "published_gib": 14.92,
        "nodes": 1,
        "procs": 2,
        "overrides": [
            "model.quantization=nf4",
            "model.dtype=bfloat16",
            "parallel.strategy=fsdp-qlora",
            "parallel.offload=optimizer+params",
            "peft.r=64",
            "peft.alpha=16",
            "batch.micro_batch_size=2",
            "batch.global_batch_size=4",
            "data.max_length=512",
            "train.gradient_checkpointing=true",
            "train.precision=bf16",
        ],
    },
    {
        "name": "torchtune Llama-3-8B QLoRA single device, batch 2, r8 (q,v,o + MLP), ckpt",
        "config": "llama-varco-8b-instruct",  # Llama-3(.1)-8B shapes
        "published_gib": 7.4,
        "nodes": 1,
        "procs": 1,
        "overrides": [
            "model.quantization=nf4",
            "model.dtype=bfloat16",
            "peft.r=8",
            "peft.alpha=16",
            "peft.target_modules=[q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
            "batch.micro_batch_size=2",
            "batch.global_batch_size=2",
            "data.max_length=512",
            "train.gradient_checkpointing=true",
            "train.precision=bf16",
        ],
    },
    {
        "name": "Seed 004 table: 20B QLoRA 4-bit 14-16 GB (gpt-oss-20b, MXFP4 weights kept, r16, 1 x 1024, ckpt)",
        "config": "gpt-oss-20b",
        "published_gib": 15.0 * 1e9 / 2**30,
        "nodes": 1,
        "procs": 1,
        "overrides": [
            "model.quantization=mxfp4",
            "model.mxfp4_dequantize=false",
            "model.dtype=bfloat16",
            "peft.target_modules=[q_proj,k_proj,v_proj,o_proj]",
            "batch.micro_batch_size=1",
            "batch.global_batch_size=16",
            "data.max_length=1024",
            "train.gradient_checkpointing=true",
            "train.precision=bf16",
        ],
    },
]


def main() -> None:
    print("| setup | published | tunefleet estimate | off by |")
    print("|---|---|---|---|")
    for case in CASES:
        recipe = R.from_dict(
            {"output_dir": "/tmp/x", "model": {"name_or_path": case["config"]}, "data": {"path": "x.jsonl"}},
            case["overrides"],
        )
        plan = build_plan(
            recipe,
            nodes=case["nodes"],
            procs_per_node=case["procs"],
            dataset_rows=None,
            model_config=read_model_config(FIXTURES / case["config"] / "config.json"),
        )
        est = plan["memory"]["total_gib"]
        pub = case["published_gib"]
        print(f"| {case['name']} | {pub:.2f} GiB | {est:.2f} GiB | {100 * (est - pub) / pub:+.0f}% |")


if __name__ == "__main__":
    main()
