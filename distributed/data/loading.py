"""Reading a data source into rows: local JSON Lines / JSON / Parquet files, directories of
them, `datasets.save_to_disk` directories and `datasets` dataset names; and the evaluation
hold-out. Every failure is one DataError naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunefleet.launch.core.batch import held_out_rows
from tunefleet.launch.core.errors import DataError
from tunefleet.launch.core.recipe import data_path_places

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
"""File types read from local files and from directories of data files."""

_KNOWN_SPLITS = ("train", "test", "validation", "valid", "eval", "dev")


def load_rows(
    path: str, *, split: str = "train", limit: int | None = None, what: str = "data.path"
) -> list[dict]:
    """Read the rows of a data source as a list of dicts.

    `path` is a local ``.jsonl``/``.json``/``.parquet`` file, a directory written by
    ``datasets.save_to_disk`` (a ``DatasetDict`` gives `split`), a directory of data files
    (the files named after `split`, or all of them for ``train`` when none is named after a
    split), or else a `datasets` dataset name loaded with ``load_dataset(path, split=split)``.
    `limit` keeps the first N rows. `what` names the recipe key in error messages.
    Raises :class:`DataError` (problem + fix) for anything missing, unreadable, malformed or empty.
    """
    if limit is not None and limit <= 0:
        raise DataError(f"{what}: limit must be > 0, got {limit}", "drop the limit or use a positive count")
    text = str(path).strip()
    if not text:
        raise DataError(f"{what} is empty", f"set {what} to a data file, a directory or a dataset name")
    local = Path(os.path.expanduser(text))
    if local.is_file():
        rows = _read_file(local, limit=limit, what=what)
    elif local.is_dir():
        rows = _read_dir(local, split=split, limit=limit, what=what)
    elif local.exists():
        raise DataError(f"{what}: {text!r} is neither a file nor a directory", f"point {what} at a data file")
    elif _looks_like_path(text):
        looked = " and ".join(f"{place} ({name})" for place, name in data_path_places(text))
        raise DataError(
            f"{what}: data file {text!r} does not exist (looked for {looked})",
            f"fix {what}: give the path of a {'/'.join(DATA_SUFFIXES)} file or a dataset directory",
        )
    else:
        rows = _read_hub(text, split=split, limit=limit, what=what)
    if not rows:
        raise DataError(
            f"{what}: {text!r} holds no rows", f"point {what} at a file with at least one example"
        )
    return rows


def _looks_like_path(text: str) -> bool:
    if text.startswith(("/", "./", "../", "~", ".\\")) or "\\" in text:
        return True
    suffixes = "".join(Path(text).suffixes).lower()
    return any(suffixes.endswith(s) for s in (*DATA_SUFFIXES, ".csv", ".txt", ".arrow", ".gz"))


def _read_file(path: Path, *, limit: int | None, what: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, limit=limit, what=what)
    if suffix == ".json":
        return _read_json(path, limit=limit, what=what)
    if suffix == ".parquet":
        return _read_parquet(path, limit=limit, what=what)
    raise DataError(
        f"{what}: {str(path)!r} has an unsupported file type {suffix or '(no suffix)'!r}",
        f"convert it to one of {', '.join(DATA_SUFFIXES)} (one JSON object per line: .jsonl)",
    )


def _open_text(path: Path, what: str) -> str:
    try:  # utf-8-sig: a byte-order mark that some editors write at the start is not data
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{what}: {str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason})",
            "re-save the file as UTF-8",
        ) from None
    except OSError as exc:
        raise DataError(
            f"{what}: {str(path)!r} cannot be read: {exc.strerror or exc}",
            "check the path and the file permissions",
        ) from None


def _check_object(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: expected a JSON object (one example), got {type(obj).__name__} {short_repr(obj)}",
            'write each example as an object, e.g. {"instruction": ..., "output": ...}',
        )
    return obj


def _read_jsonl(path: Path, *, limit: int | None, what: str) -> list[dict]:
    rows: list[dict] = []
    text = _open_text(path, what)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if limit is not None and len(rows) >= limit:
            break
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: malformed JSON line: {exc.msg} (column {exc.colno})",
                f"fix line {lineno} of {path}: each line must be one complete JSON object",
            ) from None
        rows.append(_check_object(obj, f"{path}:{lineno}"))
    return rows


def _read_json(path: Path, *, limit: int | None, what: str) -> list[dict]:
    text = _open_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a JSON Lines file named .json
            return _read_jsonl(path, limit=limit, what=what)
        raise DataError(
            f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})",
            f"fix {path}: a .json data file is one JSON list of objects (use .jsonl for one per line)",
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"{what}: {str(path)!r} holds a JSON {type(data).__name__}, not a list of examples",
            "write the file as [{...}, {...}] or as JSON Lines (.jsonl)",
        )
    if limit is not None:
        data = data[:limit]
    return [_check_object(obj, f"{path} item {i}") for i, obj in enumerate(data)]


def _read_parquet(path: Path, *, limit: int | None, what: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{what}: {str(path)!r} is not a readable Parquet file: {exc}",
            "check the file (it may be truncated) or convert the data to .jsonl",
        ) from None
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def _read_dir(path: Path, *, split: str, limit: int | None, what: str) -> list[dict]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _read_saved(path, split=split, limit=limit, what=what)
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and p.name not in ("dataset_info.json", "state.json", "dataset_dict.json")
    )
    if not files:
        raise DataError(
            f"{what}: directory {str(path)!r} holds no data files ({', '.join(DATA_SUFFIXES)}) "
            "and was not written by datasets.save_to_disk",
            f"point {what} at a data file or put .jsonl/.json/.parquet files in the directory",
        )
    by_split: dict[str, list[Path]] = {}
    for f in files:
        name = _split_of(f.relative_to(path))
        if name is not None:
            by_split.setdefault(name, []).append(f)
    if split in by_split:
        chosen = by_split[split]
    elif by_split:
        raise DataError(
            f"{what}: directory {str(path)!r} has no {split!r} split; it has {', '.join(sorted(by_split))}",
            f"set data.split to one of {', '.join(sorted(by_split))} (or name the files after the split)",
        )
    elif split == "train":
        chosen = files
    else:
        raise DataError(
            f"{what}: directory {str(path)!r} has no file named after split {split!r} "
            "(its files, named after no split, make up the 'train' split)",
            f"use data.split=train or name the files {split}.jsonl / {split}-*.parquet",
        )
    rows: list[dict] = []
    for f in chosen:
        rows.extend(_read_file(f, limit=None if limit is None else limit - len(rows), what=what))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def _split_of(rel: Path) -> str | None:
    """The split a file in a data directory belongs to by its name (`train.jsonl`,
    `train-00000-of-00001.parquet`, `train/part0.jsonl`), or None."""
    names = [p.lower() for p in rel.parts[:-1]]
    stem = rel.name.split(".")[0].lower()
    for split in _KNOWN_SPLITS:
        if split in names or stem == split or re.match(rf"{split}[-_.]", stem):
            return split
    return None


def _read_saved(path: Path, *, split: str, limit: int | None, what: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 — any failure is the user's directory
        raise DataError(
            f"{what}: {str(path)!r} looks like a datasets.save_to_disk directory but cannot be read: "
            f"{type(exc).__name__}: {first_line(exc)}",
            "re-save it with Dataset.save_to_disk, or point data.path at a .jsonl file",
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{what}: {str(path)!r} has no {split!r} split; it has {', '.join(ds) or 'none'}",
                f"set data.split to one of {', '.join(ds)}",
            )
        ds = ds[split]
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds.to_list()


def _read_hub(name: str, *, split: str, limit: int | None, what: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 — offline, unknown name, unknown split, ...
        raise DataError(
            f"{what}: {name!r} is not a local file or directory, and the dataset could not be "
            f"found locally or on the Hub ({type(exc).__name__}: {first_line(exc)})",
            f"check {what} (a relative path is looked for next to the recipe, then in {os.getcwd()}) "
            "and data.split; offline, "
            "point it at a local .jsonl/.parquet file or a save_to_disk directory",
        ) from None
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover — split= was given
        ds = ds[split]
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(r) for r in ds]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"


def short_repr(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


# ============================================================================ eval split


def split_eval(rows: Sequence[dict], ratio: float) -> tuple[list[dict], list[dict]]:
    """Hold out the first ``int(len(rows) * ratio)`` rows for evaluation (seed 003's rule).

    Returns ``(train, eval)``. ``ratio == 0`` returns all rows for training and no eval rows;
    otherwise both sides must be non-empty (:class:`DataError`).
    """
    rows = list(rows)
    if not 0 <= ratio < 1:
        raise DataError(f"data.eval_ratio must be in [0, 1), got {ratio}", "use e.g. 0.1 (10% held out)")
    if ratio == 0:
        return rows, []
    n_eval = held_out_rows(len(rows), ratio)
    if n_eval == 0:
        fix = (
            f"raise data.eval_ratio to at least {1 / len(rows):.3g}, add rows, or set it to 0"
            if len(rows) >= 2
            else "add rows (evaluation needs at least 2) or set data.eval_ratio=0"
        )
        raise DataError(f"data.eval_ratio={ratio} of {len(rows)} rows holds out no rows for evaluation", fix)
    if n_eval >= len(rows):
        raise DataError(
            f"data.eval_ratio={ratio} of {len(rows)} rows leaves no rows for training",
            "lower data.eval_ratio or add rows",
        )
    return rows[n_eval:], rows[:n_eval]
