"""What a run trains on, as a fingerprint of the bytes of its data (no torch, no tokenizer).

`tunefleet prepare` keys its cache with it (plus the tokenizer and the tokenisation code), and
every checkpoint records it (`data_fingerprint` in its manifest): resuming over data that changed
since is refused, as a changed recipe is. A local file or directory is identified by every byte
of every file; a `datasets` name by its name and split only (its content is not downloaded to be
hashed, which the refusal message and docs/checkpoints.md say).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from tunefleet.launch.core.recipe import DataConfig, data_sources


def hash_source(h: Any, source: str, split: str) -> str:
    """Feed a data source into `h`; return how it was identified (for messages and meta.json)."""
    local = Path(os.path.expanduser(source))
    if local.is_file():
        files = [local]
    elif local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
    else:  # a `datasets` name: its content is not available without downloading it
        h.update(f"dataset:{source}:{split}".encode())
        return f"dataset name {source!r}, split {split!r} (content not hashed)"
    for path in files:
        h.update(str(path.relative_to(local) if local.is_dir() else path.name).encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    total = sum(p.stat().st_size for p in files)
    return f"{len(files)} file(s), {total:,} bytes hashed"


def hash_data(h: Any, data: DataConfig) -> dict[str, str]:
    """Feed every training source (data.path, or each data.mixture entry, in order) and
    data.eval_path into `h`; return how each was identified, by its recipe key."""
    sources = {}
    for source in data_sources(data):
        if data.mixture is not None:
            h.update(f"{source.where}\0".encode())
        sources[source.where.removeprefix("data.")] = hash_source(h, source.data.path, data.split)
    if data.eval_path:
        h.update(b"eval\0")
        sources["eval_path"] = hash_source(h, data.eval_path, data.split)
    return sources


def data_fingerprint(data: DataConfig) -> str:
    """A short, stable fingerprint of the data's bytes (see the module doc)."""
    h = hashlib.sha256()
    hash_data(h, data)
    return h.hexdigest()[:16]
