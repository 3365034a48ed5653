"""`tunefleet prepare`, `tunefleet slurm` and `tunefleet status` without a cluster.

The tokenisation cache (hit, invalidation, the trainer's use of it), the checks `tunefleet slurm`
makes before it writes anything, the signal lead measured from earlier checkpoints, and the status
read from a run directory. tests/test_slurm_train.py runs the same commands on a real cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

import pytest

from tests.fake_checkpoints import write_checkpoint
from tunefleet.distributed import prepare as prep
from tunefleet.launch import cli
from tunefleet.launch.core import recipe as R
from tunefleet.launch.core.layout import read_metrics, training_rows
from tunefleet.slurm import status as status_mod

DEMO = Path(str(resources.files("tunefleet.recipes"))) / "demo.yaml"
DEMO_DATA = DEMO.parent / "data" / "alpaca_demo.jsonl"
SMALL = ["data.limit=24", "data.max_length=64", "batch.micro_batch_size=4", "batch.global_batch_size=8"]


def _data_copy(tmp_path: Path, rows: int = 24) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:rows]))
    return path


def _recipe(out: Path, data: Path, *extra: str) -> R.Recipe:
    return R.load(DEMO, [f"output_dir={out}", f"data.path={data}", *SMALL, *extra])


def _caches(out: Path) -> list[str]:
    return sorted(p.name for p in (out / prep.CACHE_DIR).iterdir())


# ----------------------------------------------------------------------------- tunefleet prepare


def test_prepare_cache_hit_and_invalidation(tmp_path: Path, tiny_model_dir: Path) -> None:
    out, data = tmp_path / "run", _data_copy(tmp_path)
    first = prep.prepare(_recipe(out, data))
    assert not first.hit and first.train_examples == 24 and (first.path / prep.META_FILE).is_file()
    again = prep.prepare(_recipe(out, data))
    assert again.hit and again.path == first.path
    # a change outside the data section (optimizer, LR, batch) keeps the cache
    assert prep.prepare(_recipe(out, data, "train.lr=1e-4", "batch.global_batch_size=4")).hit
    # the recipe's data section changes the key
    shorter = prep.prepare(_recipe(out, data, "data.max_length=32"))
    assert not shorter.hit and shorter.path != first.path
    # so do the bytes of the data file, at the same path and row count
    data.write_text(data.read_text().replace("a", "b", 1))
    changed = prep.prepare(_recipe(out, data, "data.max_length=32"))
    assert not changed.hit and changed.path != shorter.path
    # one cache per output directory: the superseded ones are gone, nothing half-written is left
    assert _caches(out) == [changed.path.name]


def test_fingerprint_covers_the_tokenizer(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tunefleet.distributed import model as model_mod

    recipe = _recipe(tmp_path / "run", _data_copy(tmp_path))

    def tokenizer():
        return model_mod.load_tokenizer(str(tiny_model_dir), recipe.model)

    base, inputs = prep.fingerprint(recipe, tokenizer())
    assert prep.fingerprint(recipe, tokenizer())[0] == base  # stable across loads
    assert inputs["sources"]["path"].startswith("1 file(s)")
    added = tokenizer()
    added.add_tokens(["<extra_token>"])
    templated = tokenizer()
    templated.chat_template = "{{ messages }}"
    assert len({base, prep.fingerprint(recipe, added)[0], prep.fingerprint(recipe, templated)[0]}) == 3


def test_trainer_loads_the_same_examples_from_the_cache(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A run's first rank makes the cache when there is none; `tunefleet prepare` then finds it,
    and the examples are those of the per-row reference."""
    from tunefleet.distributed import data as data_mod
    from tunefleet.distributed import model as model_mod

    out, data = tmp_path / "run", _data_copy(tmp_path)
    recipe = _recipe(out, data, "data.eval_ratio=0.25")
    tokenizer = model_mod.load_tokenizer(str(tiny_model_dir), recipe.model)
    fresh = prep.load_or_prepare(recipe, tokenizer, main=True, world_size=2, show=False)
    assert fresh.built is not None and fresh.cache_dir.parent == out / prep.CACHE_DIR
    result = prep.prepare(recipe)
    assert result.hit and result.path == fresh.cache_dir
    cached = prep.load_or_prepare(
        recipe, tokenizer, main=False, world_size=2
    )  # another rank: finds it at once
    assert cached.built is None and cached.fingerprint == fresh.fingerprint
    assert cached.train.to_list() == fresh.train.to_list()
    assert (
        cached.eval.to_list() == fresh.eval.to_list() and cached.eval_row_count == fresh.eval_row_count == 6
    )
    assert cached.train_stats == fresh.train_stats
    rows = data_mod.load_rows(str(data))
    reference, stats = data_mod.build_dataset(rows[6:], cfg=recipe.data, tokenizer=tokenizer, where="x")
    assert fresh.train.to_list() == reference and fresh.train_stats == stats
    assert cached.rows == rows[6:][: prep.HEAD_ROWS] and cached.eval_rows == rows[:6]


@pytest.mark.slow
def test_prepare_cli_and_training_from_the_cache(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    """`tunefleet prepare`, then a run: the run reads the cache and trains like one without it."""
    from tunefleet.distributed import sft

    data = _data_copy(tmp_path)
    sets = [f"data.path={data}", *SMALL, "train.max_steps=3", "train.logging_steps=1", "peft.dropout=0"]
    args = [x for s in sets for x in ("--set", s)]
    assert cli.main(["prepare", str(DEMO), "--set", f"output_dir={tmp_path / 'cached'}", *args]) == 0
    assert "tokenised: 24 training examples" in capsys.readouterr().out
    assert cli.main(["prepare", str(DEMO), "--set", f"output_dir={tmp_path / 'cached'}", *args]) == 0
    assert "cache hit, nothing tokenised" in capsys.readouterr().out
    assert sft.run(R.load(DEMO, [f"output_dir={tmp_path / 'cached'}", *sets])) == 0
    assert "tokenised data from the cache" in capsys.readouterr().out
    assert sft.run(R.load(DEMO, [f"output_dir={tmp_path / 'plain'}", *sets])) == 0
    assert "from the cache" not in capsys.readouterr().out
    got, want = (training_rows(read_metrics(tmp_path / name)) for name in ("cached", "plain"))
    assert [r["step"] for r in got] == [1, 2, 3]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]


# ----------------------------------------------------------------------------- tunefleet slurm


def _slurm(tmp_path: Path, out: Path, *args: str, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("PATH", "/usr/bin/nonexistent")  # no sbatch here: written, not validated
    argv = ["slurm", str(DEMO), "--time", "30", "--gpus-per-node", "0", "--set", f"output_dir={out}", *args]
    return cli.main(argv)


def test_slurm_writes_resolved_recipe_and_script(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    assert _slurm(tmp_path, out, "--nodes", "2", "--set", "train.max_steps=7", monkeypatch=monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "micro 8 x accum 1 x world 2 = global 16" in printed and "not validated" in printed
    assert "checkpoint default 60 s" in printed and "USR1 120 s before the time limit" in printed
    recipe = R.load(out / "recipe.yaml")  # the override is baked in; the nodes need no --set
    assert recipe.train.max_steps == 7 and recipe.output_dir == str(out)
    assert Path(recipe.data.path).is_absolute() and Path(recipe.data.path).is_file()
    script = (out / "slurm.sbatch").read_text()
    assert f"{sys.executable} -m tunefleet.launch.cli prepare {out}/recipe.yaml" in script
    assert script.index("tunefleet.launch.cli prepare") < script.index("\nsrun ")
    assert f"--recipe {out}/recipe.yaml" in script and "#SBATCH --signal=B:USR1@120" in script
    assert subprocess.run(["/bin/bash", "-n", str(out / "slurm.sbatch")]).returncode == 0


def test_slurm_job_runs_this_interpreter_by_default(tmp_path: Path, monkeypatch, capsys) -> None:
    """No --python: the job runs the interpreter that wrote it (absolute, so the venv need not be
    activated on the nodes) and checks tunefleet's and torch's versions before anything starts."""
    out = tmp_path / "run"
    assert _slurm(tmp_path, out, "--nodes", "2", monkeypatch=monkeypatch) == 0
    script = (out / "slurm.sbatch").read_text()
    versions = f"tunefleet={metadata.version('tunefleet')} torch={metadata.version('torch')}"
    check = f'{sys.executable} -c "$TUNEFLEET_PYTHON_CHECK" import {versions} ||'
    assert check in script and f"{sys.executable} -m tunefleet.launch.cli prepare" in script
    assert f"exec {sys.executable} -m tunefleet.distributed.relay" in script  # the launcher on every node
    assert script.index(check) < script.index("tunefleet.launch.cli prepare") < script.index("\nsrun ")
    assert f"python   {sys.executable} (must import tunefleet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("python", "message"),
    [
        ("python -u", "--python 'python -u' is not one executable"),
        ("/nonexistent/bin/python", "--python '/nonexistent/bin/python': no such executable here"),
        ("/usr/bin/python3", "cannot run tunefleet: cannot import tunefleet: ModuleNotFoundError"),
    ],
)
def test_slurm_refuses_a_python_that_cannot_run_tunefleet(
    tmp_path: Path, monkeypatch, capsys, python: str, message: str
) -> None:
    """Checked on the login node before anything is written: these would fail only after queueing
    (`python -u` with exit 127)."""
    if python == "/usr/bin/python3" and not (
        Path(python).exists() and subprocess.run([python, "-c", "import tunefleet"]).returncode != 0
    ):
        pytest.skip("no system Python 3 without tunefleet here")
    out = tmp_path / "run"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # `python` of `python -u` resolves here (or not at all)
    argv = ["slurm", str(DEMO), "--time", "30", "--gpus-per-node", "0", "--nodes", "1", "--python", python]
    if python == "python -u" and shutil.which("python") is None:
        argv[-1] = "python3 -u"
        message = "--python 'python3 -u' is not one executable"
    assert cli.main([*argv, "--set", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "fix:" in err, err
    assert not out.exists()


@pytest.mark.slow
def test_an_unreachable_controller_is_a_warning_not_a_spec_error(tmp_path: Path, monkeypatch, capsys) -> None:
    """The real sbatch, pointed at a controller that does not answer: the script is written and the
    output says the controller was not reachable (it used to be reported as a cluster-spec problem)."""
    import shutil

    if shutil.which("sbatch") is None:
        pytest.skip("sbatch is not installed (Debian's slurm-client)")
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=down\nSlurmctldHost=localhost\nSlurmctldPort=6899\nAuthType=auth/none\n"
        "CredType=cred/none\nNodeName=n1 CPUs=1 State=UNKNOWN\nPartitionName=p Nodes=n1 Default=YES\n"
    )
    monkeypatch.setenv("SLURM_CONF", str(conf))
    out = tmp_path / "run"
    argv = [
        "slurm",
        str(DEMO),
        "--time",
        "30",
        "--gpus-per-node",
        "0",
        "--nodes",
        "1",
        "--set",
        f"output_dir={out}",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "not checked: the SLURM controller did not answer" in printed, printed
    assert (out / "slurm.sbatch").is_file()


def test_slurm_gpu_job_uses_rendered_accelerate_config(tmp_path: Path, monkeypatch, capsys) -> None:
    """GPU nodes: accelerate launch with the config the launcher's templates render for 2 x 4 GPUs
    (generated and checked here; no GPU ran it)."""
    out = tmp_path / "run"
    sets = ["parallel.strategy=fsdp", "batch.micro_batch_size=1", "batch.global_batch_size=16"]
    args = ["--nodes", "2", "--gpus-per-node", "4", *[x for s in sets for x in ("--set", s)]]
    monkeypatch.setenv("PATH", "/usr/bin/nonexistent")
    assert cli.main(["slurm", str(DEMO), "--time", "04:00:00", "--set", f"output_dir={out}", *args]) == 0
    assert "micro 1 x accum 2 x world 8 = global 16" in capsys.readouterr().out
    config = (out / "slurm" / "accelerate.yaml").read_text()
    assert "distributed_type: FSDP" in config and "num_machines: 2" in config and "num_processes: 8" in config
    script = (out / "slurm.sbatch").read_text()
    assert f"--config_file {out}/slurm/accelerate.yaml" in script and "--num_processes 8" in script
    assert "export TUNEFLEET_DISTRIBUTED_TYPE=FSDP" in script and "#SBATCH --gpus-per-node=4" in script
    assert subprocess.run(["/bin/bash", "-n", str(out / "slurm.sbatch")]).returncode == 0


def test_slurm_checks_batch_math_before_writing(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    assert _slurm(tmp_path, out, "--nodes", "3", monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err
    assert "batch.global_batch_size=16" in err and "world size 3" in err, err
    assert not out.exists(), "files were written for a job whose batch math does not divide"


def test_slurm_refuses_finished_run_and_changed_training(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "recipe.yaml").write_text(R.dump(R.load(DEMO, [f"output_dir={out}"])))
    assert _slurm(tmp_path, out, "--nodes", "1", monkeypatch=monkeypatch) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert not (out / "slurm.sbatch").exists()

    other = tmp_path / "other"
    _fake_checkpoint(other, step=4, save_s=1.0, recipe=R.load(DEMO, [f"output_dir={other}"]))
    assert _slurm(tmp_path, other, "--nodes", "1", "--set", "peft.r=4", monkeypatch=monkeypatch) == 2
    assert "peft.r: 64 -> 4" in capsys.readouterr().err
    assert not (other / "slurm.sbatch").exists()


def _fake_checkpoint(out: Path, *, step: int, save_s: float, recipe: R.Recipe | None = None) -> None:
    """A complete checkpoint directory as the trainer writes it (manifest + marker, no weights)."""
    changes: dict = {"samples_seen": step * 16, "save_s": save_s, "world_size": 2, "batch_plan": {}}
    if recipe is not None:
        changes["recipe"] = R.to_dict(recipe)
    write_checkpoint(out, step, {}, **changes)


def _metrics(out: Path, rows: list[tuple[int, float]]) -> None:
    with (out / "metrics.jsonl").open("a") as f:
        for step, elapsed in rows:
            f.write(
                json.dumps({"step": step, "loss": 1.0, "samples_seen": step * 16, "elapsed_s": elapsed})
                + "\n"
            )


def test_signal_lead_comes_from_measured_checkpoints(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    recipe = R.load(DEMO, [f"output_dir={out}"])
    for step, save_s in ((2, 3.2), (4, 7.4)):
        _fake_checkpoint(out, step=step, save_s=save_s, recipe=recipe)
    _metrics(out, [(1, 10.0), (2, 12.0), (3, 17.5), (4, 19.0)])  # slowest step 5.5 s (with a save)
    assert _slurm(tmp_path, out, "--nodes", "1", monkeypatch=monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "checkpoint measured 13 s: slowest save 7.40 s of 2 checkpoint(s) + slowest step 5.50 s" in printed
    assert "continues from checkpoint-4" in printed
    assert "#SBATCH --signal=B:USR1@73" in (out / "slurm.sbatch").read_text()
    # an explicit value wins
    assert _slurm(tmp_path, out, "--nodes", "1", "--checkpoint-s", "200", monkeypatch=monkeypatch) == 0
    assert "#SBATCH --signal=B:USR1@260" in (out / "slurm.sbatch").read_text()


def test_slurm_continues_a_checkpoint_without_optimizer_state_only_when_asked(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """checkpoint-4's optimizer.pt removed: the submission is refused with the flag that helps;
    with --resume-weights-only the job continues it, and every node and restart is handed the flag
    (which allows, never forces: a later checkpoint with its optimizer state resumes in full)."""
    out = tmp_path / "run"
    recipe = R.load(DEMO, [f"output_dir={out}"])
    files = {"adapter_model.safetensors": b"w" * 10, "optimizer.pt": b"o" * 10}
    for step in (2, 4):
        write_checkpoint(
            out, step, files, samples_seen=step * 16, world_size=2, batch_plan={}, recipe=R.to_dict(recipe)
        )
    (out / "checkpoint-4" / "optimizer.pt").unlink()
    assert _slurm(tmp_path, out, "--nodes", "1", monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err
    assert "checkpoint-4 has no optimizer state" in err and "pass --resume-weights-only" in err
    assert not (out / "slurm.sbatch").exists()
    assert _slurm(tmp_path, out, "--nodes", "1", "--resume-weights-only", monkeypatch=monkeypatch) == 0
    assert "continues from checkpoint-4" in capsys.readouterr().out
    script = (out / "slurm.sbatch").read_text()
    assert f"--recipe {out}/recipe.yaml \\\n  --resume-weights-only" in script
    assert subprocess.run(["/bin/bash", "-n", str(out / "slurm.sbatch")]).returncode == 0


# ----------------------------------------------------------------------------- tunefleet status


def test_status_from_files_follows_the_dependency_chain(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", "/usr/bin/nonexistent")  # no scontrol: files only
    out = tmp_path / "run"
    out.mkdir()
    status_mod.record_job(
        out,
        {"job_id": "41", "restart": "dependency", "job_name": "x", "output": str(out / "slurm-%j.out")},
    )
    (out / "slurm-41.out").write_text(
        "tunefleet: job 41 on n[1-2], restart 0 (max_restarts 3)\ntunefleet: submitted job 57 to continue (restart 1)\n"
    )
    (out / "slurm-57.out").write_text("tunefleet: job 57 on n[3-4], restart 1 (max_restarts 3)\n")
    (out / "plan.json").write_text(json.dumps({"total_steps": 20, "global_batch_size": 16}))
    _fake_checkpoint(out, step=6, save_s=0.8)
    # attempt 1 logged steps 1-6; attempt 2 (elapsed restarts) resumed at 6 and runs 2 s per step
    _metrics(out, [(s, 1.0 * s) for s in range(1, 7)] + [(7, 3.0), (8, 5.0), (9, 7.0)])
    status = status_mod.read_status(out)
    assert status["job"]["chain"] == ["41", "57"] and status["job"]["job_id"] == "57"
    assert status["job"]["restarts"] == 1 and status["job"]["state"] == "unknown"
    assert status["checkpoint"]["step"] == 6 and status["checkpoint"]["samples_seen"] == 96
    p = status["progress"]
    assert (p["step"], p["total_steps"], p["samples_seen"], p["total_samples"]) == (9, 20, 144, 320)
    assert p["s_per_step"] == 2.0 and p["eta_s"] == 22.0
    assert cli.main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"restarts\s+1 \(dependency mode; chain 41 -> 57\)", text), text
    assert "checkpoint-6: step 6, 96 samples" in text and "step 9 of 20, 144 of 320 samples done" in text
    assert "~0:22 of training left at 2.0 s/step" in text
    assert cli.main(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["progress"]["eta_s"] == 22.0


def test_status_of_torn_state_files(tmp_path: Path, monkeypatch, capsys) -> None:
    """A torn slurm-job.json and plan.json (a write cut by a kill or a full disk): status shows the
    rest and names them; the next submission keeps the torn file beside a new one."""
    monkeypatch.setenv("PATH", "/usr/bin/nonexistent")
    out = tmp_path / "run"
    out.mkdir()
    (out / "slurm-job.json").write_text('{"jobs": [{"job_id": "4')
    (out / "plan.json").write_text('{"total_steps": 2')
    _fake_checkpoint(out, step=6, save_s=0.8)
    assert cli.main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "slurm-job.json is not valid JSON (" in text and "plan.json is not valid JSON (" in text
    assert "checkpoint-6: step 6" in text
    status_mod.record_job(out, {"job_id": "43", "restart": "requeue"})
    assert "kept as slurm-job.json.unreadable-" in capsys.readouterr().out
    assert [j["job_id"] for j in status_mod.read_jobs(out)[0]] == ["43"]
    assert len(list(out.glob("slurm-job.json.unreadable-*"))) == 1


def test_commands_import_without_torch() -> None:
    code = (
        "import sys\n"
        "from tunefleet.launch.cli import build_parser\n"
        "build_parser()\n"
        "import tunefleet.slurm.cli, tunefleet.slurm.job, tunefleet.slurm.status\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr
