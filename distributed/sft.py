"""The shared SFT entrypoint: one module trains every recipe.

python -m tunefleet.distributed.sft --recipe FILE [--set key=value ...]
accelerate launch ... -m tunefleet.distributed.sft --recipe FILE
torchrun --nproc_per_node N -m tunefleet.distributed.sft --recipe FILE
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tunefleet.distributed.rundir import (
    FINAL_DIR,
    RESOLVED_RECIPE,
    check_resume,
    decide_start,
    inspect_output_dir,
    move_aside,
    truncate_metrics,
)
from tunefleet.launch import recipe as recipe_mod
from tunefleet.launch.cli import add_run_arguments
from tunefleet.launch.errors import TunefleetError
from tunefleet.launch.recipe import Recipe
from tunefleet.launch.workstation import EXIT_FILE_ENV
from tunefleet.slurm.sbatch import REQUEUE_EXIT_CODE

PLAN_FILE = "plan.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tunefleet.distributed.sft",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(p)
    p.add_argument("--recipe", required=True, help="recipe YAML file")
    return p


# ----------------------------------------------------------------------------- the run


def _rank_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def in_effect(trainer: Any, precision: Any) -> dict[str, Any]:
    """What the run really uses (not what was asked for): recorded in plan.json."""
    import torch

    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    return {
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
        "backend": torch.distributed.get_backend() if dist else None,
        "device": str(trainer.args.device),
        "mixed_precision": precision.mode,
        "model_dtype": str(precision.dtype).replace("torch.", ""),
    }


def run_plan(
    recipe: Recipe, *, model_path: str, world_size: int, train_examples: int, eval_rows: int
) -> dict[str, Any]:
    """The plan this run actually runs with (runtime world size, real example count).

    Built before the training arguments exist: once they do, a DeepSpeed ZeRO-3 config is active
    and building the model on the meta device (parameter counts) would go through zero.Init, a
    collective call that hangs when rank 0 makes it alone."""
    from tunefleet.launch.params import read_model_config
    from tunefleet.launch.plan import build_plan

    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    config_file = Path(model_path) / "config.json"
    return build_plan(
        recipe,
        nodes=max(1, world_size // local),
        procs_per_node=local,
        dataset_rows=train_examples + eval_rows,
        model_config=read_model_config(config_file) if config_file.exists() else None,
    )


def write_plan(
    path: Path, plan: dict[str, Any], *, train_examples: int, steps_per_epoch: int, in_effect: dict[str, Any]
) -> None:
    """plan.json: the run's plan and what is in effect."""
    import json

    plan = {**plan, "in_effect": in_effect}
    plan["in_effect"]["train_examples"] = train_examples
    plan["in_effect"]["steps_per_epoch"] = steps_per_epoch
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def training_arguments(recipe: Recipe, *, grad_accum_steps: int, precision: Any, has_eval: bool) -> Any:
    from trl import SFTConfig

    from tunefleet.launch.batch import SCHEDULER_KWARGS
    from tunefleet.launch.templates import activation_checkpointing

    t = recipe.train
    checkpointing = activation_checkpointing(recipe)
    save = t.save_steps > 0
    evaluate = has_eval and t.eval_steps > 0
    return SFTConfig(
        output_dir=recipe.output_dir,
        per_device_train_batch_size=recipe.batch.micro_batch_size,
        per_device_eval_batch_size=recipe.batch.micro_batch_size,
        gradient_accumulation_steps=grad_accum_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        lr_scheduler_kwargs=dict(SCHEDULER_KWARGS.get(t.lr_scheduler, {})),
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,  # 0 disables clipping (None crashes the training loop)
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision.mode == "bf16",
        fp16=precision.mode == "fp16",
        use_cpu=precision.use_cpu,
        # `fsdp`: accelerate checkpoints each FSDP unit itself, the trainer's switch stays off
        activation_checkpointing=checkpointing.where == "trainer",
        activation_checkpointing_kwargs=(
            {"use_reentrant": checkpointing.use_reentrant} if checkpointing.where == "trainer" else None
        ),
        logging_steps=t.logging_steps,
        save_strategy="steps" if save else "no",
        save_steps=t.save_steps if save else 500,
        save_total_limit=None,  # retention is tunefleet's (never before the new checkpoint is complete)
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps if evaluate else None,
        report_to=list(t.report_to) or "none",
        run_name=Path(recipe.output_dir).name,  # the trackers' display name (the run id: tracking.py)
        max_length=recipe.data.max_length,
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        include_num_input_tokens_seen="non_padding",
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        log_level="warning",
        save_only_model=False,
    )


def run(
    recipe: Recipe, *, overwrite: bool = False, no_resume: bool = False, resume: str | None = None
) -> int:
    """Train one recipe in this process (one rank of a launched job, or alone)."""
    rank, world_size = _rank_env()
    main_process = rank == 0
    out = Path(recipe.output_dir)
    started = time.monotonic()

    # decide on the output directory before anyone writes to it
    state = inspect_output_dir(out)
    mode, checkpoint = decide_start(out, state, overwrite=overwrite, no_resume=no_resume, resume=resume)

    from tunefleet.launch.batch import plan_batch

    batch_plan = plan_batch(
        micro_batch_size=recipe.batch.micro_batch_size,
        global_batch_size=recipe.batch.global_batch_size,
        max_length=recipe.data.max_length,
        world_size=world_size,
    )

    import torch  # (heavy imports start here)
    from transformers.utils import logging as hf_logging

    from tunefleet.distributed import checkpoint as ckpt
    from tunefleet.distributed import cpu_fsdp, guard
    from tunefleet.distributed import model as model_mod
    from tunefleet.distributed.reporting import (
        LOSS_PLOT,
        METRICS_FILE,
        MetricsCallback,
        ProgressCallback,
        plot_loss,
        print_table,
    )
    from tunefleet.distributed.trainer import StopFlag, TunefleetTrainer

    # the recipe as this run carries it out on this hardware (compat matrix, as the launcher did)
    recipe, hw, compat_notes = guard.resolve_for_runtime(
        recipe, world_size, use_cpu=not torch.cuda.is_available()
    )
    expected = guard.expectation(recipe, hw)
    resume_notes = check_resume(checkpoint, recipe) if checkpoint else []
    if checkpoint:
        ckpt.check_layout(ckpt.read_manifest(Path(checkpoint)), recipe.parallel.strategy, world_size)

    hf_logging.set_verbosity_error()
    stop = StopFlag()
    precision = model_mod.resolve_precision(recipe)
    model_path = model_mod.resolve_model_path(recipe.model)

    # data first: a bad data file should fail before a large model is loaded
    tokenizer = model_mod.load_tokenizer(model_path, recipe.model)
    d = recipe.data
    # the `tunefleet prepare` cache when it matches recipe, data and tokenizer; else tokenise here
    from tunefleet.distributed.prepare import load_or_tokenize

    prepared = load_or_tokenize(recipe, tokenizer)
    rows, eval_rows = prepared.rows, prepared.eval_rows
    train_examples, train_stats, eval_examples = prepared.train, prepared.train_stats, prepared.eval
    if main_process and prepared.cache_dir is not None:
        print(f"tokenised data from the cache {prepared.cache_dir} (tunefleet prepare)", flush=True)
    steps_per_epoch = len(train_examples) // batch_plan.global_batch_size
    if steps_per_epoch == 0:
        raise TunefleetError(
            f"the training data has {len(train_examples)} usable examples, fewer than one global batch "
            f"({batch_plan.global_batch_size})",
            "lower batch.global_batch_size or add data",
        )

    from tunefleet.distributed import tracking
    from tunefleet.distributed.evaluation import (
        SAMPLES_FILE,
        FinalEvalCallback,
        final_eval_loss,
        write_samples,
    )

    tracking.check_installed(list(recipe.train.report_to))
    plan = (
        run_plan(
            recipe,
            model_path=model_path,
            world_size=world_size,
            train_examples=len(train_examples),
            eval_rows=prepared.eval_row_count if d.eval_ratio else 0,
        )
        if main_process
        else {}
    )
    if cpu_fsdp.wanted(recipe.parallel.strategy, cuda_available=torch.cuda.is_available()):
        cpu_fsdp.enable()  # FSDP2 on CPU/gloo; accelerate alone would silently run DDP (see cpu_fsdp.py)
    args = training_arguments(
        recipe,
        grad_accum_steps=batch_plan.grad_accum_steps,
        precision=precision,
        has_eval=bool(eval_examples),
    )
    # the process group exists now (the trainer arguments initialise it): prepare the directory
    from accelerate import PartialState

    dist_state = PartialState()
    if dist_state.num_processes != world_size:
        raise TunefleetError(
            f"the launcher set WORLD_SIZE={world_size} but {dist_state.num_processes} process(es) joined",
            "launch with torchrun or `tunefleet launch`, which start and connect every process",
        )
    if main_process:
        if mode == "overwrite":
            moved = move_aside(out)
            print(f"moved the previous run aside: {moved}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        if mode == "fresh" and (out / METRICS_FILE).exists():
            # an earlier attempt that never checkpointed: keep its metrics, start a new file
            (out / METRICS_FILE).rename(out / f"{METRICS_FILE}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        (out / RESOLVED_RECIPE).write_text(
            f"# resolved recipe, written {time.strftime('%Y-%m-%d %H:%M:%S')}\n" + recipe_mod.dump(recipe),
            encoding="utf-8",
        )
        removed = ckpt.cleanup_incomplete(out)
        if removed:
            print(
                f"removed {len(removed)} incomplete checkpoint(s): {', '.join(p.name for p in removed)}",
                flush=True,
            )
        if mode == "resume":
            truncate_metrics(out / METRICS_FILE, checkpoint)
            m = ckpt.read_manifest(Path(checkpoint))  # type: ignore[arg-type]
            print(
                f"resuming from {checkpoint}: step {m['step']}, {m['samples_seen']:,} samples seen "
                f"(written by {m['world_size']} process(es), now {world_size})",
                flush=True,
            )
            for note in resume_notes:
                print(f"  changed since that checkpoint (harmless): {note}", flush=True)
    dist_state.wait_for_everyone()
    ckpt.check_shared_storage(out, rank=rank, world_size=world_size, barrier=dist_state.wait_for_everyone)

    model = model_mod.load_model(model_path, recipe, precision)
    # the adapter's random init (LoRA A) comes from train.seed, identical on every rank and every
    # world size (the Trainer seeds only after the model exists: unseeded, runs could never match)
    from transformers import set_seed

    set_seed(recipe.train.seed)
    model = model_mod.apply_peft(model, recipe)
    trainable, total = model.get_nb_trainable_parameters()

    train_ds, eval_ds = train_examples, eval_examples
    trainer = TunefleetTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        global_batch_size=batch_plan.global_batch_size,
        micro_batch_size=batch_plan.micro_batch_size,
        callbacks=[MetricsCallback(out / METRICS_FILE), ProgressCallback()]
        + ([FinalEvalCallback()] if eval_ds is not None else []),
        manifest={
            "recipe_hash": recipe_mod.fingerprint(recipe),
            "recipe": recipe_mod.to_dict(recipe),
            "world_size": world_size,
            "strategy": recipe.parallel.strategy,
            "batch_plan": dataclasses.asdict(batch_plan),
        },
        keep_last=recipe.checkpoint.keep_last,
        stop=stop,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the progress bar and metrics.jsonl replace its dict dumps
    tracking.install(trainer, list(recipe.train.report_to), out)  # one tracked run across requeues
    if recipe.model.quantization in ("nf4", "fp4", "int8") and precision.mode == "fp32":
        # TRL's SFTTrainer casts QLoRA adapters to bf16 whatever the precision (QLoRA paper default):
        # fp32 asked means fp32 adapters (bf16 rounding made 2-process losses differ from 1 by ~1e-4)
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    # no silent fallback: the distributed type and world size now, the sharding once the model is wrapped
    guard.check_distributed(trainer.accelerator.state, expected, recipe.parallel.strategy)
    trainer.add_callback(
        guard.ShardingCheck(
            trainer, recipe.parallel.strategy, world_size, out / PLAN_FILE if main_process else None
        )
    )
    if main_process:
        method = {"lora": "LoRA", "dora": "DoRA"}[recipe.peft.method] + (
            " + rsLoRA" if recipe.peft.use_rslora else ""
        )
        if recipe.model.quantization != "none":
            method = f"Q{method} ({recipe.model.quantization})"
        dropped = len(train_examples) - steps_per_epoch * batch_plan.global_batch_size
        print_table(
            "tunefleet run",
            [
                (
                    "model",
                    f"{recipe.model.name_or_path} ({precision.dtype}, {precision.mode}, "
                    f"{'CPU' if precision.use_cpu else 'GPU'})",
                ),
                (
                    "method",
                    f"{method} r={recipe.peft.r} alpha={recipe.peft.alpha:g} targets={recipe.peft.target_modules}",
                ),
                ("parameters", f"{trainable:,} trainable of {total:,} ({100 * trainable / total:.3f}%)"),
                (
                    "data",
                    f"{d.path} [{d.format}]: {train_stats['rows']} rows -> {len(train_examples)} examples"
                    + (f", {len(eval_examples)} eval" if eval_examples else ""),
                ),
                (
                    "batch",
                    f"micro {batch_plan.micro_batch_size} x accum {batch_plan.grad_accum_steps} x world "
                    f"{world_size} = global {batch_plan.global_batch_size} samples/step",
                ),
                (
                    "schedule",
                    f"{steps_per_epoch} steps/epoch ({dropped} samples of the last incomplete global "
                    f"batch dropped per epoch), max_steps={recipe.train.max_steps}, "
                    f"epochs={recipe.train.epochs}",
                ),
                (
                    "distributed",
                    f"{expected.distributed_type} x {world_size} ({expected.source}; sharding checked "
                    "when training starts, recorded in plan.json)",
                ),
                *[("compat", note) for note in compat_notes],
                ("output", str(out)),
            ],
        )
    if main_process:
        write_plan(
            out / PLAN_FILE,
            plan,
            train_examples=len(train_examples),
            steps_per_epoch=steps_per_epoch,
            in_effect={
                **in_effect(trainer, precision),
                "strategy": recipe.parallel.strategy,
                "cpu_fsdp_layer": cpu_fsdp.is_enabled() and trainer.is_fsdp_enabled,
                "compat_notes": compat_notes,
            },
        )
    stop.install()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.tf_stopped:
        if main_process:
            newest = ckpt.latest(out)
            print(
                f"stopped by {signal.Signals(stop.signal or signal.SIGTERM).name} after step "
                f"{trainer.state.global_step}: checkpoint {newest} is complete; exit {REQUEUE_EXIT_CODE} "
                "asks the scheduler to requeue (rerun the same command to continue)",
                flush=True,
            )
        dist_state.wait_for_everyone()
        return REQUEUE_EXIT_CODE

    from tunefleet.distributed.final_adapter import save_final_adapter

    final = out / FINAL_DIR
    save_final_adapter(trainer, tokenizer, final)  # every rank: FSDP / ZeRO-3 gather the adapter first
    if main_process:
        plot_loss(out / METRICS_FILE, out / LOSS_PLOT)
        samples = write_samples(
            trainer.model, tokenizer, recipe, eval_rows=eval_rows, train_rows=rows, path=out / SAMPLES_FILE
        )
        eval_loss = final_eval_loss(trainer.state.log_history)
        elapsed = time.monotonic() - started
        train_s = result.metrics.get("train_runtime", elapsed)
        tokens = trainer.state.num_input_tokens_seen
        print_table(
            "tunefleet done",
            [
                ("steps", f"{trainer.state.global_step}"),
                ("final loss", f"{result.training_loss:.4f} (mean over the run)"),
                ("time", f"{elapsed:.1f} s total, {train_s:.1f} s training"),
                ("throughput", f"{tokens / max(train_s, 1e-9):,.0f} tokens/s ({tokens:,} tokens)"),
                *([("eval loss", f"{eval_loss:.4f} (last evaluation)")] if eval_loss is not None else []),
                ("adapter", str(final)),
                ("metrics", f"{out / METRICS_FILE}, {out / LOSS_PLOT}"),
                ("samples", samples),
            ],
        )
    dist_state.wait_for_everyone()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        recipe = recipe_mod.load(args.recipe, args.overrides)
        code = run(recipe, overwrite=args.overwrite, no_resume=args.no_resume, resume=args.resume)
    except TunefleetError as exc:
        rank, _ = _rank_env()
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 2
    exit_file = os.environ.get(EXIT_FILE_ENV)
    if exit_file and _rank_env()[0] == 0:
        Path(exit_file).write_text(f"{code}\n", encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main())
