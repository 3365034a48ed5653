"""`tunefleet plan`: what a recipe will do on N nodes, before anything is loaded.

`build_plan` is pure: from a validated recipe, the world it runs on, the data counts and the
model's `config.json`, it derives everything the plan prints (batch math, schedule, LR points,
parameter counts, a memory estimate per GPU, the per-node launch command, warnings) as one
JSON-serialisable dict, step by step (`_batch`, `_data_and_schedule`, `_learning_rate`,
`_warnings`, `_parameters_and_memory`). `render_plan` turns that dict into text. The trainer
calls `build_plan` too, with the schedule it really runs, and writes the result to plan.json;
`tunefleet plan` gathers its inputs from disk in `plan_inputs.py`. torch is imported only to
count parameters (on the meta device).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunefleet.launch import command, compat, prep_report
from tunefleet.launch.compat import BNB
from tunefleet.launch.core import batch as batch_mod
from tunefleet.launch.core.batch import BatchPlan, Schedule
from tunefleet.launch.core.errors import RecipeError
from tunefleet.launch.core.hardware import Hardware, strategy_for
from tunefleet.launch.core.recipe import Recipe, data_sources, stats_format, weight_dtype
from tunefleet.launch.loading import placed_on_gpu_at_load, rank0_loads_weights
from tunefleet.launch.memory import (
    GIB,
    ZERO3_DEFAULT_WINDOW,
    MemoryInputs,
    ModelShape,
    estimate_load_memory,
    estimate_memory,
    layer_span,
)
from tunefleet.launch.params import EVA_DEFAULT_RHO, describe_method
from tunefleet.launch.preflight import batch_plan, recipe_warnings

MAX_ACCUM_STEPS = 64
"""More accumulation steps than this is flagged: each optimizer step then runs that many
sequential micro batches per device (slow), which a bigger micro batch or more GPUs avoid."""

FEW_STEPS = 10
"""A run with fewer optimizer steps than this is flagged."""

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True, kw_only=True)
class DataCounts:
    """How many rows the run trains and evaluates on."""

    source_rows: int
    """Rows read from data.path, or from every data.mixture source (before the limits and the
    evaluation hold-out)."""

    train_rows: int
    """Rows (or, in a run, tokenised examples) the training split holds: what the schedule counts."""

    eval_rows: int
    """Evaluation rows (held out by data.eval_ratio, or read from data.eval_path)."""

    counted: str = "rows"
    """`rows` (counted before tokenisation, by `tunefleet plan`) or `examples` (by the trainer)."""

    prepared: Mapping[str, Any] | None = None
    """What tokenising the training split kept, cut and dropped (its counts, as `tunefleet prepare`
    records them); None when the data has not been tokenised."""

    source_train_rows: tuple[int, ...] = ()
    """`train_rows` of each training source (data.path, or each data.mixture entry), in order;
    empty when not known per source."""

    @classmethod
    def from_rows(
        cls,
        rows: int | Sequence[int],
        recipe: Recipe,
        prepared: Mapping[str, Any] | None = None,
        prepared_sources: Sequence[int] = (),
    ) -> DataCounts:
        """Counts of the data files (`rows`: one count per training source): each source's limit
        first, then its hold-out. With `prepared` (the counts of the same rows tokenised, and
        `prepared_sources` the examples of each source), the training split is counted in
        examples, as a run counts it."""
        d = recipe.data
        per_source = [rows] if isinstance(rows, int) else list(rows)
        eval_ratio = 0 if d.eval_path else d.eval_ratio
        splits = [
            batch_mod.split_rows(n, limit=s.data.limit, eval_ratio=eval_ratio)
            for n, s in zip(per_source, data_sources(d), strict=True)
        ]
        train = [t for t, _ in splits]
        held_out = sum(h for _, h in splits)
        examples = list(prepared_sources) or ([prepared["examples"]] if prepared and len(train) == 1 else [])
        if prepared is not None and prepared.get("rows") == sum(train) and len(examples) == len(train):
            return cls(
                source_rows=sum(per_source),
                train_rows=prepared["examples"],
                eval_rows=held_out,
                counted="examples",
                prepared=prepared,
                source_train_rows=tuple(examples),
            )
        return cls(
            source_rows=sum(per_source),
            train_rows=sum(train),
            eval_rows=held_out,
            source_train_rows=tuple(train),
        )


@dataclass
class _Draft:
    """The plan being built, and what each step found worth saying."""

    plan: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def build_plan(
    recipe: Recipe,
    *,
    nodes: int = 1,
    procs_per_node: int = 1,
    dataset_rows: int | None = None,
    data: DataCounts | None = None,
    prepared: Mapping[str, Any] | None = None,
    schedule: Schedule | None = None,
    model_config: Mapping[str, Any] | None,
    counts: Mapping[str, int] | None = None,
    recipe_path: str | None = None,
    overrides: Sequence[str] = (),
    launch_commands: Sequence[str] | None = None,
    previous_batch: Mapping[str, Any] | None = None,
    gpu_memory_gib: float | None = None,
    notes: Sequence[str] = (),
    resolve: bool = True,
    batch: BatchPlan | None = None,
) -> dict[str, Any]:
    """Everything `tunefleet plan` shows, as a JSON-serialisable dict.

    The data: `data` (counts), or `dataset_rows` (rows of data.path before data.limit and the
    evaluation hold-out) with `prepared` (what tokenising it kept, cut and dropped, when known), or
    neither (steps then come from train.max_steps alone). `schedule`: the
    schedule a run really trains with (the trainer passes it, so plan.json shows exactly what runs);
    by default it is derived from the data counts. `model_config`: the model's config.json (None:
    no parameter counts or memory). `counts`: precomputed `ParamCounts.to_dict()`; by default
    computed from `model_config` on the meta device. `previous_batch`: the batch plan (or resolved
    recipe batch) of a run being resumed. `resolve`: apply the compatibility matrix for `nodes` x
    `procs_per_node` GPUs first (the trainer passes a recipe its start-up check resolved already).
    `batch`: the run's batch plan (the trainer passes the one its start-up check made; by default it
    is made here with the same function, `preflight.batch_plan`).
    """
    draft = _Draft(
        plan={"recipe": recipe_path, "strategy_asked": recipe.parallel.strategy}, notes=list(notes)
    )
    if resolve:
        recipe = _resolve(
            draft, recipe, nodes=nodes, procs_per_node=procs_per_node, model_config=model_config
        )
    bp = _batch(
        draft, recipe, nodes=nodes, procs_per_node=procs_per_node, previous_batch=previous_batch, batch=batch
    )
    if data is None and dataset_rows is not None:
        data = DataCounts.from_rows(dataset_rows, recipe, prepared)
    schedule = _data_and_schedule(draft, recipe, bp, data, schedule)
    _learning_rate(draft, recipe, schedule)
    _warnings(draft, recipe, bp, model_config)
    _parameters_and_memory(draft, recipe, bp, model_config, counts, gpu_memory_gib)
    draft.plan["launch_commands"] = (
        list(launch_commands)
        if launch_commands is not None
        else command.node_commands(
            recipe_path or "RECIPE.yaml", overrides, nodes=nodes, procs_per_node=procs_per_node
        )
    )
    if launch_commands is None and nodes > 1:
        draft.notes.append(
            f"run each `launch node R` line on machine R, with MAIN_ADDRESS set to the address of node 0 "
            f"(every machine must reach it; port {command.DEFAULT_MAIN_PORT} free there) and output_dir "
            "on storage every machine mounts at the same path"
        )
    draft.plan["warnings"] = draft.warnings
    draft.plan["notes"] = draft.notes
    return draft.plan


def _resolve(
    draft: _Draft, recipe: Recipe, *, nodes: int, procs_per_node: int, model_config: Mapping[str, Any] | None
) -> Recipe:
    """The recipe as a launch on these GPUs would carry it out; what the matrix refuses is a warning here."""
    hw = Hardware(
        num_processes=nodes * procs_per_node,
        num_machines=nodes,
        main_process_ip="MAIN_ADDRESS" if nodes > 1 else None,
        use_cpu=False,
    )
    try:
        resolved, notes = compat.resolve_with_notes(recipe, hw, model_config)
    except RecipeError as exc:
        draft.warnings.append(f"refused at launch: {exc.problem} (fix: {exc.fix})")
        return recipe
    draft.notes += notes
    return resolved


def _batch(
    draft: _Draft,
    recipe: Recipe,
    *,
    nodes: int,
    procs_per_node: int,
    previous_batch: Mapping[str, Any] | None,
    batch: BatchPlan | None,
) -> BatchPlan:
    b, d = recipe.batch, recipe.data
    bp = batch or batch_plan(recipe, world_size=nodes * procs_per_node, procs_per_node=procs_per_node)
    strategy = strategy_for(recipe.parallel.strategy, bp.world_size)
    draft.plan.update(
        {
            "model": recipe.model.name_or_path,
            "quantization": recipe.model.quantization,
            "strategy": strategy,
            "strategy_asked": draft.plan.get("strategy_asked", recipe.parallel.strategy),
            "nodes": nodes,
            "procs_per_node": procs_per_node,
            "world_size": bp.world_size,
            "micro_batch_size": bp.micro_batch_size,
            "grad_accum_steps": bp.grad_accum_steps,
            "global_batch_size": bp.global_batch_size,
            "global_batch_tokens": bp.global_batch_tokens,
            "max_length": bp.max_length,
            "batch_target": bp.target,
            "batching": {"group_by_length": b.group_by_length, "padding_free": b.padding_free},
        }
    )
    if bp.target == "tokens":
        draft.notes.append(
            f"global batch set by batch.global_batch_tokens={b.global_batch_tokens}: "
            f"{bp.global_batch_size} samples of {d.max_length} tokens"
        )
    if previous_batch is not None:
        problem, changes = batch_mod.batch_change(previous_batch, bp)
        draft.warnings += changes
        if problem is not None:
            draft.warnings.append(
                f"the run in output_dir cannot be resumed with this recipe: {problem} (fix: keep "
                f"batch.global_batch_size={previous_batch.get('global_batch_size')}, or use a new output_dir)"
            )
    return bp


def _data_and_schedule(
    draft: _Draft, recipe: Recipe, bp: BatchPlan, data: DataCounts | None, schedule: Schedule | None
) -> Schedule | None:
    """Rows for training and evaluation, steps per epoch, total and warm-up steps."""
    d, t = recipe.data, recipe.train
    if data is not None and data.counted == "rows":
        limit_rows = data.train_rows + data.eval_rows
        if d.eval_ratio and not d.eval_path and data.eval_rows == 0:
            draft.warnings.append(
                f"data.eval_ratio={d.eval_ratio} of {limit_rows} rows holds out no evaluation row"
            )
        draft.notes.append(
            "rows are counted before tokenisation: examples that lose every answer token to "
            "truncation are dropped when training starts, which can lower the step counts"
            + (
                " (how many, and why, is known once the data is tokenised: `tunefleet prepare RECIPE`)"
                if data.prepared is None
                else ""
            )
        )
    prepared = None
    if data is not None and data.prepared is not None:
        prepared = prep_report.summary(data.prepared, max_length=d.max_length, fmt=stats_format(d))
        draft.warnings += prepared["warnings"]
    draft.plan.update(
        {
            "source_rows": data.source_rows if data else None,
            "dataset_rows": data.train_rows if data else None,
            "eval_rows": data.eval_rows if data else None,
            "data_counted": data.counted if data else None,
            "data_preparation": prepared,
            "mixture": _mixture(draft, recipe, data),
        }
    )
    if schedule is None and data is not None:
        schedule = batch_mod.plan_schedule(
            dataset_rows=data.train_rows,
            global_batch_size=bp.global_batch_size,
            epochs=t.epochs,
            max_steps=t.max_steps,
            warmup_ratio=t.warmup_ratio,
        )
    elif schedule is None and t.max_steps > 0:
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
        draft.notes.append("dataset rows unknown: total steps come from train.max_steps alone")
    elif schedule is None:
        draft.notes.append("dataset rows unknown and train.max_steps unset: steps cannot be planned")
    known = schedule is not None and schedule.steps_per_epoch > 0
    draft.plan.update(
        {
            "steps_per_epoch": schedule.steps_per_epoch if known and schedule else None,
            "total_steps": schedule.total_steps if schedule else None,
            "warmup_steps": schedule.warmup_steps if schedule else None,
            "epochs": round(schedule.epochs, 4) if known and schedule else None,
            "last_batch": "drop",
            "dropped_rows_per_epoch": schedule.dropped_rows_per_epoch if known and schedule else None,
        }
    )
    if schedule is not None and known and schedule.dropped_rows_per_epoch:
        draft.notes.append(
            f"{schedule.dropped_rows_per_epoch} rows (the incomplete last global batch) are "
            "skipped each epoch; the order is reshuffled per epoch, so different rows each time"
        )
    return schedule


MANY_PASSES = 4.0
"""A mixture source seen more often than this per epoch is flagged (it is being memorised)."""


def _mixture(draft: _Draft, recipe: Recipe, data: DataCounts | None) -> list[dict[str, Any]] | None:
    """Per source of a data.mixture: its rows (or examples), weight, and the samples each epoch
    takes from it (`batch.mixture_counts`, what the sampler draws); None without a mixture."""
    if recipe.data.mixture is None:
        return None
    sources = data_sources(recipe.data)
    weights = [s.weight for s in sources]
    rows = list(data.source_train_rows) if data is not None else []
    known = len(rows) == len(sources) and min(rows, default=0) > 0
    per_epoch = batch_mod.mixture_counts(rows, weights) if known else []
    for i in (i for i, n in enumerate(per_epoch) if n == 0):
        others = sum(weights) - weights[i]
        raise RecipeError(
            f"{sources[i].where.removesuffix('.path')}.weight={weights[i]:g} gives {sources[i].data.path} no "
            f"samples: each epoch shares {sum(rows):,} samples by weight, and its share rounds to 0",
            f"raise its weight to at least {others / (sum(rows) - 1):.3g} (one sample per epoch), or drop the source",
        )
    table = []
    for i, s in enumerate(sources):
        entry: dict[str, Any] = {
            "source": s.where.removesuffix(".path"),
            "path": s.data.path,
            "format": s.data.format,
            "weight": s.weight,
            "weight_share": round(s.weight / sum(weights), 4),
            "rows": rows[i] if known else None,
            "samples_per_epoch": per_epoch[i] if known else None,
            "share": round(per_epoch[i] / sum(per_epoch), 4) if known else None,
            "passes_per_epoch": round(per_epoch[i] / rows[i], 2) if known else None,
        }
        table.append(entry)
        if known and entry["passes_per_epoch"] > MANY_PASSES:
            draft.warnings.append(
                f"{entry['source']} ({s.data.path}) is seen {entry['passes_per_epoch']:g} times per epoch "
                f"(weight {s.weight:g} on {rows[i]:,} rows): lower its weight or add rows"
            )
    return table


def _learning_rate(draft: _Draft, recipe: Recipe, schedule: Schedule | None) -> None:
    t = recipe.train
    draft.plan["lr_schedule"] = None
    if schedule is not None:
        draft.plan["lr_schedule"] = {
            "scheduler": t.lr_scheduler,
            "lr": t.lr,
            "kwargs": batch_mod.SCHEDULER_KWARGS[t.lr_scheduler],
            "points": [
                [s, lr] for s, lr in batch_mod.lr_points(schedule, lr=t.lr, scheduler_name=t.lr_scheduler)
            ],
        }
        if schedule.total_steps < FEW_STEPS:
            draft.warnings.append(f"only {schedule.total_steps} optimizer steps in the whole run")
    if t.lr_scheduler == "constant" and t.warmup_ratio > 0:
        draft.warnings.append(
            "train.lr_scheduler=constant has no warm-up in transformers (warmup_ratio is ignored); "
            "use constant_with_warmup to warm up"
        )


def _warnings(draft: _Draft, recipe: Recipe, bp: BatchPlan, model_config: Mapping[str, Any] | None) -> None:
    """Settings that run, but probably not as the user meant."""
    world, asked = bp.world_size, recipe.parallel.strategy
    draft.warnings += recipe_warnings(recipe)
    context = _context_length(model_config)
    if context and recipe.data.max_length > context:
        draft.warnings.append(
            f"data.max_length={recipe.data.max_length} is beyond the model's context of {context:,} tokens "
            "(max_position_embeddings): it never saw positions past it; lower data.max_length"
        )
    if bp.grad_accum_steps > MAX_ACCUM_STEPS:
        draft.warnings.append(
            f"{bp.grad_accum_steps} accumulation steps (> {MAX_ACCUM_STEPS}): every optimizer step "
            "runs that many micro batches one after another; raise batch.micro_batch_size or add GPUs"
        )
    if world > 1 and asked == "single":
        draft.warnings.append(
            f"parallel.strategy=single on {world} processes is refused at launch: use auto or ddp "
            "(or a sharded strategy)"
        )
    if world == 1 and asked not in ("auto", "single", "ddp"):
        draft.warnings.append(f"parallel.strategy={asked} on one process shards nothing")


def _context_length(model_config: Mapping[str, Any] | None) -> int | None:
    if model_config is None:
        return None
    config = model_config.get("text_config") or model_config
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def _precision(recipe: Recipe) -> tuple[str, str | None]:
    mode = recipe.train.precision
    if mode == "auto":
        return "bf16", "train.precision=auto is assumed to be bf16 (a GPU that supports it)"
    return mode, None


def _effective_quantization(recipe: Recipe) -> str:
    """The quantization training sees: MXFP4 dequantized at load is none."""
    m = recipe.model
    return "none" if m.quantization == "mxfp4" and m.mxfp4_dequantize else m.quantization


def model_counts(recipe: Recipe, model_config: Mapping[str, Any]) -> dict[str, int]:
    """The recipe's parameter counts on the model of `model_config` (built on the meta device), as
    `ParamCounts.to_dict()`. Checks every name and number the recipe gives the model (target
    modules, freeze's layers and modules, ...): a run calls it before it writes or loads anything,
    and hands the counts to `build_plan`."""
    from tunefleet.launch.params import param_counts

    return param_counts(
        model_config,
        recipe.peft,
        _effective_quantization(recipe),
        trust_remote_code=recipe.model.trust_remote_code,
    ).to_dict()


def _zero3_setting(value: float | None) -> int:
    """A ZeRO-3 window of the recipe as DeepSpeed takes it (unset: DeepSpeed's default)."""
    return ZERO3_DEFAULT_WINDOW if value is None else int(value)


def memory_inputs(
    recipe: Recipe,
    bp: BatchPlan,
    model_config: Mapping[str, Any],
    counts: Mapping[str, int],
    *,
    procs_per_node: int,
    use_cpu: bool = False,
) -> MemoryInputs:
    """What the memory estimate of `recipe` on `bp`'s world reads: the model's shape and counts, the
    method, the strategy, the batch, how it loads. The one mapping from a recipe to the estimate:
    `tunefleet plan`, its comparison of methods and strategies, and the benchmarks use it."""
    m, p = recipe.model, recipe.peft
    precision, _ = _precision(recipe)
    if use_cpu and recipe.train.precision == "auto":
        precision = "fp32"
    shape = ModelShape.from_config(model_config)
    trained_layers, backward_layers = layer_span(
        p.method, shape.num_layers, p.trainable_layers, p.extra_modules or ()
    )
    return MemoryInputs(
        shape=shape,
        base_params=counts["base"],
        adapter_params=counts["adapter"],
        trainable_params=counts["trainable"],
        quantized_params=counts["quantized"],
        quantization=_effective_quantization(recipe),
        double_quant=m.double_quant,
        precision=precision,
        weight_bytes=_DTYPE_BYTES[weight_dtype(recipe, precision)],
        strategy=strategy_for(recipe.parallel.strategy, bp.world_size),
        world_size=bp.world_size,
        micro_batch_size=bp.micro_batch_size,
        max_length=recipe.data.max_length,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
        optimizer=recipe.train.optimizer,
        lora_targets=p.target_modules,
        lora_rank=p.r,
        lora_dropout=p.dropout,
        attn_implementation=m.attn_implementation,
        offload_params=recipe.parallel.offload == "optimizer+params",
        offload_optimizer=recipe.parallel.offload != "none",
        procs_per_node=procs_per_node,
        rank0_loads_weights=rank0_loads_weights(recipe, bp.world_size),
        placed_on_gpu_at_load=placed_on_gpu_at_load(recipe, use_cpu=use_cpu),
        method=p.method,
        trained_layers=trained_layers,
        zero3_gathered_params=_zero3_setting(recipe.parallel.zero3_gathered_params),
        zero3_sub_group_size=_zero3_setting(recipe.parallel.zero3_sub_group_size),
        backward_layers=backward_layers,
        device="cpu" if use_cpu else "gpu",
    )


def _parameters_and_memory(
    draft: _Draft,
    recipe: Recipe,
    bp: BatchPlan,
    model_config: Mapping[str, Any] | None,
    counts: Mapping[str, int] | None,
    gpu_memory_gib: float | None,
) -> None:
    plan = draft.plan
    p = recipe.peft
    plan.update(
        {
            "adapter": describe_method(p, recipe.model.quantization),
            "trainable_params": None,
            "total_params": None,
            "trainable_percent": None,
            "base_params": None,
            "quantized_params": None,
            "memory": None,
            "load_memory": None,
        }
    )
    if model_config is None:
        return
    if p.init == "eva" and (p.eva_rho is None or p.eva_rho > 1):
        draft.notes.append(
            f"peft.init=eva moves rank between layers from the data when the run starts (a layer gets up to "
            f"{p.eva_rho or EVA_DEFAULT_RHO:g} x r): the parameter counts are those before it does (the run "
            "summary and plan.json give the real ones; peft.eva_rho=1 keeps them)"
        )
    m = recipe.model
    if counts is None:
        counts = model_counts(recipe, model_config)
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
        draft.notes.append(assumed)
    inputs = memory_inputs(recipe, bp, model_config, counts, procs_per_node=plan["procs_per_node"])
    estimate = estimate_memory(inputs)
    at_load = estimate_load_memory(inputs)
    plan["memory"] = estimate.to_dict()
    plan["load_memory"] = at_load.to_dict()
    draft.notes.append(
        f"memory is estimated at data.max_length={recipe.data.max_length} for every sample (the worst "
        "case: batches padded to their longest sequence use less)"
    )
    if gpu_memory_gib is not None and estimate.total_bytes > gpu_memory_gib * GIB:
        draft.warnings.append(
            f"estimated {estimate.total_bytes / GIB:.1f} GiB per GPU exceeds {gpu_memory_gib:g} GiB: "
            "turn on train.gradient_checkpointing, lower batch.micro_batch_size or data.max_length, "
            "quantize, or shard (fsdp / deepspeed-zero3)"
        )
    if gpu_memory_gib is not None and at_load.gpu.total_bytes > gpu_memory_gib * GIB:
        draft.warnings.append(
            f"loading needs an estimated {at_load.gpu.total_bytes / GIB:.1f} GiB per GPU, more than "
            f"{gpu_memory_gib:g} GiB: the model cannot load"
            + (
                " (bitsandbytes loads the whole quantized model on every GPU before FSDP or ZeRO-3 shard it)"
                if m.quantization in BNB and plan["strategy"] != "single"
                else ""
            )
        )


# ----------------------------------------------------------------------------- text


def _n(value: Any) -> str:
    return "?" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _preparation_rows(prepared: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if not prepared:
        return []
    lines = prep_report.lines(prepared["counts"], max_length=prepared["max_length"], fmt=prepared["format"])
    return [("  tokenised", f"{prepared['rows']:,} rows -> {prepared['examples']:,} examples")] + [
        (f"  {label}", text) for label, text in lines
    ]


def mixture_rows(mixture: Sequence[Mapping[str, Any]] | None, counted: str) -> list[tuple[str, str]]:
    rows = []
    for m in mixture or []:
        if m["rows"] is None:
            text = (
                f"{m['path']} ({m['format']}): weight {m['weight']:g} ({m['weight_share']:.1%}), rows unknown"
            )
        else:
            text = (
                f"{m['path']} ({m['format']}): {m['rows']:,} {counted}, weight {m['weight']:g} -> "
                f"{m['share']:.1%} of each epoch ({m['samples_per_epoch']:,} samples, "
                f"{m['passes_per_epoch']:g} passes)"
            )
        rows.append((f"  {m['source']}", text))
    return rows


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
        *mixture_rows(plan.get("mixture"), plan.get("data_counted") or "rows"),
        *_preparation_rows(plan.get("data_preparation")),
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
    if plan.get("adapter"):
        rows.append(("adapter", plan["adapter"]))
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
        rows.append(("memory / GPU", f"~{mem['total_gib']:.1f} GiB in training (estimate)"))
        rows += [(f"  {p['name']}", f"{p['bytes'] / GIB:8.2f} GiB  {p['note']}") for p in mem["parts"]]
    load = plan.get("load_memory")
    if load:
        for label, key in (("at load / GPU", "gpu"), ("at load / node RAM", "host_per_node")):
            rows.append((label, f"~{load[key]['total_gib']:.1f} GiB (estimate)"))
            rows += [
                (f"  {p['name']}", f"{p['bytes'] / GIB:8.2f} GiB  {p['note']}") for p in load[key]["parts"]
            ]
    for i, cmd in enumerate(plan["launch_commands"]):
        label = "launch" if len(plan["launch_commands"]) == 1 else f"launch node {i}"
        rows.append((label, cmd))
    rows += [("warning", w) for w in plan["warnings"]]
    rows += [("note", n) for n in plan["notes"]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows) + "\n"
