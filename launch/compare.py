"""`tunefleet plan --compare`: every method x strategy the compatibility matrix allows, side by side,
for the user's GPUs: which fit, by how much, and the one to pick (seed 004's question, answered
with the memory estimate instead of rules of thumb).

Methods, strongest first: `full` (every weight), `freeze` (the recipe's selection, else the last
quarter of the decoder layers), `lora` (the recipe's adapter, else r=16 on every linear layer) and
`qlora` (the same adapter over an NF4 base). Strategies, least sharding and offload first: single,
ddp, deepspeed-zero2, fsdp, deepspeed-zero3, fsdp-qlora, and ZeRO-3 with CPU offload of the
optimizer and parameters. A row is a variant of the user's recipe (`--set` lines that select it);
what the matrix refuses is left out. Each row's peak per GPU is the larger of the training step and
the load (`memory.py`); it fits when that is at most `--gpu-memory`.

The recommendation: the strongest method that fits, with the least sharding and offload among the
strategies that fit it. Pure: no torch (the parameter counts are made on the meta device by the
caller's `counts` function), no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tunefleet.launch import compat
from tunefleet.launch.core.errors import RecipeError
from tunefleet.launch.core.hardware import Hardware
from tunefleet.launch.core.recipe import LORA_ONLY, PeftConfig, Recipe
from tunefleet.launch.memory import GIB, estimate_host_training, estimate_load_memory, estimate_memory
from tunefleet.launch.plan import memory_inputs
from tunefleet.launch.preflight import batch_plan

METHODS = ("full", "freeze", "lora", "qlora")
"""Strongest first (what the recommendation prefers)."""

STRATEGIES: tuple[tuple[str, str], ...] = (
    ("single", "none"),
    ("ddp", "none"),
    ("deepspeed-zero2", "none"),
    ("fsdp", "none"),
    ("deepspeed-zero3", "none"),
    ("fsdp-qlora", "none"),
    ("deepspeed-zero3", "optimizer+params"),
)
"""Least sharding and offload first (what the recommendation prefers among those that fit)."""


@dataclass(frozen=True, kw_only=True)
class Row:
    method: str
    strategy: str
    offload: str
    sets: tuple[str, ...]
    """The `--set` values that turn the user's recipe into this row."""
    trainable_params: int
    train_bytes: int
    """Peak of one GPU in a training step (`estimate_memory`)."""
    load_bytes: int
    """Peak of one GPU while the model loads (`estimate_load_memory`)."""
    host_bytes_per_node: int
    """Host RAM of one node: the larger of loading and, with CPU offload, training."""
    parts: tuple[tuple[str, int], ...]
    """The training step's parts (name, bytes)."""

    @property
    def peak_bytes(self) -> int:
        return max(self.train_bytes, self.load_bytes)

    @property
    def label(self) -> str:
        return self.strategy + (" + offload" if self.offload != "none" else "")

    def fits(self, gpu_bytes: int | None, host_bytes: int | None) -> bool | None:
        """Whether the row fits the GPUs (and the nodes' RAM, when it is known); None: unknown. A row
        with CPU offload lives off the host's RAM: without it known, it is never said to fit."""
        if gpu_bytes is None:
            return None
        if self.peak_bytes > gpu_bytes:
            return False
        if host_bytes is not None:
            return self.host_bytes_per_node <= host_bytes
        return None if self.offload != "none" else True

    def to_dict(self, gpu_bytes: int | None, host_bytes: int | None = None) -> dict[str, Any]:
        return {
            "method": self.method,
            "strategy": self.strategy,
            "offload": self.offload,
            "set": list(self.sets),
            "trainable_params": self.trainable_params,
            "peak_gib": round(self.peak_bytes / GIB, 2),
            "train_gib": round(self.train_bytes / GIB, 2),
            "load_gib": round(self.load_bytes / GIB, 2),
            "host_gib_per_node": round(self.host_bytes_per_node / GIB, 2),
            "fits": self.fits(gpu_bytes, host_bytes),
            "margin_gib": None if gpu_bytes is None else round((gpu_bytes - self.peak_bytes) / GIB, 2),
            "parts": {name: round(b / GIB, 3) for name, b in self.parts},
        }


def _freeze_selection(recipe: Recipe, num_layers: int) -> dict[str, Any]:
    p = recipe.peft
    if p.method == "freeze":
        return {"trainable_layers": p.trainable_layers, "trainable_modules": p.trainable_modules,
                "extra_modules": p.extra_modules}  # fmt: skip
    return {
        "trainable_layers": max(1, math.ceil(num_layers / 4)),
        "trainable_modules": None,
        "extra_modules": None,
    }


def _variant(recipe: Recipe, method: str, num_layers: int) -> tuple[Recipe, list[str]]:
    """The user's recipe with `method` (and the `--set` values that make it so)."""
    defaults = {f.name: f.default for f in dataclasses.fields(PeftConfig)}
    p, m = recipe.peft, recipe.model
    sets: list[str] = []
    peft_changes: dict[str, Any] = {
        "trainable_layers": None,
        "trainable_modules": None,
        "extra_modules": None,
    }
    model_changes: dict[str, Any] = {}
    if method in ("full", "freeze"):
        peft_changes["method"] = method
        for key in LORA_ONLY:  # adapter settings the weight methods refuse
            if getattr(p, key) != defaults[key]:
                peft_changes[key] = defaults[key]
                sets.append(f"peft.{key}={_yaml(defaults[key])}")
        if method == "freeze":
            selection = _freeze_selection(recipe, num_layers)
            peft_changes.update(selection)
            sets += [f"peft.{k}={_yaml(v)}" for k, v in selection.items() if v is not None]
        model_changes["quantization"] = "none"
        if m.dtype in ("bfloat16", "float16"):
            model_changes["dtype"] = "auto"  # fp32 master weights
    else:
        peft_changes["method"] = p.method if p.method in ("lora", "dora") else "lora"
        model_changes["quantization"] = "nf4" if method == "qlora" else "none"
        if method == "qlora" and m.quantization not in ("nf4", "fp4"):
            model_changes["quant_storage_dtype"] = None
    sets = [f"peft.method={peft_changes['method']}", *sets]
    if model_changes.get("quantization") != m.quantization:
        sets.append(f"model.quantization={model_changes['quantization']}")
    if "dtype" in model_changes:
        sets.append("model.dtype=auto")
    variant = dataclasses.replace(
        recipe,
        peft=dataclasses.replace(p, **peft_changes),
        model=dataclasses.replace(m, **model_changes),
    )
    return variant, sets


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def compare(
    recipe: Recipe,
    model_config: Mapping[str, Any],
    *,
    nodes: int,
    gpus_per_node: int,
    gpu_memory_gib: float | None,
    host_memory_gib: float | None = None,
    counts: Callable[[Recipe], Mapping[str, int]],
) -> dict[str, Any]:
    """Every allowed method x strategy row for `nodes` x `gpus_per_node` GPUs of `gpu_memory_gib`
    each, and the recommendation (see the module doc). `counts(recipe)`: the parameter counts of a
    variant (`plan.model_counts`; the caller caches them by method)."""
    world = nodes * gpus_per_node
    num_layers = int((model_config.get("text_config") or model_config).get("num_hidden_layers", 1))
    gpu_bytes = None if gpu_memory_gib is None else int(gpu_memory_gib * GIB)
    host_bytes = None if host_memory_gib is None else int(host_memory_gib * GIB)
    hw = Hardware(
        num_processes=world,
        num_machines=nodes,
        main_process_ip="MAIN_ADDRESS" if nodes > 1 else None,
        use_cpu=False,
    )
    rows: list[Row] = []
    refused: list[str] = []
    for method in METHODS:
        variant, method_sets = _variant(recipe, method, num_layers)
        for strategy, offload in STRATEGIES:
            if not _applies(method, strategy, offload, world):
                continue
            candidate = dataclasses.replace(
                variant, parallel=dataclasses.replace(variant.parallel, strategy=strategy, offload=offload)
            )
            try:
                resolved, _ = compat.resolve_with_notes(candidate, hw, model_config)
                bp = batch_plan(resolved, world_size=world, procs_per_node=gpus_per_node)
            except RecipeError as exc:
                refused.append(f"{method} + {strategy}: {exc.problem}")
                continue
            made = counts(resolved)
            inputs = memory_inputs(resolved, bp, model_config, made, procs_per_node=gpus_per_node)
            train, load = estimate_memory(inputs), estimate_load_memory(inputs)
            sets = [*method_sets, f"parallel.strategy={strategy}"]
            if offload != "none" or recipe.parallel.offload != "none":
                sets.append(f"parallel.offload={offload}")
            rows.append(
                Row(
                    method=method,
                    strategy=strategy,
                    offload=offload,
                    sets=tuple(sets),
                    trainable_params=int(made["trainable"]),
                    train_bytes=train.total_bytes,
                    load_bytes=load.gpu.total_bytes,
                    host_bytes_per_node=max(
                        load.host_per_node.total_bytes, estimate_host_training(inputs).total_bytes
                    ),
                    parts=tuple((p.name, p.bytes) for p in train.parts),
                )
            )
    pick, why = recommend(rows, gpu_bytes, host_bytes)
    return {
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "gpu_memory_gib": gpu_memory_gib,
        "host_memory_gib": host_memory_gib,
        "rows": [r.to_dict(gpu_bytes, host_bytes) for r in rows],
        "recommended": None if pick is None else rows.index(pick),
        "why": why,
        "refused": refused,
    }


def _applies(method: str, strategy: str, offload: str, world: int) -> bool:
    """Rows worth showing: fsdp-qlora for QLoRA only; on one GPU, `single` and ZeRO-3 with offload
    (the other strategies shard nothing there); on several, every strategy but `single`."""
    if strategy == "fsdp-qlora" and method != "qlora":
        return False
    if world == 1:
        return strategy == "single" or (strategy == "deepspeed-zero3" and offload != "none")
    return strategy != "single"


def _rank(row: Row) -> tuple[int, int]:
    return METHODS.index(row.method), STRATEGIES.index((row.strategy, row.offload))


def recommend(
    rows: list[Row], gpu_bytes: int | None, host_bytes: int | None = None
) -> tuple[Row | None, str]:
    """The strongest method that fits, with the least sharding and offload that fits it; why, in
    one line."""
    if gpu_bytes is None:
        return None, "no GPU memory given (--gpu-memory GiB): nothing can be said to fit"
    fitting = [r for r in rows if r.fits(gpu_bytes, host_bytes)]
    if not fitting:
        closest = min(rows, key=lambda r: r.peak_bytes, default=None)
        if closest is None:
            return None, "no method and strategy is allowed for this recipe"
        return None, (
            f"nothing fits in {gpu_bytes / GIB:g} GiB per GPU: the smallest is {closest.method} with "
            f"{closest.label} at {closest.peak_bytes / GIB:.1f} GiB; add GPUs, turn on "
            "train.gradient_checkpointing, or lower batch.micro_batch_size / data.max_length"
            + ("; rows with CPU offload need --host-memory GiB to be weighed" if host_bytes is None else "")
        )
    pick = min(fitting, key=_rank)
    lighter = [r for r in rows if r.method == pick.method and _rank(r) < _rank(pick)]
    because = f"; {lighter[0].label} needs {lighter[0].peak_bytes / GIB:.1f} GiB" if lighter else ""
    stronger = [r for r in rows if METHODS.index(r.method) < METHODS.index(pick.method)]
    beyond = ""
    if stronger:
        best = min(stronger, key=lambda r: (r.peak_bytes > gpu_bytes, r.peak_bytes))
        needs = (
            f"{best.host_bytes_per_node / GIB:.0f} GiB of host RAM per node with {best.label}"
            if best.peak_bytes <= gpu_bytes
            else f"{best.peak_bytes / GIB:.1f} GiB per GPU at best ({best.label})"
        )
        beyond = f"; {best.method} needs {needs}"
    return pick, (
        f"{pick.method} with {pick.label}: {pick.peak_bytes / GIB:.2f} of {gpu_bytes / GIB:g} GiB per GPU; the "
        f"strongest method that fits, with the least sharding and offload that fits it{because}{beyond}"
    )


def render(table: Mapping[str, Any]) -> str:
    """The comparison as text for a terminal."""
    gpu, host = table["gpu_memory_gib"], table.get("host_memory_gib")
    head = (
        f"{table['nodes']} node(s) x {table['gpus_per_node']} GPU(s)"
        + (f" of {gpu:g} GiB" if gpu is not None else " (memory unknown: pass --gpu-memory GiB)")
        + (
            f", {host:g} GiB of RAM per node"
            if host is not None
            else "; host RAM unknown (--host-memory GiB)"
        )
    )
    lines = [head, ""]
    header = (
        "",
        "method",
        "strategy",
        "trainable",
        "peak/GPU",
        "train",
        "load",
        "host/node",
        "fits",
        "--set",
    )
    body = []
    for i, r in enumerate(table["rows"]):
        margin = r["margin_gib"]
        if margin is None:
            fits = "-"
        elif margin < 0:
            fits = f"no ({-margin:.1f} over)"
        else:
            fits = {True: "yes", False: "no (host RAM)", None: "host?"}[r["fits"]]
        body.append(
            (
                "*" if i == table["recommended"] else "",
                r["method"],
                r["strategy"] + (" + offload" if r["offload"] != "none" else ""),
                f"{r['trainable_params']:,}",
                f"{r['peak_gib']:.2f} GiB",
                f"{r['train_gib']:.2f}",
                f"{r['load_gib']:.2f}",
                f"{r['host_gib_per_node']:.1f} GiB",
                fits,
                " ".join(f"--set {s}" for s in r["set"]),
            )
        )
    widths = [max(len(str(row[c])) for row in [header, *body]) for c in range(len(header))]
    for row in [header, *body]:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    lines += [
        "",
        f"recommended: {table['why']}" if table["recommended"] is not None else f"note: {table['why']}",
    ]
    return "\n".join(lines) + "\n"
