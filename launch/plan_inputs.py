"""What `tunefleet plan` reads from disk before `plan.build_plan` (which is pure): the recipe, the
model's `config.json` (a local directory, the built-in demo model, or the Hugging Face cache;
never the network), cheap row counts of the data (no tokenisation) and the batch of a run already
in the output directory. Part of the command line: it may build the demo model and read data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunefleet.launch.core import recipe as recipe_mod
from tunefleet.launch.core.errors import RecipeError, TunefleetError
from tunefleet.launch.core.layout import RESOLVED_RECIPE
from tunefleet.launch.core.recipe import DataConfig, ModelConfig, Recipe
from tunefleet.launch.core.versions import versions
from tunefleet.launch.params import read_model_config
from tunefleet.launch.plan import DataCounts, build_plan


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
    """Rows in `data.path` (of one source) before `limit` and the evaluation hold-out, counted cheaply, or
    (None, why not). JSON Lines: non-blank lines; JSON: the list's length; Parquet: the row count
    in its footer; a directory: as the trainer reads it. A relative path is looked up in the
    working directory, then next to the recipe (`base_dir`)."""
    path = Path(data.path).expanduser()
    if not path.exists() and base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    if not path.exists():
        if path.suffix.lower() in (".jsonl", ".json", ".parquet") or data.path.startswith((".", "/", "~")):
            places = recipe_mod.data_path_places(data.path)
            if base_dir is not None and not Path(data.path).expanduser().is_absolute():
                places = [(Path(base_dir) / data.path, "next to the recipe")] + [
                    p for p in places if p[1] != "next to the recipe"
                ]
            looked = " and ".join(f"{place} ({name})" for place, name in places)
            return None, f"data file {data.path!r} does not exist (looked for {looked})"
        return None, f"{data.path!r} is not a local file (a Hub dataset is not read by the planner)"
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            from tunefleet.distributed.data import load_rows

            return len(load_rows(str(path), split=data.split)), None
        if suffix == ".jsonl":
            with path.open(encoding="utf-8-sig") as f:
                return sum(1 for line in f if line.strip()), None
        if suffix == ".json":
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not data
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


# ----------------------------------------------------------------------------- the command


def _previous_batch(recipe: Recipe) -> dict[str, Any] | None:
    """The batch of a run already in output_dir (its resolved recipe.yaml), if any."""
    path = Path(recipe.output_dir) / RESOLVED_RECIPE
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
    host_memory_gib: float | None = None,
    compare: bool = False,
) -> dict[str, Any]:
    """Load the recipe, find the model config and count the rows, then `build_plan`; with `compare`,
    every method x strategy too (`compare.compare`). Without `gpu_memory_gib`, this machine's GPUs'
    memory when it has some."""
    for value, name in ((nodes, "--nodes"), (gpus_per_node, "--gpus-per-node")):
        if value < 1:
            raise RecipeError(f"{name} must be >= 1, got {value}", f"pass {name} 1 or more")
    if gpu_memory_gib is not None and not gpu_memory_gib > 0:
        raise RecipeError(
            f"--gpu-memory-gib must be > 0, got {gpu_memory_gib}", "pass the GPU's memory, e.g. 80"
        )
    recipe = recipe_mod.load(recipe_path, list(overrides))
    notes: list[str] = []
    if gpu_memory_gib is None:
        gpu_memory_gib = local_gpu_memory_gib()
        if gpu_memory_gib is not None:
            notes.append(f"GPU memory: {gpu_memory_gib:g} GiB, this machine's (--gpu-memory sets another)")
            if host_memory_gib is None:  # planning for this machine: its RAM too
                host_memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    if host_memory_gib is not None and not host_memory_gib > 0:
        raise RecipeError(
            f"--host-memory must be > 0, got {host_memory_gib}", "pass the node's RAM, e.g. 512"
        )
    model_config: dict[str, Any] | None = None
    if model_config_path:  # asked for explicitly: a missing or broken file is an error
        model_config = read_model_config(model_config_path)
    else:
        try:
            model_config = find_model_config(recipe.model)
        except RecipeError as exc:
            notes.append(f"no parameter counts or memory estimate: {exc.problem} (fix: {exc.fix})")
    rows: list[int] = []
    for source in recipe_mod.data_sources(recipe.data):
        count, why = count_dataset_rows(source.data, base_dir=Path(recipe_path).parent)
        if count is None:
            where = f" ({source.where})" if recipe.data.mixture is not None else ""
            notes.append(f"dataset rows unknown{where}: {why}")
            break
        rows.append(count)
    counts = None
    if len(rows) == len(recipe_mod.data_sources(recipe.data)):
        from tunefleet.distributed.prepare import find_stats

        found = find_stats(recipe)
        if found is not None:
            notes.append(f"truncation and dropped rows as counted by `tunefleet prepare` (cache {found[1]})")
        counts = DataCounts.from_rows(
            rows,
            recipe,
            prepared=found[0] if found else None,
            prepared_sources=[s["examples"] for s in found[2]] if found else (),
        )
    plan = build_plan(
        recipe,
        nodes=nodes,
        procs_per_node=gpus_per_node,
        data=counts,
        model_config=model_config,
        recipe_path=recipe_path,
        overrides=overrides,
        previous_batch=_previous_batch(recipe),
        gpu_memory_gib=gpu_memory_gib,
        notes=notes,
    )
    if compare or (
        gpu_memory_gib is not None and model_config is not None and not _fits(plan, gpu_memory_gib)
    ):
        if model_config is None:
            raise RecipeError(
                "--compare needs the model's config.json (parameter counts and memory)",
                "fetch it (`hf download MODEL config.json`) or pass --model-config",
            )
        table = compare_rows(recipe, model_config, nodes, gpus_per_node, gpu_memory_gib, host_memory_gib)
        if compare:
            plan["compare"] = table
        elif table["recommended"] is not None:  # the recipe's own choice does not fit: which row does
            row = table["rows"][table["recommended"]]
            plan["warnings"].append(
                f"this recipe does not fit; what does: {' '.join('--set ' + s for s in row['set'])} "
                f"({table['why']}; all rows: tunefleet plan ... --compare)"
            )
    return {**plan, "versions": versions()}


def _fits(plan: dict[str, Any], gpu_memory_gib: float) -> bool:
    peaks = [plan[k]["total_gib"] for k in ("memory",) if plan.get(k)]
    peaks += [plan["load_memory"]["gpu"]["total_gib"]] if plan.get("load_memory") else []
    return not peaks or max(peaks) <= gpu_memory_gib


def compare_rows(
    recipe: Recipe,
    model_config: dict[str, Any],
    nodes: int,
    gpus_per_node: int,
    gpu_memory_gib: float | None,
    host_memory_gib: float | None = None,
) -> dict[str, Any]:
    """`compare.compare` with the parameter counts made once per method (on the meta device)."""
    from tunefleet.launch.compare import compare
    from tunefleet.launch.plan import model_counts

    cache: dict[tuple[Any, ...], Any] = {}

    def counts(variant: Recipe) -> Any:
        key = (variant.peft.method, variant.model.quantization, variant.peft.trainable_layers)
        if key not in cache:
            cache[key] = model_counts(variant, model_config)
        return cache[key]

    return compare(
        recipe,
        model_config,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        gpu_memory_gib=gpu_memory_gib,
        host_memory_gib=host_memory_gib,
        counts=counts,
    )


def local_gpu_memory_gib() -> float | None:
    """The memory of this machine's first GPU in GiB, or None without one (torch only when it is
    already installed with CUDA: the planner never needs a GPU)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.get_device_properties(0).total_memory / 1024**3, 1)
