"""The `tunefleet` command: one subcommand per module, imported only when it runs (no torch here)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from tunefleet.launch.errors import TunefleetError


def _train(args: argparse.Namespace) -> int:
    from tunefleet.distributed import sft
    from tunefleet.launch import recipe as recipe_mod

    recipe = recipe_mod.load(args.recipe, args.overrides)
    return sft.run(recipe, overwrite=args.overwrite, no_resume=args.no_resume)


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.max_steps=100 (repeatable)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `tunefleet train` and `python -m tunefleet.distributed.sft`."""
    add_overrides(p)
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an output_dir that holds a run (the old one is moved aside, not deleted)")
    p.add_argument("--no-resume", action="store_true",
                   help="refuse to continue an unfinished run found in output_dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunefleet",
        description="Distributed LLM fine-tuning from one recipe: LoRA/QLoRA SFT on a workstation or a SLURM cluster.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a recipe in this process (one CPU or GPU)",
                       description="Train a recipe in this process. Multi-GPU: see `tunefleet launch`.")
    p.add_argument("recipe", help="recipe YAML file (e.g. recipes/demo.yaml)")
    add_run_arguments(p)
    p.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except TunefleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
