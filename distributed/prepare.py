"""The tokenised data of a recipe, made once and memory-mapped by every rank.

`tunefleet prepare RECIPE`, or else the first rank of a run, tokenises the data
(`data.parallel.build`: batched, on several processes) into
`<output_dir>/.cache/tokenized-<fingerprint>/` (Arrow shards per split plus `meta.json`; a
mixture's sources are tokenised one by one, each with its own format, and laid end to end, their
example counts recorded in `meta.json` for the sampler); the
other ranks wait for it (`wait_for_cache`) and every rank memory-maps it. A later run with the
same inputs finds it (a cache hit).

The fingerprint is a SHA-256 over
- the data: every byte of `data.path` (or of every `data.mixture` source) and `data.eval_path`
  (all files of a directory), or the dataset name and split for a `datasets` hub name (whose
  content is not hashed);
- the tokenizer as loaded (the files `save_pretrained` writes, so a hub tokenizer, a local
  directory and the pad token tunefleet sets are all covered);
- the recipe's `data` section (format, max_length, limit, eval split, ...; not `num_proc`, which
  does not change the tokens);
- the tokenisation code itself (`distributed/data/`), so a change to the masking rebuilds it.

The cache is written to a temporary directory and renamed into place (a reader sees a whole
cache or none); older caches of the same output directory are deleted after a new one is complete.
While the first rank tokenises, it keeps a progress file next to the cache up to date; a failure
leaves a `.failed` file with its error, so the waiting ranks stop at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunefleet.launch.core.data_identity import hash_data
from tunefleet.launch.core.errors import DataError
from tunefleet.launch.core.layout import CACHE_DIR, ENV_PREPARE_WAIT_S, atomic_dir, atomic_write
from tunefleet.launch.core.recipe import DataConfig, DataSource, Recipe, data_sources

CACHE_PREFIX = "tokenized-"
META_FILE = "meta.json"
HEAD_ROWS = 16
"""Raw rows kept in the cache (the first of each split): what `samples.jsonl` prompts are made of."""

HEAD_ROW_CHARS = 100_000
"""A head row longer than this (as JSON) is not kept: meta.json stays small whatever the data."""

WAIT_S = 1800.0
"""How long the other ranks wait without a sign of progress (ENV_PREPARE_WAIT_S overrides it)."""

_VOLATILE_TOKENIZER_KEYS = ("is_local", "local_files_only", "name_or_path", "cache_dir", "_commit_hash")
"""Keys `save_pretrained` writes that say where a tokenizer came from, not how it tokenises."""

_NOT_IN_KEY = ("num_proc",)
"""Data settings that do not change the tokens."""


@dataclass
class PreparedData:
    """The tokenised data of a recipe, memory-mapped from its cache."""

    train: Any
    """`datasets.Dataset` of {input_ids, labels}."""

    eval: Any | None
    """The same for the evaluation split, or None."""

    train_stats: dict[str, Any]
    """What tokenising the training split kept, cut and dropped (`data.counts.Tally.to_dict()`)."""

    rows: list[dict]
    """The first raw training rows (HEAD_ROWS)."""

    eval_rows: list[dict]
    """The first raw evaluation rows."""

    eval_row_count: int
    """Evaluation rows in total (eval_rows are only the first ones)."""

    fingerprint: str
    cache_dir: Path
    built: dict[str, Any] | None = None
    """How this process made the cache (seconds, processes, notes), or None when it was found."""

    eval_stats: dict[str, Any] = field(default_factory=dict)

    train_sources: list[dict[str, Any]] = field(default_factory=list)
    """Per training source, in order (its examples laid end to end in `train`): recipe key, path,
    format, weight, rows and examples kept."""

    @property
    def source_examples(self) -> list[int]:
        """Examples of every training source: the sizes the mixture sampler shares an epoch out over."""
        return [s["examples"] for s in self.train_sources]


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


def _digests(recipe: Recipe) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
    """Everything in the key but the tokenizer: (digests, how the sources were hashed, the section)."""
    from tunefleet.distributed import data as data_mod

    d = recipe.data
    h = hashlib.sha256()
    sources = hash_data(h, d)
    section = {k: v for k, v in dataclasses.asdict(d).items() if k not in _NOT_IN_KEY}
    code = hashlib.sha256()
    for path in sorted(Path(data_mod.__file__).parent.glob("*.py")):  # the tokenisation code itself
        code.update(path.read_bytes())
    digests = {
        "data": h.hexdigest(),
        "section": hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest(),
        "code": code.hexdigest(),
    }
    return digests, sources, section


def fingerprint(recipe: Recipe, tokenizer: Any) -> tuple[str, dict[str, Any]]:
    """The cache key of the tokenised data, and what went into it (written to meta.json)."""
    digests, sources, section = _digests(recipe)
    h = hashlib.sha256()
    _hash_tokenizer(h, tokenizer)
    digests["tokenizer"] = h.hexdigest()
    key = hashlib.sha256("\0".join(digests[k] for k in sorted(digests)).encode()).hexdigest()[:16]
    model = {"name_or_path": recipe.model.name_or_path, "revision": recipe.model.revision}
    return key, {"sources": sources, "data": section, "digests": digests, "model": model}


def cache_root(recipe: Recipe) -> Path:
    return Path(recipe.output_dir) / CACHE_DIR


def cache_path(recipe: Recipe, fp: str) -> Path:
    return cache_root(recipe) / f"{CACHE_PREFIX}{fp}"


def _marker(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}")


# ----------------------------------------------------------------------------- reading the cache


def _shard_files(path: Path, meta: dict[str, Any]) -> list[str]:
    """The cache's Arrow files, relative to `path`, as meta.json lists them."""
    return [f"train/{s}" for s in meta["train_shards"]] + [f"eval/{s}" for s in meta["eval_shards"]]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksums(path: Path, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every shard of the cache at `path` (recorded in meta.json when it is made)."""
    return {
        rel: {"bytes": (path / rel).stat().st_size, "sha256": _file_digest(path / rel)}
        for rel in _shard_files(path, meta)
    }


def _read_meta(path: Path) -> Any:
    """The cache's meta.json, or None when it cannot be read (missing, torn)."""
    try:
        return json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cache_problem(path: Path, meta: Any = None) -> str | None:
    """Why the complete cache at `path` cannot be trusted (None: it can). Every shard's size and
    checksum against meta.json (`meta`: as already read, else read here): a truncated, missing or
    rewritten shard, or a torn meta.json. Every rank checks before it maps the cache (it reads those
    bytes anyway). A cache written before checksums were recorded is checked for its files only."""
    if meta is None:
        meta = _read_meta(path)
    try:
        files = _shard_files(path, meta)
    except (KeyError, TypeError):
        return f"{META_FILE} cannot be read"
    recorded = meta.get("checksums")
    for rel in files:
        try:
            size = (path / rel).stat().st_size
            if recorded is None:
                continue
            want = recorded.get(rel) or {}
            if size != want.get("bytes"):
                return f"{rel} holds {size:,} bytes, {META_FILE} says {want.get('bytes')}"
            if _file_digest(path / rel) != want.get("sha256"):
                return f"{rel} does not match its checksum in {META_FILE} (its bytes changed)"
        except OSError:
            return f"{rel} is missing"
    return None


def load_cache(path: Path) -> PreparedData | None:
    """The cache at `path`, memory-mapped, or None when there is none (a half-written one is
    never visible) or it is damaged (`cache_problem`: the first rank rebuilds it)."""
    return _open_cache(path)[0]


def _open_cache(path: Path) -> tuple[PreparedData | None, str | None]:
    """(the cache mapped, None); (None, None) when there is none; (None, why) when it is damaged."""
    if not (path / META_FILE).is_file():
        return None, None
    meta = _read_meta(path)
    problem = cache_problem(path, meta)
    return (None, problem) if problem is not None else (_mapped(path, meta), None)


def _mapped(path: Path, meta: dict[str, Any]) -> PreparedData:
    """The checked cache at `path` with its meta.json, memory-mapped."""
    from tunefleet.distributed.data import parallel

    return PreparedData(
        train=parallel.load(path / "train", meta["train_shards"]),
        eval=parallel.load(path / "eval", meta["eval_shards"]) if meta["eval_shards"] else None,
        train_stats=meta["train_stats"],
        eval_stats=meta["eval_stats"],
        rows=meta["head_rows"],
        eval_rows=meta["head_eval_rows"],
        eval_row_count=meta["eval_rows"],
        fingerprint=meta["fingerprint"],
        cache_dir=path,
        train_sources=meta.get("train_sources")  # a cache written before mixtures: one source
        or [{"where": "data.path", "rows": meta["train_stats"]["rows"], "examples": meta["train_examples"]}],
    )


def find_stats(recipe: Recipe) -> tuple[dict[str, Any], str, list[dict[str, Any]]] | None:
    """The training split's counts from a cache of this output directory made from the same data
    bytes, data settings, tokenisation code and model (by name: the tokenizer is not loaded), the
    cache's name and its per-source counts (empty in a cache written before mixtures); None when
    there is none. For `tunefleet plan`, which never loads a model."""
    root = cache_root(recipe)
    metas = sorted(root.glob(f"{CACHE_PREFIX}*/{META_FILE}")) if root.is_dir() else []
    if not metas:
        return None
    digests, _, _ = _digests(recipe)
    model = {"name_or_path": recipe.model.name_or_path, "revision": recipe.model.revision}
    for path in metas:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        same = all(meta.get("digests", {}).get(k) == v for k, v in digests.items())
        if same and meta.get("model") == model:
            return meta["train_stats"], path.parent.name, meta.get("train_sources", [])
    return None


# ----------------------------------------------------------------------------- making the cache


def _head(rows: list[dict]) -> list[dict]:
    return [r for r in rows[:HEAD_ROWS] if len(json.dumps(r, default=str)) <= HEAD_ROW_CHARS]


def _build(
    recipe: Recipe, tokenizer: Any, fp: str, inputs: dict[str, Any], path: Path, *, show: bool
) -> None:
    """Read and tokenise the data into the cache at `path` (atomically)."""
    started = time.monotonic()
    # an earlier build of this cache killed midway (the output directory's lock is held: nobody
    # else builds here now) left its temporary directory: tunefleet's own unfinished write
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    beat = _Heartbeat(_marker(path, "progress"))
    beat("reading the data")
    splits = _read_splits(recipe.data)
    with atomic_dir(path, first_wins=True) as tmp:  # a cache written meanwhile is as good as ours
        built = {
            name: _tokenise_split(name, parts, recipe.data, tokenizer, tmp, beat, show=show)
            for name, parts in splits.items()
            if parts
        }
        train, evaluation = built["train"], built.get("eval")
        meta = {
            "fingerprint": fp,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.monotonic() - started, 3),
            "procs": train.procs,
            "notes": [n for b in built.values() for n in b.notes],
            "train_shards": train.shards,
            "eval_shards": evaluation.shards if evaluation else [],
            "train_examples": train.stats["examples"],
            "eval_examples": evaluation.stats["examples"] if evaluation else 0,
            "eval_rows": sum(len(rows) for _, rows in splits["eval"]),
            "train_stats": train.stats,
            "eval_stats": evaluation.stats if evaluation else {},
            "train_sources": train.sources,
            "eval_sources": evaluation.sources if evaluation else [],
            # the samples' prompts come from the first source (one format)
            "head_rows": _head(splits["train"][0][1]),
            "head_eval_rows": _head(splits["eval"][0][1]) if splits["eval"] else [],
            **inputs,
        }
        meta["checksums"] = checksums(tmp, meta)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
    for other in path.parent.iterdir():  # superseded caches (and their leftovers), not this one's
        if fp not in other.name and other.name.startswith((CACHE_PREFIX, f".{CACHE_PREFIX}")):
            if other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
            else:
                other.unlink(missing_ok=True)


Part = tuple[DataSource, list[dict]]
"""The rows of one source in one split."""


def _read_splits(d: DataConfig) -> dict[str, list[Part]]:
    """The rows of every source, split into training and evaluation rows: `data.eval_path` is one
    evaluation source (read in data.format); `data.eval_ratio` holds out the first rows of each
    training source."""
    from tunefleet.distributed import data as data_mod

    splits: dict[str, list[Part]] = {"train": [], "eval": []}
    for source in data_sources(d):
        rows = data_mod.load_rows(source.data.path, split=d.split, limit=source.data.limit, what=source.where)
        if d.eval_ratio and not d.eval_path:
            try:
                rows, held_out = data_mod.split_eval(rows, d.eval_ratio)
            except DataError as exc:
                raise DataError(f"{source.where}={source.data.path!r}: {exc.problem}", exc.fix) from None
            splits["eval"].append((source, held_out))
        splits["train"].append((source, rows))
    if d.eval_path:
        eval_source = DataSource(
            "data.eval_path", dataclasses.replace(d, path=d.eval_path, mixture=None), 1.0
        )
        splits["eval"] = [
            (eval_source, data_mod.load_rows(d.eval_path, split=d.split, what="data.eval_path"))
        ]
    return splits


@dataclass(frozen=True)
class _BuiltSplit:
    """A split tokenised source by source: its shards laid end to end, in source order."""

    shards: list[str]
    stats: dict[str, int]
    procs: int
    notes: list[str]
    sources: list[dict[str, Any]]
    """Per source: recipe key, path, format, rows and the examples kept (the sampler's sizes)."""


def _tokenise_split(
    name: str, parts: list[Part], d: DataConfig, tokenizer: Any, tmp: Path, beat: _Heartbeat, *, show: bool
) -> _BuiltSplit:
    """Tokenise split `name` source by source, each with its own format, into `tmp/name` (a
    mixture's sources each in `source-<i>/`); their counts add up to the split's."""
    from tunefleet.distributed.data import parallel
    from tunefleet.distributed.data.counts import Tally
    from tunefleet.distributed.data.progress import RowProgress

    tally, shards, notes, sources, procs = Tally(), [], [], [], 1
    for i, (source, rows) in enumerate(parts):
        sub = f"source-{i}" if d.mixture is not None else ""  # shard names are per source
        where = source.data.path if name == "train" or d.eval_path else f"{source.data.path} (eval split)"
        label = f"tokenising {name}" + (f" ({source.where})" if sub else "")
        built = parallel.build(
            rows,
            cfg=source.data,
            tokenizer=tokenizer,
            where=where,
            out_dir=tmp / name / sub,
            procs=parallel.default_procs(len(rows), d.num_proc),
            display=RowProgress(len(rows), label) if show else None,
            on_rows=beat.counter(label, len(rows)),
        )
        tally.merge(built.stats)
        shards += [f"{sub}/{s}" if sub else s for s in built.shards]
        notes += [n for n in built.notes if n not in notes]
        procs = max(procs, built.procs)
        sources.append(
            {
                "where": source.where,
                "path": source.data.path,
                "format": source.data.format,
                "weight": source.weight,
                "rows": built.stats["rows"],
                "examples": built.stats["examples"],
            }
        )
    return _BuiltSplit(shards=shards, stats=tally.to_dict(), procs=procs, notes=notes, sources=sources)


class _Heartbeat:
    """The progress file the waiting ranks watch (written at most once a second)."""

    def __init__(self, path: Path) -> None:
        self.path, self.last = path, 0.0

    def __call__(self, phase: str, done: int = 0, total: int = 0) -> None:
        now = time.monotonic()
        if now - self.last >= 1.0 or done == total:
            self.last = now
            atomic_write(
                self.path, json.dumps({"phase": phase, "rows_done": done, "rows": total, "pid": os.getpid()})
            )

    def counter(self, phase: str, total: int) -> Any:
        """`on_rows` for one split: rows done -> a beat."""
        return lambda done: self(phase, done, total)


def make_cache(
    recipe: Recipe, tokenizer: Any, *, show: bool = True, others_wait: bool = False
) -> PreparedData:
    """The cache of this recipe: found, or made here (its time, processes and notes in `built`).
    On a failure, with `others_wait` (ranks of the same run waiting for it) the error is left in a
    `.failed` file next to the cache for them; without, the directories made here are removed
    again (a refused command leaves nothing behind). Then it is raised."""
    fp, inputs = fingerprint(recipe, tokenizer)
    path = cache_path(recipe, fp)
    found, problem = _open_cache(path)
    if found is not None:
        return found
    if path.exists():  # tunefleet's own derived data, damaged: made again from the data
        problem = problem or f"{META_FILE} is missing"
        print(
            f"note: the tokenised cache {path} is damaged ({problem}): tokenising the data again", flush=True
        )
        shutil.rmtree(path)
    failed = _marker(path, "failed")
    failed.unlink(missing_ok=True)
    made_dirs = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    started = time.monotonic()
    try:
        _build(recipe, tokenizer, fp, inputs, path, show=show)
    except Exception as exc:
        _marker(path, "progress").unlink(missing_ok=True)
        if others_wait:
            atomic_write(failed, f"{type(exc).__name__}: {exc}")
        else:
            for directory in made_dirs:
                try:
                    directory.rmdir()
                except OSError:  # not empty: something else is in it now
                    break
        raise
    finally:
        _marker(path, "progress").unlink(missing_ok=True)
    # mapped without hashing the shards again: their checksums were just taken from these bytes
    meta = _read_meta(path)
    made = _mapped(path, meta)
    made.built = {"seconds": time.monotonic() - started, "procs": meta["procs"], "notes": meta["notes"]}
    return made


def wait_for_cache(recipe: Recipe, tokenizer: Any, *, poll_s: float = 0.5) -> PreparedData:
    """What every rank but the first does: wait until the first rank's cache is complete, then
    memory-map it. DataError when the first rank failed, or showed no progress for
    ENV_PREPARE_WAIT_S seconds."""
    started_wall, started = time.time(), time.monotonic()  # before hashing: the first rank hashes too
    fp, _ = fingerprint(recipe, tokenizer)
    path = cache_path(recipe, fp)
    limit_s = float(os.environ.get(ENV_PREPARE_WAIT_S, WAIT_S))
    progress, failed = _marker(path, "progress"), _marker(path, "failed")
    seen: Any = None
    changed = started
    while True:
        found = load_cache(path)
        if found is not None:
            return found
        # a failure of this launch's first rank (not one left by an earlier launch; 30 s for clocks)
        if failed.is_file() and failed.stat().st_mtime >= started_wall - 30:
            raise DataError(
                f"the first rank could not tokenise the data: {failed.read_text(encoding='utf-8').strip()}",
                "see the first rank's error above and fix it",
            )
        try:
            stamp: Any = (progress.stat().st_mtime_ns, progress.read_text(encoding="utf-8"))
        except OSError:
            stamp = None
        if stamp != seen:
            seen, changed = stamp, time.monotonic()
        if time.monotonic() - changed > limit_s:
            raise DataError(
                f"waited {time.monotonic() - started:.0f} s for the first rank to tokenise the data into "
                f"{path}, {limit_s:.0f} s of them without any sign of progress",
                f"run `tunefleet prepare RECIPE` before the job (every rank then reads its cache), check the "
                f"first rank's log, or raise {ENV_PREPARE_WAIT_S}; on several machines, output_dir must be "
                "on storage that all of them share",
            )
        time.sleep(poll_s)


def load_or_prepare(
    recipe: Recipe, tokenizer: Any, *, main: bool, world_size: int, show: bool = True
) -> PreparedData:
    """What every rank of a run calls: the first rank finds or makes the cache, the others wait
    for it; all of them memory-map it."""
    if main:
        return make_cache(recipe, tokenizer, show=show, others_wait=world_size > 1)
    return wait_for_cache(recipe, tokenizer)


def keep_cache(moved: Path, out: Path) -> None:
    """After `--overwrite` moved the old run aside: the tokenised data comes back (it is keyed by
    its inputs, not by the run, and this run has it memory-mapped already)."""
    if (moved / CACHE_DIR).is_dir() and not (out / CACHE_DIR).exists():
        out.mkdir(parents=True, exist_ok=True)
        (moved / CACHE_DIR).rename(out / CACHE_DIR)


@dataclass(frozen=True)
class PrepareResult:
    path: Path
    hit: bool
    """True when a matching cache existed already (nothing was tokenised)."""
    train_examples: int
    eval_examples: int
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    """What tokenising the training split kept, cut and dropped."""
    procs: int = 1
    notes: list[str] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Rows and examples of each training source (`PreparedData.train_sources`)."""


def prepare(recipe: Recipe, *, show: bool = True) -> PrepareResult:
    """`tunefleet prepare`: make sure the cache for this recipe exists; tokenise only if it does not."""
    from tunefleet.distributed import model as model_mod

    started = time.monotonic()
    tokenizer = model_mod.load_tokenizer(model_mod.resolve_model_path(recipe.model), recipe.model)
    found = make_cache(recipe, tokenizer, show=show)
    return PrepareResult(
        path=found.cache_dir,
        hit=found.built is None,
        train_examples=len(found.train),
        eval_examples=len(found.eval) if found.eval is not None else 0,
        seconds=time.monotonic() - started,
        stats=found.train_stats,
        procs=found.built["procs"] if found.built else 0,
        notes=found.built["notes"] if found.built else [],
        sources=found.train_sources,
    )
