"""Peak memory per rank of full fine-tuning, side by side: ddp, fsdp (FSDP2), deepspeed-zero3 (with
DeepSpeed's default windows, and with them lowered to about one layer: `zero3-window`) and ZeRO-3
with CPU offload, on 2 processes; and `tunefleet plan`'s estimate of each beside it.

    .venv/bin/python tools/bench_memory.py                        # full: ~10 min on 2 cores
    .venv/bin/python tools/bench_memory.py --methods full freeze lora --only ddp fsdp deepspeed-zero3
    .venv/bin/python tools/bench_memory.py --layers 4             # a quick look (a smaller model)

The model is built locally (random init, the demo tokenizer): a Llama of 8 layers, 1024 wide,
~107 M parameters, so that model state (fp32 weights, gradients and AdamW's two moments: 16 bytes
per parameter, 1.7 GB) dominates what a process holds. Each strategy trains it in full for a few
steps on 2 gloo processes (`tunefleet launch --nproc 2`, fp32, micro batch 2, 128 tokens), one
strategy after another; each rank records its peak (`in_effect.peak_memory_gib_per_rank` in
plan.json: on CPU the process's peak resident memory, which includes Python and the libraries, a
few hundred MiB that every strategy pays alike). Each run is made twice: as a user's run is, and with
glibc's mmap threshold fixed (`LIVE_ENV`), where the peak follows the live tensors. Printed: the peak
of the fullest rank, its ratio to ddp's, the live peak, `tunefleet plan`'s estimate against both, and
the losses (the strategies train the same steps).

On CPU, "offload" moves nothing off the device (host memory is the device memory): the ZeRO-3
offload row shows what the offloaded layout itself costs, not what a GPU would save.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo.yaml"
STRATEGIES = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp": ["parallel.strategy=fsdp"],
    "deepspeed-zero3": ["parallel.strategy=deepspeed-zero3"],
    # DeepSpeed's windows lowered to about one layer of this model (12.6 M parameters): what a user short
    # of memory sets (docs/launch.md); the row above keeps DeepSpeed's defaults (1e9)
    "zero3-window": [
        "parallel.strategy=deepspeed-zero3",
        "parallel.zero3_gathered_params=1e7",
        "parallel.zero3_sub_group_size=1e7",
    ],
    "zero3-offload": ["parallel.strategy=deepspeed-zero3", "parallel.offload=optimizer+params"],
}


def build_model(out: Path, *, layers: int, hidden: int, intermediate: int) -> tuple[Path, int]:
    """The benchmark's Llama with the demo tokenizer, saved like any checkpoint; and its size."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunefleet.distributed.demo_model import ensure_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_llama())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
    with torch.device("meta"):
        size = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return out, size


METHODS = {
    "full": ["peft.method=full"],
    "freeze": ["peft.method=freeze", "peft.trainable_layers=2"],
    "lora": ["peft.method=lora", "peft.r=16", "peft.alpha=32", "peft.dropout=0"],
}


def overrides(
    work: Path, model: Path, name: str, steps: int, method: str = "full", precision: str = "fp32"
) -> list[str]:
    return [
        f"output_dir={work / f'{method}-{name}'}",
        f"model.name_or_path={model}",
        *METHODS[method],
        "train.lr=1e-5",
        f"train.precision={precision}",
        f"train.max_steps={steps}",
        "train.logging_steps=1",
        "train.save_steps=0",
        "train.warmup_ratio=0",
        "data.max_length=128",
        "data.limit=64",
        "batch.micro_batch_size=2",
        "batch.global_batch_size=8",
        "batch.group_by_length=false",
        *STRATEGIES[name],
    ]


def estimate_gib(out: Path) -> float:
    """`tunefleet plan`'s estimate of the fullest process of this CPU run (`memory.estimate_cpu_process`),
    from the run's resolved recipe, with the mapping every plan uses (`plan.memory_inputs`)."""
    from tunefleet.launch.core import recipe as R
    from tunefleet.launch.memory import GIB, estimate_cpu_process
    from tunefleet.launch.params import read_model_config
    from tunefleet.launch.plan import memory_inputs, model_counts
    from tunefleet.launch.preflight import batch_plan

    recipe = R.load(out / "recipe.yaml")
    config = read_model_config(Path(recipe.model.name_or_path) / "config.json")
    bp = batch_plan(recipe, world_size=2, procs_per_node=2)
    inputs = memory_inputs(recipe, bp, config, model_counts(recipe, config), procs_per_node=2, use_cpu=True)
    return estimate_cpu_process(inputs).total_bytes / GIB


LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""glibc raises its mmap threshold after a large block is freed (up to 32 MiB), and the blocks it then
serves from its heaps stay in the process when freed: resident memory climbs above what is live. With
the threshold fixed, every block of 128 KiB or more is mapped and unmapped, and the peak resident
memory follows the live tensors, which is what the estimate counts (a GPU's allocator reports its
live bytes apart from what it caches)."""


def measure(
    work: Path,
    model: Path,
    name: str,
    steps: int,
    method: str = "full",
    *,
    live: bool = False,
    precision: str = "fp32",
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tunefleet.launch.cli", "launch", str(DEMO), "--nproc", "2", "--overwrite"]
    for o in overrides(work, model, name, steps, method, precision):
        cmd += ["--set", o]
    log = work / f"{method}-{name}{'-live' if live else ''}.log"
    started = time.monotonic()
    env = {**os.environ, **(LIVE_ENV if live else {})}
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log}")
    out = work / f"{method}-{name}"
    effect = json.loads((out / "plan.json").read_text())["in_effect"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "name": name,
        "method": method,
        "estimate_gib": round(estimate_gib(out), 3),
        "peak_gib_per_rank": effect["peak_memory_gib_per_rank"],
        "optimizer_state_elements_per_rank": effect.get("optimizer_state_elements_per_rank"),
        "losses": [r["loss"] for r in rows if "loss" in r],
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--work", default="runs/bench-memory")
    p.add_argument("--only", nargs="*", default=list(STRATEGIES))
    p.add_argument("--methods", nargs="*", default=["full"], choices=list(METHODS))
    p.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16"], help="train.precision of every run"
    )
    args = p.parse_args()
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    model, size = build_model(
        work / f"model-{args.layers}x{args.hidden}",
        layers=args.layers,
        hidden=args.hidden,
        intermediate=args.intermediate,
    )
    print(
        f"full fine-tuning of a {size / 1e6:.0f} M-parameter Llama ({args.layers} layers x {args.hidden}), "
        f"2 processes, fp32, {args.steps} steps; model state 16 bytes x {size / 1e6:.0f} M = "
        f"{16 * size / 1024**3:.2f} GiB",
        flush=True,
    )
    results = []
    for method in args.methods:
        for name in args.only:
            r = measure(work, model, name, args.steps, method, precision=args.precision)
            live = measure(work, model, name, args.steps, method, live=True, precision=args.precision)
            r["live_peak_gib_per_rank"] = live["peak_gib_per_rank"]
            results.append(r)
            print(
                f"  {method} {name}: peak per rank {r['peak_gib_per_rank']} GiB (live {r['live_peak_gib_per_rank']}), "
                f"estimate {r['estimate_gib']:.2f} GiB ({r['wall_s']} s)",
                flush=True,
            )
    print(
        "\n| method | strategy | peak per rank, GiB (fullest rank) | vs ddp | peak with glibc's mmap threshold fixed "
        "(live memory) | estimate, GiB | estimate vs live peak | estimate vs peak |"
        " optimizer state elements per rank |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        base = next((b for b in results if b["method"] == r["method"] and b["name"] == "ddp"), r)
        peak, live = max(r["peak_gib_per_rank"]), max(r["live_peak_gib_per_rank"])
        state = r["optimizer_state_elements_per_rank"]
        print(
            f"| {r['method']} | {r['name']} | {peak:.2f} ({', '.join(f'{x:.2f}' for x in r['peak_gib_per_rank'])}) | "
            f"{peak / max(base['peak_gib_per_rank']):.2f}x | {live:.2f} | {r['estimate_gib']:.2f} | "
            f"{100 * (r['estimate_gib'] - live) / live:+.0f}% | {100 * (r['estimate_gib'] - peak) / peak:+.0f}% | "
            f"{', '.join(f'{x:,}' for x in state or [])} |"
        )
    for method in args.methods:
        ours = [r for r in results if r["method"] == method]
        diff = max(abs(a - b) for r in ours for a, b in zip(ours[0]["losses"], r["losses"], strict=True))
        print(f"{method}: the strategies train the same steps, max |loss difference| per step = {diff:.2e}")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
