"""Every command the README shows and every shipped recipe's first line, run on this CPU as written.

The commands are read from README.md's ```bash blocks and from the first line of each
recipes/*.yaml, so they cannot drift from what the code accepts. They run through bash, in README
order, in a scratch directory that looks like a checkout (recipes/, Makefile, pyproject.toml,
.venv linked in), with .venv/bin first on PATH. What cannot run here for real runs in its
render-only form, each with its reason in `how_to_run`:

- training commands on the local recipes (the demo and the data mixture: tiny model, bundled data)
  run for real, two steps (`--set train.max_steps=2`);
- `make demo` / `make test`: `make -n` shows what they run; the demo's command then runs as above
  (the whole demo is test_train.py::test_demo_learns_its_facts; `make test` is this suite);
- the hub recipes (Qwen3-14B, gpt-oss-20b, ...): no network and no GPU here, so `tunefleet launch`
  runs with `--dry-run` (the start-up check, the configs, the command) and `tunefleet train` as
  `tunefleet launch --dry-run` on one process; `tunefleet plan` reads the model's config.json from
  a Hugging Face cache laid out as `hf download Qwen/Qwen3-14B config.json` leaves it;
- several machines (`--nnodes`): `--dry-run` (one machine here; two launchers on loopback train
  for real in test_launch_nodes.py);
- `tunefleet slurm ... --submit`: no cluster on PATH here, so without `--submit` (it writes and
  checks the script; test_slurm_*.py submit to a real cluster);
- `. .venv/bin/activate`: not run; every command here has .venv/bin first on PATH, which is what
  it does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
FIXTURES = Path(__file__).parent / "fixtures" / "model_configs"
HUB_CONFIGS = {"Qwen/Qwen3-14B": FIXTURES / "qwen3-14b" / "config.json"}
"""Models whose config.json the README tells the user to fetch before `tunefleet plan`."""
SHORT = "--set train.max_steps=2"
LOCAL_RECIPES = ("recipes/demo.yaml", "recipes/mixture.yaml")
"""Recipes of the built-in tiny model on bundled data: their training commands run for real here."""

pytestmark = pytest.mark.slow


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a `#` after a blank, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[str]:
    """The commands of README.md's bash blocks, one per logical line (backslash continuations
    joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = strip_comment(re.sub(r"\s+", " ", line.strip()))
            if line:
                commands.append(line)
    return commands


def recipe_commands() -> list[str]:
    """The command on the first line of each shipped recipe (`# tunefleet ... recipes/X.yaml`)."""
    out = []
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# tunefleet "), f"{path.name} does not start with its command"
        out.append(strip_comment(first[2:]))
    return out


def _words(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def _recipe(words: list[str]) -> str | None:
    return next((w for w in words if w.startswith("recipes/") and w.endswith(".yaml")), None)


def how_to_run(command: str) -> tuple[str | None, str]:
    """(the shell line run here, or None; why it runs that way)."""
    words = _words(command)
    tool = [w for w in words if not w.startswith("-")][:2]
    recipe = _recipe(words)
    demo = recipe in LOCAL_RECIPES
    if words[:2] == [".", ".venv/bin/activate"]:
        return None, "not run: .venv/bin is first on PATH for every command here"
    if words[:2] == ["make", "demo"]:
        return "make -n demo", "make -n: what it runs, which then runs below for 2 steps"
    if words[:2] == ["make", "test"]:
        return "make -n test", "make -n: the suite itself, which holds this test"
    name = Path(tool[0]).name if tool else ""
    sub = tool[1] if len(tool) > 1 else ""
    if name != "tunefleet":
        return command, "as written"
    if sub == "train":
        if demo:
            return f"{command} {SHORT}", "for real, 2 steps"
        return (
            command.replace(" train ", " launch ", 1) + " --dry-run",
            "a hub model (no network, no GPU here): launch --dry-run, the same start-up check",
        )
    if sub == "launch":
        if demo and "--nnodes" not in words and "--gpus" not in words:
            return f"{command} {SHORT}", "for real, 2 steps"
        return f"{command} --dry-run", "--dry-run: needs GPUs, a hub model or several machines"
    if sub == "slurm":
        return command.replace(" --submit", ""), "without --submit: no cluster here (test_slurm_*.py submit)"
    return command, "as written"


def checkout(root: Path) -> Path:
    """A scratch directory that looks like the checkout, so runs/ and the like land in it."""
    root.mkdir()
    for name in ("recipes", "requirements", "Makefile", "pyproject.toml"):
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(VENV_BIN.parent)
    hub = root / "hf-cache"
    for model, config in HUB_CONFIGS.items():  # as `hf download MODEL config.json` leaves it
        repo = hub / f"models--{model.replace('/', '--')}"
        (repo / "snapshots" / "0").mkdir(parents=True)
        (repo / "snapshots" / "0" / "config.json").write_text(config.read_text())
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0")
    return root


def run(command: str, cwd: Path, *, path: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": path,
        "HF_HUB_CACHE": str(cwd / "hf-cache"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        ["/bin/bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def run_all(commands: list[str], cwd: Path) -> None:
    """Run the commands in order (each as `how_to_run` says); fail listing every one that failed."""
    plain_path = f"{VENV_BIN}:/usr/bin:/bin"
    failures, ran = [], []
    for command in commands:
        line, why = how_to_run(command)
        if line is None:
            ran.append(f"skipped  {command}  ({why})")
            continue
        # slurm without any sbatch on PATH: the script is written and checked, not submitted
        result = run(line, cwd, path=str(VENV_BIN) if " slurm " in f" {line} " else plain_path)
        ran.append(f"rc={result.returncode}  {line}  ({why})")
        if result.returncode != 0:
            failures.append(f"{line}\n  exit {result.returncode}: {(result.stderr or result.stdout)[-2000:]}")
            continue
        if line == "make -n demo":
            demo = [x for x in result.stdout.splitlines() if "tunefleet train recipes/demo.yaml" in x]
            assert demo, result.stdout
            demo_run = run(f"{demo[0]} {SHORT}", cwd, path=plain_path)
            ran.append(f"rc={demo_run.returncode}  {demo[0]} {SHORT}  (what make demo runs, 2 steps)")
            if demo_run.returncode != 0:
                failures.append(f"{demo[0]}\n  exit {demo_run.returncode}: {demo_run.stderr[-2000:]}")
        if line == "make -n test":
            assert "pytest" in result.stdout, result.stdout
    print("\n" + "\n".join(ran))
    assert not failures, "\n\n".join(failures)


def test_readme_commands_run(tmp_path: Path) -> None:
    readme = readme_commands((REPO / "README.md").read_text())
    assert any(c.startswith("make demo") for c in readme) and any(" slurm " in c for c in readme)
    assert any("generate runs/demo" in c and "--compare-base" in c for c in readme)
    root = checkout(tmp_path / "checkout")
    run_all(readme, root)
    # what the commands left behind is what they claim
    assert (root / "runs" / "demo" / "final" / "adapter_model.safetensors").is_file()
    assert (root / "runs" / "demo-2proc" / "final" / "adapter_model.safetensors").is_file()
    script = (root / "runs" / "demo-slurm" / "slurm.sbatch").read_text()
    # the job runs the venv's interpreter (the console script's), not a `python` found on the node
    assert re.search(
        rf'^{re.escape(str(VENV_BIN))}/python[0-9.]* -c "\$TUNEFLEET_PYTHON_CHECK"', script, re.M
    )


def test_recipe_first_lines_run(tmp_path: Path) -> None:
    root = checkout(tmp_path / "checkout")
    run_all(recipe_commands(), root)
    assert (root / "runs" / "demo" / "final" / "adapter_model.safetensors").is_file()
    assert (root / "runs" / "mixture" / "final" / "adapter_model.safetensors").is_file()
    mixture = json.loads((root / "runs" / "mixture" / "plan.json").read_text())["mixture"]
    assert [m["samples_per_epoch"] for m in mixture] == [213, 107]


def test_how_each_kind_of_command_runs() -> None:
    """The rules above, on the kinds of command the README holds (so a new kind is noticed)."""
    assert how_to_run("make demo")[0] == "make -n demo"
    assert how_to_run(". .venv/bin/activate")[0] is None
    assert how_to_run("tunefleet train recipes/demo.yaml")[0] == f"tunefleet train recipes/demo.yaml {SHORT}"
    assert (
        how_to_run("tunefleet train recipes/mixture.yaml")[0]
        == f"tunefleet train recipes/mixture.yaml {SHORT}"
    )
    assert readme_commands("```bash\ntunefleet train recipes/q.yaml  # Qwen3, 'quoted #'\n```") == [
        "tunefleet train recipes/q.yaml"
    ]
    assert readme_commands('```bash\ntunefleet generate r --prompt "a # b" \\\n    --x\n```') == [
        'tunefleet generate r --prompt "a # b" --x'
    ]
    assert how_to_run("tunefleet train recipes/qwen3-14b-qlora.yaml")[0] == (
        "tunefleet launch recipes/qwen3-14b-qlora.yaml --dry-run"
    )
    assert str(how_to_run("tunefleet launch recipes/qwen3-14b-qlora.yaml --gpus 4")[0]).endswith("--dry-run")
    assert how_to_run("tunefleet launch recipes/demo.yaml --nproc 2")[0] == (
        f"tunefleet launch recipes/demo.yaml --nproc 2 {SHORT}"
    )
    assert "--submit" not in str(how_to_run("tunefleet slurm recipes/demo.yaml --nodes 2 --submit")[0])
    assert len(recipe_commands()) == len(list((REPO / "recipes").glob("*.yaml")))
