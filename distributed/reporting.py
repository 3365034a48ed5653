"""What a run shows and records: metrics.jsonl, the rich progress bar, the summary tables, loss.png."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tunefleet.launch import prep_report
from tunefleet.launch.core.layout import FINAL_DIR, LOSS_PLOT, METRICS_FILE, read_jsonl
from tunefleet.launch.core.recipe import stats_format
from tunefleet.launch.core.versions import one_line
from tunefleet.launch.params import describe_method
from tunefleet.launch.plan import mixture_rows


class MetricsCallback(TrainerCallback):
    """Appends one JSON object per logged optimizer step (and per evaluation) to metrics.jsonl.

    Logs are enriched by the trainer with samples_seen/tokens_seen before they reach here.
    Only the main process writes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.monotonic()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not logs:
            return
        peaks = peak_memory_per_rank()  # collective: every rank logs at the same steps
        if not state.is_world_process_zero:
            return
        row: dict[str, Any] = {"step": state.global_step}
        if "loss" in logs:
            row.update(
                loss=logs["loss"],
                lr=logs.get("learning_rate"),
                grad_norm=logs.get("grad_norm"),
                samples_seen=logs.get("samples_seen"),
                tokens_seen=logs.get("tokens_seen"),
                epoch=logs.get("epoch"),
            )
        elif "eval_loss" in logs:
            row.update(eval_loss=logs["eval_loss"], epoch=logs.get("epoch"))
        else:
            return
        row["peak_memory_gib"] = peaks
        row["elapsed_s"] = round(time.monotonic() - self.start, 3)
        row["time"] = round(time.time(), 3)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class ProgressCallback(TrainerCallback):
    """A rich progress bar with ETA and the last loss, on the main process only."""

    def __init__(self) -> None:
        self.progress: Any = None
        self.task: Any = None
        self.last_loss: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[loss]}"),
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, loss=""
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            loss = "" if self.last_loss is None else f"loss {self.last_loss:.4f}"
            self.progress.update(self.task, completed=state.global_step, loss=loss)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None


def peak_memory_gib() -> float:
    """This process's peak memory so far, in GiB: on a GPU the allocator's peak
    (`torch.cuda.max_memory_allocated`: the tensors, as the plan estimates them), on a CPU the
    process's peak resident memory (`ru_maxrss`: everything the process held, Python included, and
    the freed blocks glibc keeps in its heaps)."""
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 1024**3, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)  # KiB on Linux


def peak_memory_per_rank() -> list[float]:
    """Collective when distributed (every rank calls it): `peak_memory_gib` of every rank, by rank."""
    return [float(x) for x in per_rank(peak_memory_gib())]


def optimizer_state_elements(optimizer: Any) -> int:
    """Elements of optimizer state this rank holds (its shard under FSDP2 or ZeRO): the torch
    optimizer inside the wrappers (accelerate's, DeepSpeed's), every tensor of its state."""
    inner = optimizer
    while getattr(inner, "optimizer", None) is not None and inner.optimizer is not inner:
        inner = inner.optimizer
    total = 0
    for state in getattr(inner, "state", {}).values():
        for value in state.values():
            local = value.to_local() if hasattr(value, "to_local") else value
            if hasattr(local, "numel") and local.dim() > 0:
                total += int(local.numel())
    return total


def per_rank(value: float) -> list[float]:
    """Collective when distributed (every rank calls it): `value` of every rank, by rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return list(every)


def peak_gpu_memory_gib() -> float | None:
    """The most GPU memory this rank's tensors have held so far (torch's allocator), or None on CPU.

    Recorded in plan.json after loading (`in_effect.gpu_peak_after_load_gib`) and at the end
    (`in_effect.gpu_peak_gib`), to set beside the plan's estimates."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 1024**3, 3)


def record_in_effect(plan_path: Path, **values: Any) -> None:
    """Add values to plan.json's `in_effect` (rank 0, after the run started)."""
    from tunefleet.launch.core.layout import write_json

    if not plan_path.exists():
        return
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    plan.setdefault("in_effect", {}).update(values)
    write_json(plan_path, plan)


def plot_loss(metrics_path: Path, out_path: Path) -> None:
    """Plot training (and evaluation) loss against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", marker="." if len(train) < 50 else None)
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over answer tokens)")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    """A one-screen two-column summary."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left", expand=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def batching_line(batching: dict[str, Any]) -> str:
    """How the micro batches are made, and the padding they cost (epoch 1)."""
    if batching["padding_free"]:
        order = "grouped by length, " if batching["group_by_length"] else ""
        return (
            f"padding-free: {order}each micro batch packed into one row (samples kept apart by position_ids)"
        )
    ratio = batching["padded_token_ratio"]
    if batching["group_by_length"]:
        return (
            f"micro batches grouped by length: padded tokens {ratio:.2f}x the real ones "
            f"({batching['padded_token_ratio_in_order']:.2f}x in sampler order)"
        )
    return f"micro batches in sampler order: padded tokens {ratio:.2f}x the real ones"


def start_rows(
    checked: Any,
    schedule: Any,
    data: Any,
    precision: Any,
    expected: Any,
    *,
    trainable: int,
    total: int,
    batching: dict[str, Any],
    warnings: list[str],
    mixture: list[dict[str, Any]] | None = None,
) -> list[tuple[str, str]]:
    """The run summary printed before the first step (`checked`: the preflight's result; `mixture`:
    the plan's per-source table)."""
    recipe, batch = checked.recipe, checked.batch
    p, d = recipe.peft, recipe.data
    device = "CPU" if precision.use_cpu else "GPU"
    return [
        ("model", f"{recipe.model.name_or_path} ({precision.dtype}, {precision.mode}, {device})"),
        ("method", describe_method(p, recipe.model.quantization)),
        ("parameters", f"{trainable:,} trainable of {total:,} ({100 * trainable / total:.3f}%)"),
        (
            "data",
            (f"{d.path} [{d.format}]: " if d.mixture is None else f"mixture of {len(d.mixture)} sources: ")
            + f"{data.train_stats['rows']} rows -> {len(data.train)} examples"
            + (f", {len(data.eval)} eval" if data.eval is not None else ""),
        ),
        *mixture_rows(mixture, "examples"),
        *prep_report.lines(data.train_stats, max_length=d.max_length, fmt=stats_format(d)),
        *[
            ("warning", w)
            for w in prep_report.warnings(data.train_stats, max_length=d.max_length, fmt=stats_format(d))
        ],
        (
            "batch",
            f"micro {batch.micro_batch_size} x accum {batch.grad_accum_steps} x world "
            f"{batch.world_size} = global {batch.global_batch_size} samples/step",
        ),
        ("batching", batching_line(batching)),
        (
            "schedule",
            f"{schedule.steps_per_epoch} steps/epoch ({schedule.dropped_rows_per_epoch} samples of the last "
            f"incomplete global batch dropped per epoch), {schedule.total_steps} steps, "
            f"{schedule.warmup_steps} warm-up",
        ),
        (
            "distributed",
            f"{recipe.parallel.strategy}: {expected.distributed_type} x {batch.world_size} ({expected.source}; "
            "sharding checked when training starts, recorded in plan.json)",
        ),
        *[("compat", note) for note in checked.notes],
        *[("warning", w) for w in warnings],
        ("output", recipe.output_dir),
        ("versions", one_line()),
    ]


def _final_loss(trainer: Any, result: Any) -> str:
    """Where the run ended up (the last logged training loss) and the mean over this attempt."""
    trained = trainer.state.global_step - trainer.steps_before_this_attempt()
    if not trained:
        return "no step left to train: the checkpoint was written at the last step"
    logged = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    if not logged:
        return f"{result.training_loss:.4f} (mean over this attempt's {trained} step(s))"
    return f"{logged[-1]:.4f} (last logged step; mean over this attempt's {trained} step(s) {result.training_loss:.4f})"


def _peaks_line(peaks: list[float]) -> str:
    """The peak memory of every rank (GPU: the allocator's peak; CPU: the process's peak RSS)."""
    import torch

    kind = "GPU allocator peak" if torch.cuda.is_available() else "peak resident memory"
    shown = ", ".join(f"rank {r}: {g:.2f}" for r, g in enumerate(peaks[:8])) + (
        ", ..." if len(peaks) > 8 else ""
    )
    return f"{max(peaks):.2f} GiB at most ({kind}; {shown} GiB)"


def done_rows(
    trainer: Any,
    result: Any,
    out: Path,
    *,
    elapsed_s: float,
    eval_loss: float | None,
    samples: str,
    peak_memory_gib: list[float],
    what: str = "adapter",
) -> list[tuple[str, str]]:
    """The summary printed after the last step (`what`: `adapter` or `model`, what final/ holds)."""
    train_s = result.metrics.get("train_runtime", elapsed_s)
    tokens = trainer.state.num_input_tokens_seen
    return [
        ("steps", f"{trainer.state.global_step}"),
        ("final loss", _final_loss(trainer, result)),
        ("time", f"{elapsed_s:.1f} s total, {train_s:.1f} s training"),
        ("throughput", f"{tokens / max(train_s, 1e-9):,.0f} tokens/s ({tokens:,} tokens)"),
        *([("eval loss", f"{eval_loss:.4f} (last evaluation)")] if eval_loss is not None else []),
        (what, str(out / FINAL_DIR)),
        ("peak memory", _peaks_line(peak_memory_gib)),
        ("metrics", f"{out / METRICS_FILE}, {out / LOSS_PLOT}"),
        ("samples", samples),
    ]
