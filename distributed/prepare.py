"""Tokenise a recipe's data once, before the distributed job starts (`tunefleet prepare RECIPE`).

Without this, every rank of a job reads and tokenises the data itself at start-up; on a large
dataset the ranks then reach the first collective minutes apart and time out. `prepare` writes
the tokenised examples to `<output_dir>/.cache/tokenized-<fingerprint>/` (a `datasets` Arrow
directory per split plus `meta.json`), and `tunefleet.distributed.sft` loads them, memory-mapped,
whenever the same fingerprint finds a cache; otherwise it tokenises by itself as before.

The fingerprint is a SHA-256 over
- the data: every byte of `data.path` and `data.eval_path` (all files of a directory), or the
  dataset name and split for a `datasets` hub name (whose content is not hashed);
- the tokenizer as loaded (the files `save_pretrained` writes, so a hub tokenizer, a local
  directory and the pad token tunefleet sets are all covered);
- the recipe's `data` section (format, max_length, limit, eval split, ...);
- the tokenisation code itself (`distributed/data/`), so a change to the masking rebuilds it.

The cache is written to a temporary directory and renamed into place (a reader sees a whole
cache or none); older caches of the same output directory are deleted after a new one is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunefleet.launch.core.data_identity import hash_data
from tunefleet.launch.core.layout import CACHE_DIR, atomic_dir
from tunefleet.launch.core.recipe import Recipe

CACHE_PREFIX = "tokenized-"
META_FILE = "meta.json"
HEAD_ROWS = 16
"""Raw rows kept in the cache (the first of each split): what `samples.jsonl` prompts are made of."""

_VOLATILE_TOKENIZER_KEYS = ("is_local", "local_files_only", "name_or_path", "cache_dir", "_commit_hash")
"""Keys `save_pretrained` writes that say where a tokenizer came from, not how it tokenises."""


@dataclass
class PreparedData:
    """The tokenised data of a recipe, from the cache or tokenised here."""

    train: Any
    """`datasets.Dataset` of {input_ids, labels}."""

    eval: Any | None
    """The same for the evaluation split, or None."""

    train_stats: dict[str, Any]
    """`build_dataset` statistics of the training split (rows, examples, truncated, tokens, ...)."""

    rows: list[dict]
    """Raw training rows: all of them, or the first HEAD_ROWS when read from the cache."""

    eval_rows: list[dict]
    """Raw evaluation rows, the same way."""

    eval_row_count: int
    """Evaluation rows in total (eval_rows may be only the first ones)."""

    fingerprint: str
    cache_dir: Path | None
    """Where the data came from; None when tokenised in this process."""


# ----------------------------------------------------------------------------- the fingerprint


def _hash_tokenizer(h: Any, tokenizer: Any) -> None:
    with tempfile.TemporaryDirectory(prefix="tunefleet-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if path.name == "tokenizer_config.json":
                config = json.loads(data)
                for key in _VOLATILE_TOKENIZER_KEYS:
                    config.pop(key, None)
                data = json.dumps(config, sort_keys=True).encode()
            h.update(path.name.encode() + b"\0" + data + b"\0")


def fingerprint(recipe: Recipe, tokenizer: Any) -> tuple[str, dict[str, Any]]:
    """The cache key of the tokenised data, and what went into it (written to meta.json)."""
    from tunefleet.distributed import data as data_mod

    d = recipe.data
    h = hashlib.sha256()
    sources = hash_data(h, d)
    _hash_tokenizer(h, tokenizer)
    section = dataclasses.asdict(d)
    h.update(json.dumps(section, sort_keys=True).encode())
    for code in sorted(Path(data_mod.__file__).parent.glob("*.py")):  # the tokenisation code itself
        h.update(code.read_bytes())
    return h.hexdigest()[:16], {"sources": sources, "data": section}


def cache_root(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / CACHE_DIR


def cache_path(recipe: Recipe, fp: str) -> Path:
    return cache_root(recipe) / f"{CACHE_PREFIX}{fp}"


# ----------------------------------------------------------------------------- tokenising


def tokenize(recipe: Recipe, tokenizer: Any, fp: str) -> PreparedData:
    """Read and tokenise the data in this process (what every rank did before the cache)."""
    from datasets import Dataset

    from tunefleet.distributed import data as data_mod

    d = recipe.data
    rows = data_mod.load_rows(d.path, split=d.split, limit=d.limit, what="data.path")
    eval_rows: list[dict] = []
    if d.eval_path:
        eval_rows = data_mod.load_rows(d.eval_path, split=d.split, what="data.eval_path")
    elif d.eval_ratio:
        rows, eval_rows = data_mod.split_eval(rows, d.eval_ratio)
    train, stats = data_mod.build_dataset(rows, cfg=d, tokenizer=tokenizer, where=d.path)
    evaluation = None
    if eval_rows:
        examples, _ = data_mod.build_dataset(
            eval_rows, cfg=d, tokenizer=tokenizer, where=d.eval_path or f"{d.path} (eval split)"
        )
        evaluation = Dataset.from_list(examples)
    return PreparedData(
        train=Dataset.from_list(train),
        eval=evaluation,
        train_stats=stats,
        rows=rows,
        eval_rows=eval_rows,
        eval_row_count=len(eval_rows),
        fingerprint=fp,
        cache_dir=None,
    )


def load_cache(path: Path) -> PreparedData | None:
    """The cache at `path`, or None when there is none (a half-written one is never visible)."""
    if not (path / META_FILE).is_file():
        return None
    from datasets import load_from_disk

    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    return PreparedData(
        train=load_from_disk(str(path / "train")),
        eval=load_from_disk(str(path / "eval")) if meta["eval_examples"] else None,
        train_stats=meta["train_stats"],
        rows=meta["head_rows"],
        eval_rows=meta["head_eval_rows"],
        eval_row_count=meta["eval_rows"],
        fingerprint=meta["fingerprint"],
        cache_dir=path,
    )


def write_cache(prepared: PreparedData, path: Path, inputs: dict[str, Any]) -> Path:
    """Write `prepared` to `path` atomically; delete the output directory's other caches."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # a progress bar per split in every job log says nothing
    with atomic_dir(path, first_wins=True) as tmp:  # a cache written meanwhile is as good as ours
        prepared.train.save_to_disk(str(tmp / "train"))
        if prepared.eval is not None:
            prepared.eval.save_to_disk(str(tmp / "eval"))
        meta = {
            "fingerprint": prepared.fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "train_examples": len(prepared.train),
            "eval_examples": len(prepared.eval) if prepared.eval is not None else 0,
            "eval_rows": prepared.eval_row_count,
            "train_stats": prepared.train_stats,
            "head_rows": prepared.rows[:HEAD_ROWS],
            "head_eval_rows": prepared.eval_rows[:HEAD_ROWS],
            **inputs,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
    for other in path.parent.iterdir():
        if other != path and other.name.startswith((CACHE_PREFIX, f".{CACHE_PREFIX}")):
            shutil.rmtree(other, ignore_errors=True)
    return path


def load_or_tokenize(recipe: Recipe, tokenizer: Any) -> PreparedData:
    """What the trainer calls on every rank: the `tunefleet prepare` cache when it matches the
    recipe, data and tokenizer, else the data tokenised here (nothing is written)."""
    fp, _ = fingerprint(recipe, tokenizer)
    return load_cache(cache_path(recipe, fp)) or tokenize(recipe, tokenizer, fp)


@dataclass(frozen=True)
class PrepareResult:
    path: Path
    hit: bool
    """True when a matching cache existed already (nothing was tokenised)."""
    train_examples: int
    eval_examples: int
    seconds: float


def prepare(recipe: Recipe) -> PrepareResult:
    """`tunefleet prepare`: make sure the cache for this recipe exists; tokenise only if it does not."""
    from tunefleet.distributed import model as model_mod

    started = time.monotonic()
    tokenizer = model_mod.load_tokenizer(model_mod.resolve_model_path(recipe.model), recipe.model)
    fp, inputs = fingerprint(recipe, tokenizer)
    path = cache_path(recipe, fp)
    found = load_cache(path)
    if found is None:
        found = tokenize(recipe, tokenizer, fp)
        write_cache(found, path, inputs)
    return PrepareResult(
        path=path,
        hit=found.cache_dir is not None,
        train_examples=len(found.train),
        eval_examples=len(found.eval) if found.eval is not None else 0,
        seconds=time.monotonic() - started,
    )
