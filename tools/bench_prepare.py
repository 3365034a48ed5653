"""Data preparation, side by side: `tunefleet prepare` (the new path, and today's per-row path)
against TRL 1.16's own dataset preparation of the same rows.

    .venv/bin/python tools/bench_prepare.py                 # 100,000 alpaca + 100,000 chat rows
    .venv/bin/python tools/bench_prepare.py --rows 20000 --max-length 512 --workdir /tmp/bench

It builds the rows locally (words of the bundled corpus, long-tailed lengths: most rows short,
some far beyond data.max_length; chat rows of 1 to 8 exchanges) for the demo tokenizer
`tunefleet:tiny-llama` (it has a chat template), then runs each contender in a fresh process
and measures the preparation (from the JSON Lines file to tokenised rows on disk, the tokenizer
already loaded) and the peak resident memory of that process and all its children:

* `tunefleet (N procs)`: `tunefleet prepare`'s code (`prepare.make_cache`), data.num_proc unset
  (N = one per core); `tunefleet (1 proc)`: data.num_proc=1.
* `tunefleet today`: the per-row path before this change (the reference `build_dataset`, then
  `Dataset.from_list` and `save_to_disk`, as `prepare.py` did).
* `TRL`: `load_dataset("json")` and `SFTTrainer._prepare_dataset` as a user of plain TRL gives
  it the rows: alpaca as `prompt`/`completion` (and as one seed-000 `text` field), chat as
  `messages`; `dataset_num_proc` unset (TRL's default) and = N.

Not the same work everywhere: tunefleet trains chat rows on the answers only (their spans are
found), TRL here on every token (the demo template has no {% generation %} markers, which TRL's
answer-only loss needs). Ratios are against TRL's default on the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "recipes" / "data" / "corpus.txt"
DEMO = REPO / "recipes" / "demo.yaml"


# ----------------------------------------------------------------------------- the rows


def _words() -> list[str]:
    return CORPUS.read_text(encoding="utf-8").split()


def _text(rng: random.Random, words: list[str], median_words: float) -> str:
    """Long-tailed: lognormal word counts (a few rows 20x the median)."""
    n = max(1, min(4000, int(rng.lognormvariate(0, 1.0) * median_words)))
    return " ".join(rng.choices(words, k=n))


def make_rows(workdir: Path, rows: int, seed: int = 0) -> dict[str, Path]:
    words = _words()
    paths = {"alpaca": workdir / f"alpaca-{rows}.jsonl", "chat": workdir / f"chat-{rows}.jsonl"}
    if not paths["alpaca"].exists():
        rng = random.Random(seed)
        with paths["alpaca"].open("w", encoding="utf-8") as f:
            for _ in range(rows):
                row = {
                    "instruction": _text(rng, words, 12),
                    "input": _text(rng, words, 30) if rng.random() < 0.4 else "",
                    "output": _text(rng, words, 60),
                }
                f.write(json.dumps(row) + "\n")
    if not paths["chat"].exists():
        rng = random.Random(seed + 1)
        with paths["chat"].open("w", encoding="utf-8") as f:
            for _ in range(rows):
                turns = [{"role": "system", "content": _text(rng, words, 8)}] if rng.random() < 0.3 else []
                for _ in range(min(8, 1 + int(rng.expovariate(0.6)))):
                    turns.append({"role": "user", "content": _text(rng, words, 15)})
                    turns.append({"role": "assistant", "content": _text(rng, words, 35)})
                f.write(json.dumps({"messages": turns}) + "\n")
    return paths


# ----------------------------------------------------------------------------- the contenders (child side)


def _cpu_s() -> float:
    """CPU seconds of this process (all its threads) and of its children that have ended."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _tokenizer():
    from transformers import AutoTokenizer

    from tunefleet.distributed.demo_model import ensure_tiny_llama

    return AutoTokenizer.from_pretrained(ensure_tiny_llama())


def _recipe(args: argparse.Namespace, num_proc: int | None):
    from tunefleet.launch.core import recipe as R

    sets = [
        f"output_dir={args.out}",
        f"data.path={args.data}",
        f"data.format={'alpaca' if args.kind == 'alpaca' else 'messages'}",
        f"data.max_length={args.max_length}",
    ]
    if num_proc is not None:
        sets.append(f"data.num_proc={num_proc}")
    return R.load(DEMO, sets)


def run_tunefleet(args: argparse.Namespace, num_proc: int | None) -> dict:
    from tunefleet.distributed import prepare as prep

    recipe, tok = _recipe(args, num_proc), _tokenizer()
    started, cpu = time.monotonic(), _cpu_s()
    made = prep.make_cache(recipe, tok, show=False)
    return {
        "seconds": time.monotonic() - started,
        "cpu_s": _cpu_s() - cpu,
        "examples": len(made.train),
        "procs": made.built["procs"] if made.built else 0,
        "reference_rows": made.train_stats["reference_rows"],
    }


def run_today(args: argparse.Namespace) -> dict:
    """prepare.py before this change: fingerprint, rows as dicts, one row at a time, from_list."""
    from datasets import Dataset

    from tunefleet.distributed import data as data_mod
    from tunefleet.distributed import prepare as prep

    recipe, tok = _recipe(args, None), _tokenizer()
    started, cpu = time.monotonic(), _cpu_s()
    prep.fingerprint(recipe, tok)
    rows = data_mod.load_rows(recipe.data.path)
    examples, _ = data_mod.build_dataset(rows, cfg=recipe.data, tokenizer=tok, where=recipe.data.path)
    Dataset.from_list(examples).save_to_disk(str(Path(args.out) / "today"))
    return {
        "seconds": time.monotonic() - started,
        "cpu_s": _cpu_s() - cpu,
        "examples": len(examples),
        "procs": 1,
    }


def run_trl(args: argparse.Namespace, num_proc: int | None, field: str) -> dict:
    from datasets import Dataset, load_dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tunefleet.distributed.data import alpaca_prompt
    from tunefleet.distributed.demo_model import ensure_tiny_llama

    tok = _tokenizer()
    tok.pad_token = tok.eos_token
    config = SFTConfig(
        output_dir=str(Path(args.out) / "trl"),
        max_length=args.max_length,
        dataset_num_proc=num_proc,
        use_cpu=True,
        report_to="none",
        bf16=False,
    )
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_llama())
    tiny = Dataset.from_list([{"text": "warm up"}])
    trainer = SFTTrainer(model=model, args=config, train_dataset=tiny, processing_class=tok)
    started, cpu = time.monotonic(), _cpu_s()
    dataset = load_dataset("json", data_files=str(args.data), split="train")
    if field == "prompt-completion":
        dataset = dataset.map(
            lambda r: {"prompt": alpaca_prompt(r["instruction"], r["input"]), "completion": r["output"]},
            remove_columns=["instruction", "input", "output"],
            num_proc=num_proc,
        )
    elif field == "text":
        dataset = dataset.map(
            lambda r: {"text": alpaca_prompt(r["instruction"], r["input"]) + r["output"]},
            remove_columns=["instruction", "input", "output"],
            num_proc=num_proc,
        )
    prepared = trainer._prepare_dataset(dataset, tok, config, False, None, "train")
    return {
        "seconds": time.monotonic() - started,
        "cpu_s": _cpu_s() - cpu,
        "examples": len(prepared),
        "procs": num_proc or 1,
    }


def child(args: argparse.Namespace) -> None:
    name = args.contender
    if name == "tunefleet":
        result = run_tunefleet(args, None)
    elif name == "tunefleet-1":
        result = run_tunefleet(args, 1)
    elif name == "today":
        result = run_today(args)
    elif name.startswith("trl"):
        _, field, procs = name.split(":")
        result = run_trl(args, int(procs) or None, field)
    else:
        raise SystemExit(f"unknown contender {name}")
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- measuring (parent side)


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(cmd: list[str], env: dict[str, str]) -> tuple[dict, int]:
    """Run a contender; its result and the peak RSS of its process tree (sampled twice a second:
    reading every process's memory costs CPU the contender would otherwise have)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), peak


def _run_one(args: argparse.Namespace, workdir: Path, kind: str, name: str, data: Path) -> tuple[dict, int]:
    out = workdir / f"out-{kind}-{name.replace(':', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_DATASETS_CACHE": str(out / "hf-datasets"), "HF_HUB_OFFLINE": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)
    cmd = [sys.executable, __file__, "--contender", name, "--kind", kind, "--data", str(data)]
    cmd += ["--out", str(out), "--max-length", str(args.max_length)]
    try:
        return measure(cmd, env)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _print_table(table: list[tuple[str, str, dict, int]], rows: int) -> None:
    """Wall-clock rows/s, CPU seconds (all processes) and peak memory, each also as a ratio to
    TRL's default on the same rows."""
    trl = {kind: (result, peak) for kind, label, result, peak in table if label == "TRL"}
    print()
    print("| rows | contender | rows/s | vs TRL | CPU-s | vs TRL | peak RSS (GiB) | vs TRL |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, label, result, peak in table:
        base, base_peak = trl.get(kind, (result, peak))
        print(
            f"| {kind} | {label} | {rows / result['seconds']:,.0f} | "
            f"{base['seconds'] / result['seconds']:.2f}x | {result['cpu_s']:,.0f} | "
            f"{base['cpu_s'] / result['cpu_s']:.2f}x less | {peak / 2**30:.2f} | {peak / base_peak:.2f}x |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="rows of each kind (default 100,000)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--workdir", default=None, help="where the rows and outputs go (default: a temporary dir)")
    p.add_argument("--kinds", default="alpaca,chat")
    p.add_argument("--skip", default="", help="contenders to leave out, comma-separated (e.g. today)")
    p.add_argument(
        "--repeat", type=int, default=1, help="runs of each contender, round-robin; the fastest is kept"
    )
    p.add_argument("--contender", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.contender:
        child(args)
        return

    from tunefleet.distributed.data.parallel import available_cpus, default_procs

    workdir = Path(args.workdir or f"/tmp/tunefleet-bench-prepare-{os.getpid()}")
    workdir.mkdir(parents=True, exist_ok=True)
    paths = make_rows(workdir, args.rows)
    procs = default_procs(args.rows, None)
    print(
        f"{args.rows:,} rows of each kind, data.max_length={args.max_length}, {available_cpus()} CPUs, N={procs}"
    )
    skip = set(filter(None, args.skip.split(",")))
    table = []
    for kind in args.kinds.split(","):
        field = "prompt-completion" if kind == "alpaca" else "messages"
        contenders = [("TRL", f"trl:{field}:0")]
        if procs > 1:
            contenders.append((f"TRL, dataset_num_proc={procs}", f"trl:{field}:{procs}"))
        if kind == "alpaca":
            contenders.append(("TRL, seed-000 `text` field", "trl:text:0"))
        contenders += [
            ("tunefleet today (per row)", "today"),
            ("tunefleet, 1 process", "tunefleet-1"),
            (f"tunefleet, {procs} process{'es' if procs > 1 else ''} (default)", "tunefleet"),
        ]
        contenders = [(label, name) for label, name in contenders if not {name, name.split(":")[0]} & skip]
        best: dict[str, tuple[dict, int]] = {}
        for _ in range(args.repeat):  # round-robin: a busy spell of the machine hits every contender
            for label, name in contenders:
                result, peak = _run_one(args, workdir, kind, name, paths[kind])
                kept = best.get(name)
                if kept is None or result["seconds"] < kept[0]["seconds"]:
                    best[name] = (result, peak if kept is None else max(peak, kept[1]))
                print(
                    f"  {kind:6s} {label:38s} {result['seconds']:8.1f} s {args.rows / result['seconds']:9,.0f} "
                    f"rows/s  {result['cpu_s']:8.1f} CPU-s  peak {peak / 2**30:5.2f} GiB  examples "
                    f"{result['examples']:,}  (load average {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
        table += [(kind, label, *best[name]) for label, name in contenders]
    _print_table(table, args.rows)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
