"""The shared SFT entrypoint: one module trains every recipe.

python -m tunefleet.distributed.sft --recipe FILE [--set key=value ...]
accelerate launch ... -m tunefleet.distributed.sft --recipe FILE
torchrun --nproc_per_node N -m tunefleet.distributed.sft --recipe FILE

`run` reads as the steps of a run, each a function below with one job: preflight (the start-up
checks every launcher runs too) -> data (and what the adapter needs of it: aLoRA's invocation in
every example, EVA's batches) -> schedule and plan -> training arguments -> join the world -> run
directory -> model and adapter -> the adapter's data-driven initialisation (EVA) -> trainer ->
checks and report -> train, or stop and ask to be requeued -> finish.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunefleet.launch.core import recipe as recipe_mod
from tunefleet.launch.core.args import StartOptions, add_run_arguments
from tunefleet.launch.core.batch import BatchPlan, Schedule, plan_schedule
from tunefleet.launch.core.errors import TunefleetError, named_write_failure
from tunefleet.launch.core.layout import (
    ENV_EXIT_FILE,
    ENV_START,
    EXIT_OK,
    EXIT_REQUEUE,
    FINAL_DIR,
    LOSS_PLOT,
    METRICS_FILE,
    PLAN_FILE,
    RESOLVED_RECIPE,
    SAMPLES_FILE,
    atomic_write,
    write_json,
)
from tunefleet.launch.core.noise import quiet_libraries, quiet_transformers
from tunefleet.launch.core.recipe import WEIGHT_METHODS, Recipe
from tunefleet.launch.preflight import Preflight, preflight


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tunefleet.distributed.sft",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(p)
    p.add_argument("--recipe", required=True, help="recipe YAML file")
    return p


@dataclass(frozen=True)
class Rank:
    """This process's place in the world, from the launcher's environment variables."""

    rank: int
    world_size: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Rank:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


# ----------------------------------------------------------------------------- the run


def run(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    no_resume: bool = False,
    resume: str | None = None,
    options: StartOptions | None = None,
) -> int:
    """Train one recipe in this process (one rank of a launched job, or alone)."""
    options = options or StartOptions(overwrite=overwrite, no_resume=no_resume, resume=resume)
    started = time.monotonic()
    rank = Rank.from_env()
    checked = _preflight(recipe, options, rank)
    with _writer_lock(checked, rank) as lock:  # one run writes an output directory at a time
        return _run(checked, rank, lock, started)


def _writer_lock(checked: Preflight, rank: Rank) -> Any:
    """Rank 0 holds the output directory's lock (`core/lock.py`) for the whole run, or writes under
    its launcher's; the other ranks write under rank 0's."""
    import contextlib

    from tunefleet.launch.core.lock import holding

    if not rank.main:
        return contextlib.nullcontext(None)
    return holding(checked.recipe.output_dir, "tunefleet train " + " ".join(sys.argv[1:])[:200])


def _run(checked: Preflight, rank: Rank, lock: Any, started: float) -> int:
    """The steps of a run (see the module doc), once the start-up check passed and the lock is held."""
    recipe = checked.recipe
    from tunefleet.distributed import model as model_mod

    precision = model_mod.resolve_precision(recipe)
    model_path = model_mod.resolve_model_path(recipe.model)
    tokenizer = model_mod.load_tokenizer(model_path, recipe.model)
    model_config, counts = _check_model_names(recipe, model_path)  # before anything is written
    data = _load_data(recipe, tokenizer, rank)  # a bad data file fails before a large model loads
    invocation = _alora_invocation(recipe, tokenizer, data)
    schedule = _schedule(recipe, checked.batch, data)
    eva_batches = _eva_batches(checked, schedule, data)
    plan = run_plan(checked, schedule, data, model_config, counts) if rank.main else {}
    args = training_arguments(recipe, checked.batch, schedule, precision, has_eval=data.eval is not None)
    dist = _join_world(rank)
    _prepare_run_dir(checked, rank, dist, lock)
    model = _build_model(model_path, checked, precision, rank, invocation)
    adapter_init = _initialize_adapter(model, checked, eva_batches, data, tokenizer)
    trainer = _build_trainer(checked, schedule, model, args, tokenizer, data)
    model_mod.match_adapter_dtype(trainer.model, recipe)
    _check_and_report(trainer, checked, schedule, data, plan, precision, rank, adapter_init)
    with trainer.tf_stop:  # from here to the end, SIGTERM/SIGUSR1 mean: checkpoint and stop
        result = trainer.train(resume_from_checkpoint=checked.start.checkpoint)
        if trainer.tf_diverged is not None:
            _diverged(trainer, recipe)
        if trainer.tf_stopped:
            return _stop_for_requeue(trainer, rank, dist)
        _finish(trainer, tokenizer, recipe, data, result, started, rank, model_path)
        dist.wait_for_everyone()
    return EXIT_OK


# ----------------------------------------------------------------------------- the steps


def _preflight(recipe: Recipe, options: StartOptions, rank: Rank) -> Preflight:
    """The start-up checks, on this rank's hardware; library noise silenced from here on."""
    import torch

    from tunefleet.distributed import guard
    from tunefleet.launch.core import rundir

    hw = guard.runtime_hardware(rank.world_size, use_cpu=not torch.cuda.is_available())
    decided = rundir.Start.from_env(os.environ.get(ENV_START), recipe.output_dir)  # the launcher's scan
    checked = preflight(recipe, hw, options, decided=decided)
    quiet_transformers()
    return checked


def _load_data(recipe: Recipe, tokenizer: Any, rank: Rank) -> Any:
    """The tokenised data, memory-mapped from the cache: the `tunefleet prepare` one when it
    matches, else made once here by rank 0 while the other ranks wait for it."""
    from tunefleet.distributed.prepare import load_or_prepare

    data = load_or_prepare(recipe, tokenizer, main=rank.main, world_size=rank.world_size, show=rank.main)
    if rank.main and data.built is None:
        print(f"tokenised data from the cache {data.cache_dir} (tunefleet prepare)", flush=True)
    elif rank.main:
        print(
            f"tokenised {data.train_stats['rows']:,} rows into the cache {data.cache_dir} "
            f"({data.built['procs']} process(es), {data.built['seconds']:.1f} s)",
            flush=True,
        )
        for note in data.built["notes"]:
            print(f"note: {note}", flush=True)
    return data


def _alora_invocation(recipe: Recipe, tokenizer: Any, data: Any) -> list[int] | None:
    """aLoRA's invocation tokens, checked against every training example (before the model loads)."""
    from tunefleet.distributed import alora

    tokens = alora.invocation_tokens(tokenizer, recipe)
    if tokens is not None:
        alora.check_invocation(data.train, tokens, str(recipe.peft.alora_invocation), tokenizer)
    return tokens


def _schedule(recipe: Recipe, batch: BatchPlan, data: Any) -> Schedule:
    """Steps per epoch, total and warm-up steps: computed once here, handed to the trainer, the
    sampler, plan.json and the summary."""
    t = recipe.train
    return plan_schedule(
        dataset_rows=len(data.train),
        global_batch_size=batch.global_batch_size,
        epochs=t.epochs,
        max_steps=t.max_steps,
        warmup_ratio=t.warmup_ratio,
    )


def _eva_batches(checked: Preflight, schedule: Schedule, data: Any) -> list[list[int]] | None:
    """The micro batches EVA will read (a fresh `peft.init: eva` run only), checked before any model loads."""
    from tunefleet.distributed import eva

    recipe = checked.recipe
    if recipe.peft.init != "eva" or checked.start.checkpoint is not None:
        return None
    return eva.plan_batches(
        recipe.peft,
        data.train,
        batch=checked.batch,
        steps_per_epoch=schedule.steps_per_epoch,
        seed=recipe.train.seed,
    )


def _check_model_names(
    recipe: Recipe, model_path: str
) -> tuple[dict[str, Any] | None, dict[str, int] | None]:
    """The model's config and the recipe's parameter counts on it (meta device, every rank): a name
    or number the model does not have (target modules, freeze's layers and modules) is refused here,
    before any data is tokenised or weight loaded. Done before the training arguments exist: once
    they do, a DeepSpeed ZeRO-3 config is active and building the model on the meta device would go
    through zero.Init, a collective call."""
    from tunefleet.launch.params import read_model_config
    from tunefleet.launch.plan import model_counts

    config_file = Path(model_path) / "config.json"
    if not config_file.exists():
        return None, None
    config = read_model_config(config_file)
    return config, model_counts(recipe, config)


def run_plan(
    checked: Preflight,
    schedule: Schedule,
    data: Any,
    model_config: dict[str, Any] | None,
    counts: dict[str, int] | None,
) -> dict[str, Any]:
    """The plan this run really runs with (its world size, its examples, its schedule, the counts
    `_check_model_names` made)."""
    from tunefleet.launch.plan import DataCounts, build_plan

    hw = checked.hw
    data_counts = DataCounts(
        source_rows=data.train_stats["rows"] + data.eval_row_count,
        train_rows=len(data.train),
        eval_rows=data.eval_row_count,
        counted="examples",
        prepared=data.train_stats,
        source_train_rows=tuple(data.source_examples),
    )
    return build_plan(
        checked.recipe,
        nodes=hw.num_machines,
        procs_per_node=hw.procs_per_machine,
        data=data_counts,
        schedule=schedule,
        model_config=model_config,
        counts=counts,
        notes=checked.notes,
        resolve=False,  # preflight resolved it for this hardware already
        batch=checked.batch,  # the run's one batch plan
    )


def run_identity(checked: Preflight) -> Any:
    """What every checkpoint of this run records about it (`checkpoints.RunIdentity`): the resolved
    recipe, the world, the strategy, the one batch plan and the data's fingerprint."""
    from tunefleet.launch.core import checkpoints as ckpt

    recipe = checked.recipe
    return ckpt.RunIdentity(
        recipe=recipe_mod.to_dict(recipe),
        recipe_hash=recipe_mod.fingerprint(recipe),
        world_size=checked.batch.world_size,
        strategy=recipe.parallel.strategy,
        batch_plan=checked.batch.to_dict(),
        data_fingerprint=checked.data_fingerprint,
    )


def training_arguments(
    recipe: Recipe, batch: BatchPlan, schedule: Schedule, precision: Any, *, has_eval: bool
) -> Any:
    """TRL's SFTConfig for the recipe: the batch plan and the schedule exactly as planned."""
    from trl import SFTConfig

    from tunefleet.distributed import cpu_fsdp
    from tunefleet.launch.core.batch import SCHEDULER_KWARGS
    from tunefleet.launch.templates import activation_checkpointing

    if cpu_fsdp.wanted(recipe.parallel.strategy, cuda_available=not precision.use_cpu):
        cpu_fsdp.enable()  # FSDP2 on CPU/gloo; accelerate alone would silently run DDP (see cpu_fsdp.py)
    t = recipe.train
    checkpointing = activation_checkpointing(recipe)
    save = t.save_steps > 0
    evaluate = has_eval and t.eval_steps > 0
    return SFTConfig(
        output_dir=recipe.output_dir,
        per_device_train_batch_size=batch.micro_batch_size,
        per_device_eval_batch_size=batch.micro_batch_size,
        gradient_accumulation_steps=batch.grad_accum_steps,
        max_steps=schedule.total_steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        lr_scheduler_kwargs=dict(SCHEDULER_KWARGS.get(t.lr_scheduler, {})),
        warmup_steps=schedule.warmup_steps,
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
        use_liger_kernel=t.liger_kernel,
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        logging_nan_inf_filter=False,  # a non-finite loss is logged as it is (the stock filter logs 0.0)
        log_level="warning",
        save_only_model=False,
    )


def _join_world(rank: Rank) -> Any:
    """The process group exists once the training arguments do: check that every rank joined."""
    from accelerate import PartialState

    dist = PartialState()
    if dist.num_processes != rank.world_size:
        raise TunefleetError(
            f"the launcher set WORLD_SIZE={rank.world_size} but {dist.num_processes} process(es) joined",
            "launch with torchrun or `tunefleet launch`, which start and connect every process",
        )
    return dist


def _prepare_run_dir(checked: Preflight, rank: Rank, dist: Any, lock: Any = None) -> None:
    """Rank 0 acts on the preflight's decision (move aside, resolved recipe, leftovers, metrics);
    then every rank checks that the directory is shared."""
    from tunefleet.distributed.prepare import keep_cache
    from tunefleet.launch.core import checkpoints as ckpt
    from tunefleet.launch.core import rundir

    out, start = Path(checked.recipe.output_dir), checked.start
    if rank.main:
        if start.mode == "overwrite":
            moved = rundir.move_aside(out)
            keep_cache(moved, out)  # the data this run has memory-mapped stays where it was
            if lock is not None:
                lock.follow(moved)  # the lock file went with the old run: back into the new one
            print(f"moved the previous run aside: {moved}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        # first, before anything is written: an earlier attempt's partial writes (a full disk
        # leaves one) would otherwise hold the space this start needs
        removed = ckpt.cleanup_incomplete(out)
        if removed:
            print(
                f"removed {len(removed)} unfinished checkpoint write(s) of an earlier attempt: "
                f"{', '.join(p.name for p in removed)}",
                flush=True,
            )
        if start.mode == "fresh":
            rundir.set_aside_metrics(out)  # an earlier attempt that never checkpointed
        atomic_write(
            out / RESOLVED_RECIPE,
            f"# resolved recipe, written {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            + recipe_mod.dump(checked.recipe),
        )
        for checkpoint, why in start.passed_over:  # the run writes those steps again
            if Path(checkpoint).exists():
                ckpt.move_aside(Path(checkpoint), why)
        if start.mode == "resume":
            _announce_resume(out, checked)
    dist.wait_for_everyone()
    ckpt.check_shared_storage(out, rank=rank.rank, world_size=rank.world_size, barrier=dist.wait_for_everyone)


def _announce_resume(out: Path, checked: Preflight) -> None:
    from tunefleet.launch.core import checkpoints as ckpt
    from tunefleet.launch.core import rundir

    checkpoint = str(checked.start.checkpoint)
    if checked.start.note:
        print(f"note: {checked.start.note}", flush=True)
    rundir.truncate_metrics(out / METRICS_FILE, checkpoint)
    m = ckpt.read_manifest(Path(checkpoint))
    print(
        f"resuming from {checkpoint}: step {m.step}, {m.samples_seen:,} samples seen "
        f"(written by {m.world_size} process(es), now {checked.batch.world_size})",
        flush=True,
    )
    if checked.start.weights_only:
        print(
            f"  --resume-weights-only: its optimizer state was removed; its weights continue with a fresh "
            f"optimizer (Adam's moments restart from zero at step {m.step + 1}; the learning-rate schedule "
            "continues), so the steps after it differ from an uninterrupted run",
            flush=True,
        )
    for note in checked.resume_notes:
        print(f"  changed since that checkpoint (harmless): {note}", flush=True)


def _build_model(
    model_path: str, checked: Preflight, precision: Any, rank: Rank, invocation: list[int] | None
) -> Any:
    """The base model with the recipe's adapter (under FSDP2 only rank 0 reads the weights).

    The adapter's random init (LoRA A) comes from train.seed, identical on every rank and every
    world size (the Trainer seeds only after the model exists: unseeded, runs could never match).
    Resuming an EVA run builds the adapter with the ranks EVA chose (its checkpoint's config)."""
    from transformers import set_seed

    from tunefleet.distributed import eva, guard
    from tunefleet.distributed import model as model_mod

    recipe, checkpoint = checked.recipe, checked.start.checkpoint
    model = model_mod.load_model(model_path, recipe, precision, rank=rank.rank, world_size=rank.world_size)
    guard.check_padding_free(model, recipe)
    set_seed(recipe.train.seed)
    config = eva.saved_config(checkpoint) if recipe.peft.init == "eva" and checkpoint is not None else None
    model = model_mod.apply_method(model, recipe, alora_invocation_tokens=invocation, config=config)
    return model_mod.materialize_trainable(model)


def _initialize_adapter(
    model: Any, checked: Preflight, eva_batches: list[list[int]] | None, data: Any, tokenizer: Any
) -> dict:
    """EVA's data-driven initialisation (every rank together; not on resume, where the checkpoint's
    weights replace it). Returns what plan.json records of it ({} for the other initialisations)."""
    import torch

    from tunefleet.distributed import eva

    if checked.recipe.peft.init != "eva":
        return {}
    if eva_batches is None:  # resuming: the checkpoint's ranks (`_build_model`), then its weights
        return {"eva": {"ranks_from": str(checked.start.checkpoint), "digest_per_rank": eva.agree(model)}}
    recipe = checked.recipe
    if (
        torch.cuda.is_available()
        and recipe.parallel.strategy in ("single", "ddp")
        and recipe.model.quantization == "none"
    ):
        from accelerate import PartialState

        model.to(PartialState().device)  # where the trainer puts it anyway: EVA's passes on a CPU would crawl
    return {"eva": eva.initialize(model, data.train, eva_batches, pad_token_id=tokenizer.pad_token_id)}


def _build_trainer(
    checked: Preflight, schedule: Schedule, model: Any, args: Any, tokenizer: Any, data: Any
) -> Any:
    """The trainer with tunefleet's sample order, atomic checkpoints, stop flag and callbacks."""
    from transformers.trainer_callback import PrinterCallback

    from tunefleet.distributed import tracking
    from tunefleet.distributed.evaluation import FinalEvalCallback
    from tunefleet.distributed.reporting import MetricsCallback, ProgressCallback
    from tunefleet.distributed.trainer import StopFlag, TunefleetTrainer
    from tunefleet.launch import hf_compat

    recipe, out = checked.recipe, Path(checked.recipe.output_dir)
    padding_free = recipe.batch.padding_free is True
    trainer = TunefleetTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        # padding-free: TRL's collator packs a micro batch into one row, position_ids restarting at
        # every sample and the first label of each sample masked (it was never a target)
        data_collator=hf_compat.language_modeling_collator(tokenizer.pad_token_id, padding_free=True)
        if padding_free
        else None,
        batch=checked.batch,
        schedule=schedule,
        group_by_length=recipe.batch.group_by_length,
        padding_free=padding_free,
        source_sizes=data.source_examples,
        source_weights=[s.weight for s in recipe_mod.data_sources(recipe.data)],
        callbacks=[MetricsCallback(out / METRICS_FILE), ProgressCallback()]
        + ([FinalEvalCallback()] if data.eval is not None else []),
        identity=run_identity(checked),
        keep_last=recipe.checkpoint.keep_last,
        max_nonfinite_steps=recipe.train.max_nonfinite_steps,
        stop=StopFlag(),
        peft=recipe.peft,
        fresh_optimizer=checked.start.weights_only,
    )
    trainer.remove_callback(PrinterCallback)  # the progress bar and metrics.jsonl replace its dict dumps
    tracking.install(trainer, list(recipe.train.report_to), out)  # one tracked run across requeues
    return trainer


def _check_and_report(
    trainer: Any,
    checked: Preflight,
    schedule: Schedule,
    data: Any,
    plan: dict[str, Any],
    precision: Any,
    rank: Rank,
    adapter_init: dict[str, Any],
) -> None:
    """No silent fallback (the distributed type and world size now, the sharding once the model is
    wrapped); the run summary and plan.json on rank 0; the stop signals from here on."""
    from tunefleet.distributed import cpu_fsdp, guard
    from tunefleet.distributed import model as model_mod
    from tunefleet.distributed.reporting import peak_gpu_memory_gib, print_table, start_rows
    from tunefleet.launch.core.versions import versions

    recipe, out = checked.recipe, Path(checked.recipe.output_dir)
    expected = guard.expectation(recipe, checked.hw)
    guard.check_distributed(trainer.accelerator.state, expected, recipe.parallel.strategy)
    weights_read_by = guard.ranks_that_read_weights(trainer.model)
    trainer.add_callback(
        guard.ShardingCheck(
            trainer, recipe.parallel.strategy, rank.world_size, out / PLAN_FILE if rank.main else None
        )
    )
    if rank.main:
        trainable, total = model_mod.count_parameters(trainer.model)
        batching = trainer.batching()
        print_table(
            "tunefleet run",
            start_rows(
                checked,
                schedule,
                data,
                precision,
                expected,
                trainable=trainable,
                total=total,
                batching=batching,
                warnings=plan.get("warnings", []),
                mixture=plan.get("mixture"),
            ),
        )
        in_effect = {
            **guard.in_effect(trainer, precision),
            "strategy": recipe.parallel.strategy,
            "cpu_fsdp_layer": cpu_fsdp.is_enabled() and trainer.is_fsdp_enabled,
            "compat_notes": checked.notes,
            "train_examples": len(data.train),
            "steps_per_epoch": schedule.steps_per_epoch,
            "batching": batching,
            "trainable_params": trainable,
            **adapter_init,
            "weights_read_by_ranks": weights_read_by,
            "gpu_peak_after_load_gib": peak_gpu_memory_gib(),
        }
        write_json(out / PLAN_FILE, {**plan, "versions": versions(), "in_effect": in_effect})


def _diverged(trainer: Any, recipe: Recipe) -> None:
    """Every rank: the loss or the gradient norm stopped being finite; say where, what is kept, why."""
    from tunefleet.launch.core import checkpoints as ckpt
    from tunefleet.launch.core.errors import DivergedError

    d = trainer.tf_diverged
    newest = ckpt.latest(Path(recipe.output_dir))
    kept = f"the last checkpoint, {newest.name}, is from before it" if newest else "no checkpoint was written"
    allowed = recipe.train.max_nonfinite_steps
    skipped = f" after {allowed} skipped step(s) (train.max_nonfinite_steps)" if allowed else ""
    raise DivergedError(
        f"the run diverged at step {d['step']}{skipped}: "
        + (f"loss {d['loss']}" if d["loss"] is not None else "a finite loss")
        + f", gradient norm {d['grad_norm']}; it stopped there, saved nothing after it and wrote no "
        f"{FINAL_DIR}/; {kept}",
        f"lower train.lr (now {recipe.train.lr:g}; full fine-tuning uses ~1e-5 to 5e-5, LoRA 1e-4 to 3e-3) or "
        "turn train.max_grad_norm on, check the data around that step, then rerun: it resumes from the last "
        "checkpoint (or --overwrite); train.max_nonfinite_steps=N skips up to N such steps",
    )


def _stop_for_requeue(trainer: Any, rank: Rank, dist: Any) -> int:
    """A stop signal was agreed on and a checkpoint written: exit with the requeue code."""
    from tunefleet.launch.core import checkpoints as ckpt

    if rank.main:
        newest = ckpt.latest(Path(trainer.args.output_dir))
        print(
            f"stopped by {signal.Signals(trainer.tf_stop.signal or signal.SIGTERM).name} after step "
            f"{trainer.state.global_step}: checkpoint {newest} is complete; exit {EXIT_REQUEUE} "
            "asks the scheduler to requeue (rerun the same command to continue)",
            flush=True,
        )
    dist.wait_for_everyone()
    return EXIT_REQUEUE


def _finish(
    trainer: Any,
    tokenizer: Any,
    recipe: Recipe,
    data: Any,
    result: Any,
    started: float,
    rank: Rank,
    model_path: str,
) -> None:
    """Rank 0's loss plot and samples, then the final adapter (gathered on every rank) or, for
    full/freeze, the final model (exported from the shards by every rank), then the summary.
    `final/` is the last thing written: a run killed before it appears reruns its last steps (or
    goes straight to it from a checkpoint at the last step) and makes the plot and samples again;
    once it is there, they are there too."""
    from tunefleet.distributed.evaluation import final_eval_loss, write_samples
    from tunefleet.distributed.reporting import (
        done_rows,
        optimizer_state_elements,
        peak_gpu_memory_gib,
        peak_memory_per_rank,
        per_rank,
        plot_loss,
        print_table,
        record_in_effect,
    )

    out = Path(recipe.output_dir)
    samples = None
    if rank.main:
        plot_loss(out / METRICS_FILE, out / LOSS_PLOT)
        samples = write_samples(
            trainer.model,
            tokenizer,
            recipe,
            eval_rows=data.eval_rows,
            train_rows=data.rows,
            path=out / SAMPLES_FILE,
            base_model_path=model_path,
        )
    _save_final(trainer, tokenizer, recipe, out / FINAL_DIR)
    peaks = peak_memory_per_rank()  # collective, after the final save (its peak included)
    optimizer_state = per_rank(optimizer_state_elements(trainer.optimizer))  # collective
    if not rank.main:
        return
    record_in_effect(
        out / PLAN_FILE,
        gpu_peak_gib=peak_gpu_memory_gib(),
        peak_memory_gib_per_rank=peaks,
        optimizer_state_elements_per_rank=optimizer_state,
    )
    print_table(
        "tunefleet done",
        done_rows(
            trainer,
            result,
            out,
            elapsed_s=time.monotonic() - started,
            eval_loss=final_eval_loss(trainer.state.log_history),
            samples=samples,
            peak_memory_gib=peaks,
            what="model" if recipe.peft.method in WEIGHT_METHODS else "adapter",
        ),
    )


def _save_final(trainer: Any, tokenizer: Any, recipe: Recipe, final: Path) -> None:
    """Collective: `final/` holds the adapter (gathered from the shards when sharded), or for
    full/freeze the whole model as a Hugging Face model directory (exported one tensor at a time)."""
    if recipe.peft.method not in WEIGHT_METHODS:
        from tunefleet.distributed.final_adapter import save_final_adapter

        save_final_adapter(trainer, tokenizer, final)  # FSDP / ZeRO-3 gather the adapter first
        return
    from tunefleet.distributed import model as model_mod
    from tunefleet.distributed.export import export_model

    export_model(trainer, tokenizer, final, dtype=model_mod.export_dtype(recipe))


# ----------------------------------------------------------------------------- the command


ERROR_GRACE_S = 5.0
"""How long a rank other than its node's first waits before it reports its own start-up error."""


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    rank = Rank.from_env()
    # the first process of each machine speaks for it: its launcher reads the exit file it writes
    node_main = int(os.environ.get("LOCAL_RANK", rank.rank)) == 0
    try:
        recipe = recipe_mod.load(args.recipe, args.overrides)
        code = run(recipe, options=StartOptions.from_args(args))
    except TunefleetError as exc:
        if not node_main:
            # the node's first rank, failing alike, speaks for it: the launcher stops this rank once it
            # has. Exiting at once could have the launcher stop the first rank before it printed (seen:
            # a run that ended with no message at all); a rank that fails alone still says why
            time.sleep(ERROR_GRACE_S)
        print(
            f"error: {exc}" if node_main else f"error (rank {rank.rank}): {exc}", file=sys.stderr, flush=True
        )
        code = exc.exit_code
    except (OSError, RuntimeError) as exc:  # a write the machine refused (the final save, the data cache)
        where = Path(str(getattr(exc, "filename", None) or ".")).parent
        named = named_write_failure(exc, where, f"rank {rank.rank}")
        if named is None:
            raise
        print(f"error: {named}", file=sys.stderr, flush=True)
        code = named.exit_code
    exit_file = os.environ.get(ENV_EXIT_FILE)
    if exit_file and node_main:
        Path(exit_file).write_text(f"{code}\n", encoding="utf-8")
    _close_process_group()
    return code


def _close_process_group() -> None:
    """Leave the process group before the interpreter exits: its background threads, torn down at
    exit instead, can abort the process ("terminate called without an active exception") after a
    successful run, which the launcher then reports as a failure."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _exit(code: int) -> None:
    """Exit a process of the job. The other ranks of a multi-process run skip the interpreter's
    teardown (`os._exit`, after flushing): the C++ threads of torch's communication libraries can
    still abort it at exit ("terminate called without an active exception") after a run that
    succeeded. Rank 0 runs its exit handlers: trackers may flush there."""
    rank = Rank.from_env()
    if rank.world_size > 1 and not rank.main:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
