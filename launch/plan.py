"""`tunefleet plan`: what a recipe will do on N nodes, before anything is loaded.

`build_plan` is pure: from a validated recipe, the world it runs on, the number of data rows
and the model's `config.json`, it derives everything the plan prints (batch math, schedule,
LR points, parameter counts, a memory estimate per GPU, the per-node launch command, warnings)
as one JSON-serialisable dict. `render_plan` turns that dict into text. The I/O lives in
small helpers: `find_model_config` (a local directory or the Hugging Face cache, never the
network), `count_dataset_rows` (cheap counts, no tokenisation) and `make_plan`, which the CLI
calls. Parameter counts build the model on the meta device: no weights are downloaded or
allocated. torch is imported only there.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tunefleet.launch import batch as batch_mod
from tunefleet.launch.errors import RecipeError, TunefleetError
from tunefleet.launch.memory import GIB, ModelShape, estimate_memory
from tunefleet.launch.recipe import DataConfig, ModelConfig, Recipe

MAX_ACCUM_STEPS = 64
"""More accumulation steps than this is flagged: each optimizer step then runs that many
sequential micro batches per device (slow), which a bigger micro batch or more GPUs avoid."""

FEW_STEPS = 10
"""A run with fewer optimizer steps than this is flagged."""

ENTRYPOINT = "tunefleet.distributed.sft"
"""The module every process runs (`python -m tunefleet.distributed.sft --recipe FILE`)."""

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


# ----------------------------------------------------------------------------- inputs (I/O)


def find_model_config(model: ModelConfig) -> dict[str, Any]:
    """The model's `config.json`: from a local directory, the built-in demo model, or the
    Hugging Face cache. Never downloads; raises RecipeError when it is not available offline."""
    name = model.name_or_path
    if name.startswith("tunefleet:"):
        from tunefleet.distributed.demo_model import TINY_LLAMA_ID, ensure_tiny_llama

        if name != TINY_LLAMA_ID:
            raise RecipeError(
                f"model.name_or_path: unknown built-in model {name!r}",
                f"the built-in model is {TINY_LLAMA_ID!r}",
            )
        name = str(ensure_tiny_llama())  # built locally once (seconds), then cached
    local = Path(name).expanduser()
    if local.is_dir():
        path = local / "config.json"
        if not path.is_file():
            raise RecipeError(
                f"model.name_or_path={name!r} is a directory without a config.json",
                "point model.name_or_path at a saved model directory",
            )
        return json.loads(path.read_text(encoding="utf-8"))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=model.revision)
    except Exception:  # an id that is not a valid repo id, or a broken cache
        cached = None
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text(encoding="utf-8"))
    raise RecipeError(
        f"the config.json of model {name!r} is not available offline: it is not a local directory "
        "and not in the Hugging Face cache (the planner never downloads)",
        f"fetch it once with `hf download {name} config.json`, or point model.name_or_path at a local copy",
    )


def count_dataset_rows(
    data: DataConfig, *, base_dir: str | Path | None = None
) -> tuple[int | None, str | None]:
    """Rows in `data.path` before `limit` and the evaluation hold-out, counted cheaply, or
    (None, why not). JSON Lines: non-blank lines; JSON: the list's length; Parquet: the row count
    in its footer; a directory: as the trainer reads it. A relative path is looked up in the
    working directory, then next to the recipe (`base_dir`)."""
    path = Path(data.path).expanduser()
    if not path.exists() and base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    if not path.exists():
        if path.suffix.lower() in (".jsonl", ".json", ".parquet") or data.path.startswith((".", "/", "~")):
            return None, f"data file {data.path!r} does not exist"
        return None, f"{data.path!r} is not a local file (a Hub dataset is not read by the planner)"
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            from tunefleet.distributed.data import load_rows

            return len(load_rows(str(path), split=data.split)), None
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return sum(1 for line in f if line.strip()), None
        if suffix == ".json":
            text = path.read_text(encoding="utf-8")
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:  # JSON Lines named .json, as the trainer accepts
                return sum(1 for line in text.splitlines() if line.strip()), None
            return (len(obj), None) if isinstance(obj, list) else (None, f"{path} is not a JSON list")
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows, None
    except (OSError, UnicodeDecodeError, TunefleetError) as exc:
        return None, f"{path} cannot be counted: {exc}"
    return None, f"{path} has a file type the planner does not count ({suffix or 'no suffix'})"


# ----------------------------------------------------------------------------- the plan


def _precision(recipe: Recipe) -> tuple[str, str | None]:
    mode = recipe.train.precision
    if mode == "auto":
        return "bf16", "train.precision=auto is assumed to be bf16 (a GPU that supports it)"
    return mode, None


def node_commands(
    recipe_path: str, overrides: Sequence[str], *, nodes: int, procs_per_node: int
) -> list[str]:
    """The command each node runs: torchrun starting `procs_per_node` processes of the entrypoint."""
    q = shlex.quote
    tail = f"-m {ENTRYPOINT} --recipe {q(recipe_path)}" + "".join(f" --set {q(o)}" for o in overrides)
    if nodes == 1 and procs_per_node == 1:
        return [f"tunefleet train {q(recipe_path)}" + "".join(f" --set {q(o)}" for o in overrides)]
    if nodes == 1:
        return [f"torchrun --standalone --nproc_per_node {procs_per_node} {tail}"]
    return [
        f"torchrun --nnodes {nodes} --nproc_per_node {procs_per_node} --node_rank {rank} "
        f"--master_addr $MASTER_ADDR --master_port $MASTER_PORT {tail}"
        for rank in range(nodes)
    ]


def build_plan(
    recipe: Recipe,
    *,
    nodes: int = 1,
    procs_per_node: int = 1,
    dataset_rows: int | None,
    model_config: Mapping[str, Any] | None,
    counts: Mapping[str, int] | None = None,
    recipe_path: str | None = None,
    overrides: Sequence[str] = (),
    launch_commands: Sequence[str] | None = None,
    previous_batch: Mapping[str, Any] | None = None,
    gpu_memory_gib: float | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Everything `tunefleet plan` shows, as a JSON-serialisable dict.

    `dataset_rows`: rows of data.path before data.limit and the evaluation hold-out (None if
    unknown: steps then come from train.max_steps alone). `model_config`: the model's
    config.json (None: no parameter counts or memory). `counts`: precomputed
    `ParamCounts.to_dict()`; by default computed from `model_config` on the meta device.
    `previous_batch`: the batch plan (or resolved recipe batch) of a run being resumed.
    """
    warnings: list[str] = []
    out_notes: list[str] = list(notes)
    b, t, d, m = recipe.batch, recipe.train, recipe.data, recipe.model
    world = nodes * procs_per_node
    bp = batch_mod.plan_batch(
        micro_batch_size=b.micro_batch_size,
        global_batch_size=None if b.global_batch_tokens else b.global_batch_size,
        global_batch_tokens=b.global_batch_tokens,
        max_length=d.max_length,
        world_size=world,
        procs_per_node=procs_per_node,
    )
    plan: dict[str, Any] = {
        "recipe": recipe_path,
        "model": m.name_or_path,
        "quantization": m.quantization,
        "strategy": recipe.parallel.strategy,
        "nodes": nodes,
        "procs_per_node": procs_per_node,
        "world_size": bp.world_size,
        "micro_batch_size": bp.micro_batch_size,
        "grad_accum_steps": bp.grad_accum_steps,
        "global_batch_size": bp.global_batch_size,
        "global_batch_tokens": bp.global_batch_tokens,
        "max_length": bp.max_length,
        "batch_target": bp.target,
    }
    if bp.target == "tokens":
        out_notes.append(
            f"global batch set by batch.global_batch_tokens={b.global_batch_tokens}: "
            f"{bp.global_batch_size} samples of {d.max_length} tokens"
        )
    if previous_batch is not None:
        try:
            warnings += batch_mod.check_resume(previous_batch, bp)
        except RecipeError as exc:
            warnings.append(f"{exc.problem} (fix: {exc.fix})")

    # data and schedule
    train_rows = eval_rows = None
    if dataset_rows is not None:
        limit_rows = min(dataset_rows, d.limit) if d.limit else dataset_rows
        train_rows, eval_rows = batch_mod.split_rows(
            dataset_rows, limit=d.limit, eval_ratio=0 if d.eval_path else d.eval_ratio
        )
        if d.eval_ratio and not d.eval_path and eval_rows == 0:
            warnings.append(
                f"data.eval_ratio={d.eval_ratio} of {limit_rows} rows holds out no evaluation row"
            )
        out_notes.append(
            "rows are counted before tokenisation: examples that lose every answer token to "
            "truncation are dropped when training starts, which can lower the step counts"
        )
    plan.update({"source_rows": dataset_rows, "dataset_rows": train_rows, "eval_rows": eval_rows})
    schedule = None
    if train_rows is not None:
        schedule = batch_mod.plan_schedule(
            dataset_rows=train_rows,
            global_batch_size=bp.global_batch_size,
            epochs=t.epochs,
            max_steps=t.max_steps,
            warmup_ratio=t.warmup_ratio,
        )
    elif t.max_steps > 0:
        schedule = batch_mod.Schedule(
            dataset_rows=0,
            global_batch_size=bp.global_batch_size,
            last_batch="drop",
            steps_per_epoch=0,
            total_steps=t.max_steps,
            warmup_steps=batch_mod.count_warmup_steps(t.max_steps, t.warmup_ratio),
            dropped_rows_per_epoch=0,
            short_last_batch_samples=0,
            epochs=0.0,
        )
        out_notes.append("dataset rows unknown: total steps come from train.max_steps alone")
    else:
        out_notes.append("dataset rows unknown and train.max_steps unset: steps cannot be planned")
    known_rows = train_rows is not None
    plan.update(
        {
            "steps_per_epoch": schedule.steps_per_epoch if schedule and known_rows else None,
            "total_steps": schedule.total_steps if schedule else None,
            "warmup_steps": schedule.warmup_steps if schedule else None,
            "epochs": round(schedule.epochs, 4) if schedule and known_rows else None,
            "last_batch": "drop",
            "dropped_rows_per_epoch": schedule.dropped_rows_per_epoch if schedule and known_rows else None,
            "lr_schedule": None,
        }
    )
    if schedule is not None:
        plan["lr_schedule"] = {
            "scheduler": t.lr_scheduler,
            "lr": t.lr,
            "kwargs": batch_mod.SCHEDULER_KWARGS[t.lr_scheduler],
            "points": [
                [s, lr] for s, lr in batch_mod.lr_points(schedule, lr=t.lr, scheduler_name=t.lr_scheduler)
            ],
        }
        if schedule.total_steps < FEW_STEPS:
            warnings.append(f"only {schedule.total_steps} optimizer steps in the whole run")
        if known_rows and schedule.dropped_rows_per_epoch:
            out_notes.append(
                f"{schedule.dropped_rows_per_epoch} rows (the incomplete last global batch) are "
                "skipped each epoch; the order is reshuffled per epoch, so different rows each time"
            )
    if t.lr_scheduler == "constant" and t.warmup_ratio > 0:
        warnings.append(
            "train.lr_scheduler=constant has no warm-up in transformers (warmup_ratio is ignored); "
            "use constant_with_warmup to warm up"
        )
    if bp.grad_accum_steps > MAX_ACCUM_STEPS:
        warnings.append(
            f"{bp.grad_accum_steps} accumulation steps (> {MAX_ACCUM_STEPS}): every optimizer step "
            "runs that many micro batches one after another; raise batch.micro_batch_size or add GPUs"
        )
    if world > 1 and recipe.parallel.strategy == "single":
        warnings.append(f"parallel.strategy=single on {world} processes: use ddp (or a sharded strategy)")
    if world == 1 and recipe.parallel.strategy not in ("single", "ddp"):
        warnings.append(f"parallel.strategy={recipe.parallel.strategy} on one process shards nothing")

    # parameters and memory
    plan.update(
        {
            "trainable_params": None,
            "total_params": None,
            "trainable_percent": None,
            "base_params": None,
            "quantized_params": None,
            "memory": None,
        }
    )
    if model_config is not None:
        effective_quant = "none" if m.quantization == "mxfp4" and m.mxfp4_dequantize else m.quantization
        if counts is None:
            from tunefleet.launch.params import param_counts

            counts = param_counts(
                model_config, recipe.peft, effective_quant, trust_remote_code=m.trust_remote_code
            ).to_dict()
        plan.update(
            {
                "trainable_params": counts["trainable"],
                "total_params": counts["total"],
                "trainable_percent": round(100 * counts["trainable"] / counts["total"], 4),
                "base_params": counts["base"],
                "quantized_params": counts["quantized"],
            }
        )
        precision, assumed = _precision(recipe)
        if assumed:
            out_notes.append(assumed)
        weight_dtype = (
            m.dtype
            if m.dtype != "auto"
            else {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
        )
        estimate = estimate_memory(
            shape=ModelShape.from_config(model_config),
            base_params=counts["base"],
            adapter_params=counts["adapter"],
            trainable_params=counts["trainable"],
            quantized_params=counts["quantized"],
            quantization=effective_quant,
            double_quant=m.double_quant,
            precision=precision,
            weight_bytes=_DTYPE_BYTES[weight_dtype],
            strategy=recipe.parallel.strategy,
            world_size=world,
            micro_batch_size=bp.micro_batch_size,
            max_length=d.max_length,
            gradient_checkpointing=t.gradient_checkpointing,
            optimizer=t.optimizer,
            lora_targets=recipe.peft.target_modules,
            lora_rank=recipe.peft.r,
            lora_dropout=recipe.peft.dropout,
            attn_implementation=m.attn_implementation,
            offload_params=recipe.parallel.offload == "optimizer+params",
            offload_optimizer=recipe.parallel.offload != "none",
        )
        plan["memory"] = estimate.to_dict()
        out_notes.append(
            f"memory is estimated at data.max_length={d.max_length} for every sample (the worst "
            "case: batches padded to their longest sequence use less)"
        )
        if gpu_memory_gib is not None and estimate.total_bytes > gpu_memory_gib * GIB:
            warnings.append(
                f"estimated {estimate.total_bytes / GIB:.1f} GiB per GPU exceeds {gpu_memory_gib:g} GiB: "
                "turn on train.gradient_checkpointing, lower batch.micro_batch_size or data.max_length, "
                "quantize, or shard (fsdp / deepspeed-zero3)"
            )

    plan["launch_commands"] = (
        list(launch_commands)
        if launch_commands is not None
        else node_commands(
            recipe_path or "RECIPE.yaml", overrides, nodes=nodes, procs_per_node=procs_per_node
        )
    )
    plan["warnings"] = warnings
    plan["notes"] = out_notes
    return plan


# ----------------------------------------------------------------------------- text


def _n(value: Any) -> str:
    return "?" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def render_plan(plan: Mapping[str, Any]) -> str:
    """The plan as text for a terminal."""
    rows: list[tuple[str, str]] = [
        ("model", f"{plan['model']} (quantization {plan['quantization']}, strategy {plan['strategy']})"),
        ("world", f"{plan['nodes']} node(s) x {plan['procs_per_node']} process(es) = {plan['world_size']}"),
        (
            "batch",
            f"micro {plan['micro_batch_size']} x accumulation {plan['grad_accum_steps']} x world "
            f"{plan['world_size']} = global {plan['global_batch_size']} samples/step "
            f"({plan['global_batch_tokens']:,} tokens at max length {plan['max_length']:,})",
        ),
        (
            "data",
            f"{_n(plan['source_rows'])} rows -> {_n(plan['dataset_rows'])} for training"
            + (f", {plan['eval_rows']:,} held out" if plan.get("eval_rows") else ""),
        ),
        (
            "schedule",
            f"{_n(plan['steps_per_epoch'])} steps/epoch, {_n(plan['total_steps'])} steps in total "
            f"({_n(plan['epochs'])} epochs), {_n(plan['warmup_steps'])} warm-up steps; last incomplete "
            f"global batch dropped ({_n(plan['dropped_rows_per_epoch'])} rows/epoch)",
        ),
    ]
    lr = plan.get("lr_schedule")
    if lr:
        points = ", ".join(f"step {s}: {v:.3g}" for s, v in lr["points"])
        rows.append(("learning rate", f"{lr['scheduler']} from {lr['lr']:g}: {points}"))
    if plan["total_params"] is not None:
        rows.append(
            (
                "parameters",
                f"{plan['trainable_params']:,} trainable of {plan['total_params']:,} "
                f"({plan['trainable_percent']:.4f}%)",
            )
        )
    else:
        rows.append(("parameters", "? (the model's config.json is not available)"))
    mem = plan.get("memory")
    if mem:
        rows.append(("memory / GPU", f"~{mem['total_gib']:.1f} GiB (estimate)"))
        rows += [(f"  {p['name']}", f"{p['bytes'] / GIB:8.2f} GiB  {p['note']}") for p in mem["parts"]]
    for i, cmd in enumerate(plan["launch_commands"]):
        label = "launch" if len(plan["launch_commands"]) == 1 else f"launch node {i}"
        rows.append((label, cmd))
    rows += [("warning", w) for w in plan["warnings"]]
    rows += [("note", n) for n in plan["notes"]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows) + "\n"


# ----------------------------------------------------------------------------- the command


def _previous_batch(recipe: Recipe) -> dict[str, Any] | None:
    """The batch of a run already in output_dir (its resolved recipe.yaml), if any."""
    path = Path(recipe.output_dir) / "recipe.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return {"global_batch_size": saved["batch"]["global_batch_size"]}
    except Exception:  # an unreadable old file must not stop the plan
        return None


def make_plan(
    recipe_path: str,
    overrides: Sequence[str] = (),
    *,
    nodes: int = 1,
    gpus_per_node: int = 1,
    model_config_path: str | None = None,
    gpu_memory_gib: float | None = None,
) -> dict[str, Any]:
    """Load the recipe, find the model config and count the rows, then `build_plan`."""
    from tunefleet.launch import recipe as recipe_mod

    for value, name in ((nodes, "--nodes"), (gpus_per_node, "--gpus-per-node")):
        if value < 1:
            raise RecipeError(f"{name} must be >= 1, got {value}", f"pass {name} 1 or more")
    recipe = recipe_mod.load(recipe_path, list(overrides))
    notes: list[str] = []
    try:
        if model_config_path:
            from tunefleet.launch.params import read_model_config

            model_config: dict[str, Any] | None = read_model_config(model_config_path)
        else:
            model_config = find_model_config(recipe.model)
    except RecipeError as exc:
        model_config = None
        notes.append(f"no parameter counts or memory estimate: {exc.problem} (fix: {exc.fix})")
    rows, why = count_dataset_rows(recipe.data, base_dir=Path(recipe_path).parent)
    if why:
        notes.append(f"dataset rows unknown: {why}")
    return build_plan(
        recipe,
        nodes=nodes,
        procs_per_node=gpus_per_node,
        dataset_rows=rows,
        model_config=model_config,
        recipe_path=recipe_path,
        overrides=overrides,
        previous_batch=_previous_batch(recipe),
        gpu_memory_gib=gpu_memory_gib,
        notes=notes,
    )
