"""tunefleet's hooks into transformers, TRL, PEFT, accelerate (and what it relies on in DeepSpeed and
torch), checked against the installed releases in the fast suite: an upgrade that renames or
reshapes one fails here by name (launch/hf_compat.py), not as a wrong checkpoint after a long run.
And the library lines printed before every command's own output stay off the user's screen."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tunefleet.launch import hf_compat

REPO = Path(__file__).resolve().parent.parent
LIBRARIES = ("transformers", "trl", "peft", "accelerate")


def test_every_reliance_holds_on_the_installed_releases() -> None:
    problems = hf_compat.problems()
    assert not problems, (
        f"{len(problems)} hook(s) into the installed libraries no longer hold (checked on "
        f"{hf_compat.CHECKED_ON}):\n" + "\n".join(problems)
    )


def test_a_hook_that_went_away_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: a release without `Trainer._track_num_input_tokens`, and one whose
    `get_batch_samples` takes other arguments, are each reported with what relies on them."""
    from transformers import Trainer

    monkeypatch.delattr(Trainer, "_track_num_input_tokens")
    monkeypatch.setattr(Trainer, "get_batch_samples", lambda self, iterator, n: None)
    problems = "\n".join(hf_compat.problems())
    assert "transformers.trainer:Trainer._track_num_input_tokens is gone" in problems
    assert "padding-free row counts every token" in problems
    assert "get_batch_samples takes (iterator, n), tunefleet calls it with (epoch_iterator" in problems


def test_the_trainer_hooks_are_the_methods_transformers_has() -> None:
    """Every method the hooks class overrides is one the installed Trainer (or SFTTrainer) defines:
    an override of a name that no longer exists would silently never be called."""
    from trl import SFTTrainer

    hooks = hf_compat.trainer_base()
    own = {n for n, v in vars(hooks).items() if callable(v) and not n.startswith("__")}
    added = {"save_trainer_parts", "steps_before_this_attempt"}  # tunefleet's own helpers
    assert own - added and all(hasattr(SFTTrainer, n) for n in own - added), sorted(own - added)


def _private_imports(path: Path) -> list[str]:
    """`from <library>... import _name` and imports of a library's private modules in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            private = [a.name for a in node.names if a.name.startswith("_")]
            deep = node.module.startswith("trl.trainer.") or any(
                p.startswith("_") for p in node.module.split(".")
            )
            if private or deep:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} from {node.module} import ...")
    return found


def test_private_parts_of_the_libraries_are_reached_through_hf_compat_only() -> None:
    found = [
        hit
        for folder in ("launch", "distributed", "slurm")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path.name != "hf_compat.py"
        for hit in _private_imports(path)
    ]
    assert found == [], "move these into launch/hf_compat.py (with their entry in RELIANCES)"


def test_library_noise_stays_off_the_screen() -> None:
    """DeepSpeed's "Setting accelerator to CPU" and bitsandbytes' kernel-download line are printed on
    every import on a CPU machine; after `quiet_libraries` they are not (DeepSpeed's at DEBUG)."""
    code = (
        "import logging\nfrom tunefleet.launch.core.noise import quiet_libraries\nquiet_libraries()\n"
        "import deepspeed, bitsandbytes\n"
        "logging.getLogger('DeepSpeed').warning('a real DeepSpeed warning still shows')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "Setting accelerator to CPU" not in out and "gemm_4bit_forward" not in out, out
    assert "a real DeepSpeed warning still shows" in out
