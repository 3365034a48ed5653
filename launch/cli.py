"""The `tunefleet` command: one subcommand per module, imported only when it runs (no torch here)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from tunefleet.launch.core.args import StartOptions, add_overrides, add_run_arguments
from tunefleet.launch.core.errors import TunefleetError, from_os_error
from tunefleet.launch.core.noise import quiet_libraries


def _train(args: argparse.Namespace) -> int:
    from tunefleet.distributed import sft
    from tunefleet.launch.core import recipe as recipe_mod

    recipe = recipe_mod.load(args.recipe, args.overrides)
    return sft.run(recipe, options=StartOptions.from_args(args))


def _launch(args: argparse.Namespace) -> int:
    from tunefleet.launch import workstation as ws

    visible_gpus = 0
    if args.nproc is None and (args.gpus is None or not args.dry_run):
        import torch  # only to count the GPUs

        visible_gpus = torch.cuda.device_count()
    if args.nnodes > 1 and args.main_port == 0:
        raise TunefleetError(
            f"--main-port 0 with --nnodes {args.nnodes}: each machine would pick its own random port and they "
            "would never meet",
            "pass the same free port on every machine, e.g. --main-port 29500",
        )
    if args.nnodes > 1 and args.main_port is None:
        raise TunefleetError(
            f"--nnodes {args.nnodes} needs --main-port (a port free on node 0, the same on every machine)",
            "pass e.g. --main-port 29500 on every machine",
        )
    hw = ws.hardware(
        nproc=args.nproc,
        gpus=args.gpus,
        visible_gpus=visible_gpus,
        main_port=args.main_port or ws.free_port(),
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        main_address=args.main_address,
    )
    if args.gpus is not None and not args.dry_run and visible_gpus < args.gpus:
        raise TunefleetError(
            f"--gpus {args.gpus}: {visible_gpus} GPU(s) visible here",
            "use --nproc N for CPU processes, or --dry-run to only render the files",
        )
    plan = ws.prepare_launch(args.recipe, args.overrides, hw, options=StartOptions.from_args(args))
    if args.dry_run:
        print(ws.summary(plan, dry_run=True), flush=True)
        for name, text in plan.files.items():
            print(f"\n--- {plan.config_dir / name}\n{text.rstrip()}")
        return 0
    if hw.machine_rank != 0:  # node 0's launcher holds the output directory for the whole launch
        ws.start_nodes(plan, join_timeout_s=args.join_timeout)
        print(ws.summary(plan), flush=True)
        return ws.run_launch(plan)
    from tunefleet.launch.core.lock import holding

    with holding(plan.recipe.output_dir, "tunefleet launch " + " ".join(sys.argv[2:])[:200]) as lock:
        if hw.num_machines > 1:
            ws.start_nodes(plan, join_timeout_s=args.join_timeout, lock=lock)
        else:
            ws.write_launch_files(plan, lock)
        print(ws.summary(plan), flush=True)
        return ws.run_launch(plan, lock)


def _plan(args: argparse.Namespace) -> int:
    import json

    from tunefleet.launch.plan import render_plan
    from tunefleet.launch.plan_inputs import make_plan

    plan = make_plan(
        args.recipe,
        args.overrides,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        model_config_path=args.model_config,
        gpu_memory_gib=args.gpu_memory_gib,
        host_memory_gib=args.host_memory_gib,
        compare=args.compare,
    )
    if args.json:
        print(json.dumps(plan, indent=2))
    elif args.compare:
        from tunefleet.launch.compare import render

        print(render(plan["compare"]), end="")
    else:
        print(render_plan(plan))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from tunefleet.distributed.merge import merge

    result = merge(
        args.run,
        args.out,
        dtype=args.dtype,
        max_shard_size=_shard_size(args.max_shard_size),
        check=not args.no_check,
    )
    for note in result.notes:
        print(f"note: {note}")
    if result.max_logit_diff is not None:
        print(
            f"check: merged vs base+adapter on a probe prompt, max |logit difference| = "
            f"{result.max_logit_diff:.3g} ({result.dtype})"
        )
    print(
        f"merged {result.adapter_dir} into its base: {result.out_dir} ({result.dtype}); load it with "
        f"AutoModelForCausalLM.from_pretrained({str(result.out_dir)!r})"
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from tunefleet.distributed import generate as gen

    items: list = list(args.prompts)
    if args.prompts_file:
        items += gen.read_prompts_file(args.prompts_file)
    if not items:
        raise TunefleetError("no prompts given", "pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.temperature < 0:
        raise TunefleetError(
            "--batch-size and --max-new-tokens must be >= 1, --temperature >= 0",
            "e.g. --batch-size 8 --max-new-tokens 256 --temperature 0",
        )
    adapter, results = gen.generate_for_run(
        args.run,
        items,
        compare_base=args.compare_base,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
    )
    if adapter.note:
        print(f"note: {adapter.note}", file=sys.stderr)
    gen.print_results(adapter, results, as_jsonl=args.jsonl)
    return 0


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a recipe in this process (one CPU or GPU)",
        description="Train a recipe in this process. Multi-GPU: see `tunefleet launch`.",
    )
    p.add_argument("recipe", help="recipe YAML file (e.g. recipes/demo.yaml)")
    add_run_arguments(p)
    p.set_defaults(func=_train)


def _add_launch(sub: Any) -> None:
    p = sub.add_parser(
        "launch",
        help="train a recipe on N CPU processes or GPUs of this machine, or of each of several (accelerate launch)",
        description="Resolve the recipe for the hardware (compatibility matrix), write the accelerate "
        "and DeepSpeed configs, the resolved recipe and the exact command into "
        "<output_dir>/launch/ (launch/node-R/ with --nnodes), print them, then run `accelerate "
        "launch`. With --nnodes N, run it on each machine: they meet on node 0's port first. "
        "Exits with the run's code (75: checkpointed, requeue; 2: refused).",
    )
    p.add_argument("recipe", help="recipe YAML file")
    add_run_arguments(p)
    procs = p.add_mutually_exclusive_group()
    procs.add_argument("--nproc", type=int, default=None, metavar="N", help="N CPU processes (gloo)")
    procs.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="N GPU processes (default: every visible GPU; 1 CPU process without GPUs)",
    )
    p.add_argument(
        "--main-port",
        type=int,
        default=None,
        metavar="PORT",
        help="rendezvous port on node 0 (default on one machine: a free port; required with --nnodes)",
    )
    nodes = p.add_argument_group("several machines (run the same command on each, with its own --node-rank)")
    nodes.add_argument("--nnodes", type=int, default=1, metavar="N", help="number of machines (default 1)")
    nodes.add_argument(
        "--node-rank",
        type=int,
        default=0,
        metavar="R",
        help="this machine's rank, 0..N-1 (0 hosts the rendezvous)",
    )
    nodes.add_argument(
        "--main-address", default=None, metavar="HOST", help="address of node 0, reachable from every machine"
    )
    nodes.add_argument(
        "--join-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long the machines wait for each other before giving up with the missing ones named (default 300)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the configs and the command; write and run nothing"
    )
    p.set_defaults(func=_launch)


def _add_plan(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="explain the batch math, schedule, parameters and memory of a recipe",
        description="Print world size, accumulation, steps, warm-up, LR points, trainable/total "
        "parameters (model built on the meta device: nothing downloaded), a memory "
        "estimate per GPU and the launch command. Loads no weights.",
    )
    p.add_argument("recipe", help="recipe YAML file")
    add_overrides(p)
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="processes (GPUs) per node (default 1)")
    p.add_argument(
        "--model-config",
        default=None,
        metavar="CONFIG_JSON",
        help="the model's config.json, when the model is not available locally",
    )
    p.add_argument(
        "--gpu-memory",
        "--gpu-memory-gib",
        dest="gpu_memory_gib",
        type=float,
        default=None,
        metavar="GIB",
        help="memory of one GPU in GiB, as nvidia-smi shows it (an 80 GB H100: 80); default: this "
        "machine's GPUs, if it has some. Says whether the recipe (or each --compare row) fits",
    )
    p.add_argument(
        "--host-memory",
        dest="host_memory_gib",
        type=float,
        default=None,
        metavar="GIB",
        help="RAM of one node in GiB: loading and CPU offload live there (default: this machine's, when it "
        "has GPUs; unknown otherwise, and then no row with offload is said to fit)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="lay every method (full, freeze, LoRA, QLoRA) x strategy the compatibility matrix allows side "
        "by side: peak memory per GPU, host RAM per node, whether it fits, the --set line; recommend one",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_plan)


def _add_merge(sub: Any) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a run's adapter into its base model and save one model",
        description="Merge the LoRA/DoRA adapter of a run (its final/ adapter, else its newest "
        "complete checkpoint), a final/ directory or a checkpoint-N directory into the "
        "base model; save safetensors (sharded) + tokenizer. QLoRA runs merge into the "
        "unquantized base at the recipe's dtype.",
    )
    p.add_argument(
        "run", metavar="RUN_OR_CHECKPOINT", help="run output_dir, its final/ or a checkpoint-N directory"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="new directory for the merged model")
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default=None,
        help="dtype of the merged weights (default: model.dtype of the recipe, else its precision)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file: a number with KB, MB, GB or TB (default 5GB)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip comparing merged and base+adapter logits on a probe prompt",
    )
    p.set_defaults(func=_merge)


def _shard_size(text: str) -> str:
    """transformers' size strings: a positive number with KB/MB/GB/TB (what save_pretrained takes)."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise TunefleetError(f"--max-shard-size {text!r} is not a size", "use e.g. 5GB, 500MB or 2TB")
    return f"{match.group(1)}{match.group(2).upper()}"


def _add_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="answer prompts with a run's adapter (and the base model)",
        description="Render prompts in the run's own format (alpaca template or chat template "
        "with the generation prompt), decode greedily, stop at the end-of-turn token.",
    )
    p.add_argument(
        "run", metavar="RUN_OR_CHECKPOINT", help="run output_dir, its final/ or a checkpoint-N directory"
    )
    p.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        default=[],
        metavar="TEXT",
        help="a prompt: the instruction (alpaca), the user message (chat) or the prompt (repeatable)",
    )
    p.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="one prompt per line, or a .jsonl/.json/.parquet file of rows in the run's data format",
    )
    p.add_argument(
        "--compare-base", action="store_true", help="also answer with the base model (adapter off)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    p.add_argument("--jsonl", action="store_true", help="print one JSON object per prompt instead of a table")
    p.set_defaults(func=_generate)


class _VersionAction(argparse.Action):
    """`--version`: tunefleet's version and those of the libraries it runs on (read only when asked)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from tunefleet.launch.core.versions import report

        print(report())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunefleet",
        description="Distributed LLM fine-tuning from one recipe: LoRA/QLoRA SFT on a workstation or a SLURM cluster.",
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the versions of tunefleet, Python, torch and the libraries a run depends on, then exit",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_launch(sub)
    _add_plan(sub)
    _add_merge(sub)
    _add_generate(sub)
    from tunefleet.slurm import cli as slurm_cli  # prepare, slurm, status

    slurm_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except TunefleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the machine said no: disk full, read-only, no permission, ...
        machine = from_os_error(exc, f"tunefleet {args.command}" if getattr(args, "command", None) else None)
        print(f"error: {machine}", file=sys.stderr)
        return machine.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
