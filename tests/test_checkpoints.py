"""The checkpoint format (`launch/core/checkpoints.py`), fast and without training: finalize,
completeness, checksums, cleanup and retention. (Real interrupted runs: tests/test_resume.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fake_checkpoints import write_checkpoint
from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core.args import StartOptions
from tunefleet.launch.core.rundir import decide_start


def test_finalize_writes_manifest_marker_and_renames(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, 3)
    assert not (tmp_path / f"{ckpt.TMP_PREFIX}3").exists() and ckpt.is_complete(path)
    manifest = ckpt.read_manifest(path)
    assert manifest.step == 3
    assert manifest.files == {"adapter_model.safetensors": 100, "sub/optimizer.pt": 50}
    assert set(manifest.checksums) == set(manifest.files) and ckpt.damaged_file(path) is None


def test_finalize_replaces_an_incomplete_leftover_but_never_a_complete_checkpoint(tmp_path: Path) -> None:
    leftover = tmp_path / f"{ckpt.PREFIX}4"
    leftover.mkdir()
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    path = write_checkpoint(tmp_path, 4)
    assert ckpt.is_complete(path) and (path / "adapter_model.safetensors").read_bytes() == b"w" * 100
    before = ckpt.read_manifest(path)
    write_checkpoint(tmp_path, 4, {"adapter_model.safetensors": b"x" * 7})  # the same step again
    assert ckpt.read_manifest(path) == before and not (tmp_path / f"{ckpt.TMP_PREFIX}4").exists()


def test_a_checkpoint_without_marker_or_with_a_short_file_is_not_complete(tmp_path: Path) -> None:
    a, b, c = (write_checkpoint(tmp_path, s) for s in (1, 2, 3))
    (b / ckpt.COMPLETE).unlink()
    (c / "sub" / "optimizer.pt").write_bytes(b"o" * 49)
    assert [ckpt.is_complete(p) for p in (a, b, c)] == [True, False, False]
    assert ckpt.latest(tmp_path) == a


def test_same_size_corruption_is_found_by_the_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_checkpoint(tmp_path, 1)
    (path / "sub" / "optimizer.pt").write_bytes(b"p" * 50)
    assert ckpt.is_complete(path) and ckpt.damaged_file(path) == "sub/optimizer.pt"
    # large files are checksummed by a sample (size, start, middle, end)
    monkeypatch.setattr(ckpt, "FULL_CHECKSUM_BYTES", 64)
    monkeypatch.setattr(ckpt, "SAMPLE_BYTES", 8)
    big = write_checkpoint(tmp_path, 2, {"shard.bin": bytes(range(256)) * 4})
    assert ckpt.read_manifest(big).checksums["shard.bin"].startswith("sample:")
    data = bytearray((big / "shard.bin").read_bytes())
    data[-1] ^= 1  # in the sampled tail
    (big / "shard.bin").write_bytes(bytes(data))
    assert ckpt.damaged_file(big) == "shard.bin"


def test_resume_passes_over_a_damaged_newest_checkpoint_and_says_so(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step)
    (tmp_path / "recipe.yaml").write_text("# resolved recipe\n")
    (tmp_path / f"{ckpt.PREFIX}3" / "adapter_model.safetensors").write_bytes(b"z" * 100)
    start = decide_start(tmp_path, StartOptions())
    assert start.mode == "resume" and Path(str(start.checkpoint)).name == "checkpoint-2"
    assert start.note is not None and "checkpoint-3 is damaged (adapter_model.safetensors" in start.note


TORCH_FILES = {"adapter_model.safetensors": b"w" * 100, "optimizer.pt": b"o" * 50, "scheduler.pt": b"s"}
FSDP_FILES = {
    "pytorch_model_fsdp_0/__0_0.distcp": b"w" * 100,
    "optimizer_0/__0_0.distcp": b"o" * 50,
    "optimizer_0/.metadata": b"m" * 9,
    "scheduler.pt": b"s",
}
ZERO3_FILES = {
    "global_step3/zero_pp_rank_0_mp_rank_00_model_states.pt": b"m" * 10,
    "global_step3/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"o" * 50,
}


def test_optimizer_state_removed_is_told_apart_from_damage(tmp_path: Path) -> None:
    """Every file of the optimizer state gone (and the schedule's, which a fresh optimizer does not
    need), the rest intact: removed to save space. One file of several left, a damaged weight file,
    or a DeepSpeed checkpoint (whose optimizer files hold the fp32 master weights): not that."""
    write_checkpoint(tmp_path / "t", 2, TORCH_FILES)
    torch_ckpt = write_checkpoint(tmp_path / "t", 3, TORCH_FILES)
    (torch_ckpt / "optimizer.pt").unlink()
    (torch_ckpt / "scheduler.pt").unlink()
    assert ckpt.optimizer_files(torch_ckpt) == ["optimizer.pt"] and ckpt.optimizer_removed(torch_ckpt)
    scanned = ckpt.scan(tmp_path / "t")
    assert scanned.usable is not None and scanned.usable.name == "checkpoint-2"
    assert scanned.weights_only == torch_ckpt
    assert "checkpoint-3 has no optimizer state" in str(scanned.note())
    assert scanned.for_weights().usable == torch_ckpt and scanned.for_weights().passed_over == ()

    fsdp = write_checkpoint(tmp_path / "f", 3, FSDP_FILES, strategy="fsdp")
    (fsdp / "optimizer_0" / ".metadata").unlink()
    assert not ckpt.optimizer_removed(fsdp)  # one shard left: damage, not a removal
    (fsdp / "optimizer_0" / "__0_0.distcp").unlink()
    assert ckpt.optimizer_removed(fsdp)
    (fsdp / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"x" * 100)
    assert not ckpt.optimizer_removed(fsdp)  # the weights must be intact

    zero3 = write_checkpoint(tmp_path / "z", 3, ZERO3_FILES, strategy="deepspeed-zero3")
    (zero3 / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert ckpt.optimizer_files(zero3) and not ckpt.optimizer_removed(zero3)


def test_a_checkpoint_without_optimizer_state_continues_only_when_asked(tmp_path: Path) -> None:
    from tunefleet.launch.core.errors import RunDirError

    for step in (2, 3, 4):
        write_checkpoint(tmp_path, step, TORCH_FILES)
    (tmp_path / "recipe.yaml").write_text("# resolved recipe\n")
    (tmp_path / "checkpoint-3" / "optimizer.pt").unlink()
    (tmp_path / "checkpoint-4" / ckpt.COMPLETE).unlink()  # a newer write that never finished
    with pytest.raises(RunDirError) as err:
        decide_start(tmp_path, StartOptions())
    assert "checkpoint-3 has no optimizer state (optimizer.pt removed)" in err.value.problem
    assert "would set it aside and train step 3 again" in err.value.problem
    assert (
        "--resume-weights-only" in err.value.fix and f"--resume {tmp_path / 'checkpoint-2'}" in err.value.fix
    )

    start = decide_start(tmp_path, StartOptions(weights_only=True))
    assert (start.mode, start.checkpoint, start.weights_only) == (
        "resume",
        str(tmp_path / "checkpoint-3"),
        True,
    )
    assert [Path(p).name for p, _ in start.passed_over] == ["checkpoint-4"]  # set aside; checkpoint-3 stays
    with pytest.raises(RunDirError, match="pick one"):
        decide_start(tmp_path, StartOptions(weights_only=True, overwrite=True))

    explicit = str(tmp_path / "checkpoint-3")
    with pytest.raises(RunDirError, match="add --resume-weights-only"):
        decide_start(tmp_path / "new", StartOptions(resume=explicit))
    assert decide_start(tmp_path / "new", StartOptions(resume=explicit, weights_only=True)).weights_only

    zero3 = write_checkpoint(tmp_path / "z", 3, ZERO3_FILES, strategy="deepspeed-zero3")
    (zero3 / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(RunDirError, match="DeepSpeed keeps the fp32 master weights"):
        decide_start(tmp_path / "new", StartOptions(resume=str(zero3), weights_only=True))


def test_cleanup_removes_tunefleets_own_leftovers_only(tmp_path: Path) -> None:
    """Only tunefleet's temporary names are removed; a `checkpoint-*` that fails the rule is not
    tunefleet's to delete (it may be what is left of a user's work): it stays where it is."""
    done = write_checkpoint(tmp_path, 1)
    broken = write_checkpoint(tmp_path, 2)
    (broken / ckpt.COMPLETE).unlink()
    (tmp_path / f"{ckpt.TMP_PREFIX}3").mkdir()
    (tmp_path / f"{ckpt.DELETING_PREFIX}0").mkdir()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    removed = sorted(p.name for p in ckpt.cleanup_incomplete(tmp_path))
    assert removed == [f"{ckpt.DELETING_PREFIX}0", f"{ckpt.TMP_PREFIX}3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{ckpt.PREFIX}1",
        f"{ckpt.PREFIX}2",
        "metrics.jsonl",
    ]
    assert done.exists() and broken.exists()


@pytest.mark.parametrize(
    ("keep", "kept"), [(1, [5]), (2, [4, 5]), (3, [3, 4, 5]), (9, [1, 2, 3, 4, 5]), (None, [1, 2, 3, 4, 5])]
)
def test_retention_keeps_exactly_the_newest(tmp_path: Path, keep: int | None, kept: list[int]) -> None:
    for step in range(1, 6):
        write_checkpoint(tmp_path, step)
    deleted = ckpt.apply_retention(tmp_path, keep)
    assert sorted(ckpt.step_of(p) for p in deleted) == [s for s in range(1, 6) if s not in kept]
    assert [ckpt.step_of(p) for p in ckpt.complete_checkpoints(tmp_path)] == kept


def test_retention_counts_complete_checkpoints_only(tmp_path: Path) -> None:
    for step in range(1, 4):
        write_checkpoint(tmp_path, step)
    (tmp_path / f"{ckpt.PREFIX}3" / ckpt.COMPLETE).unlink()  # the newest is not complete
    ckpt.apply_retention(tmp_path, 1)
    assert [ckpt.step_of(p) for p in ckpt.complete_checkpoints(tmp_path)] == [
        2
    ]  # the newest complete one stays


def test_fsync_tree_skips_a_file_another_rank_renamed(tmp_path: Path, monkeypatch) -> None:
    """Ranks share the checkpoint's temporary directory: a walk may list another rank's temporary
    file just before that rank renames it."""
    import os

    (tmp_path / "adapter.safetensors").write_bytes(b"x")
    real_walk = os.walk

    def walk_listing_a_vanished_file(root):
        for dirpath, dirs, names in real_walk(root):
            yield dirpath, dirs, [*names, ".tmp-renamed-meanwhile"]

    monkeypatch.setattr(os, "walk", walk_listing_a_vanished_file)
    ckpt.fsync_tree(tmp_path)  # no FileNotFoundError


# ----------------------------------------------------------------------------- one writer per output_dir


def test_the_output_lock_refuses_a_second_writer_and_says_who(tmp_path: Path) -> None:
    from tunefleet.launch.core.errors import RunDirError
    from tunefleet.launch.core.lock import LOCK_FILE, OutputLock

    out = tmp_path / "run"
    first = OutputLock(out, "tunefleet train recipes/a.yaml").acquire()
    try:
        with pytest.raises(
            RunDirError, match=r"is in use by tunefleet train recipes/a.yaml \(host .*, pid \d+"
        ):
            OutputLock(out, "tunefleet prepare recipes/b.yaml").acquire()
    finally:
        first.release()
    assert not (out / LOCK_FILE).exists()
    second = OutputLock(out, "tunefleet prepare").acquire()  # free again
    second.release()


def test_a_dead_holders_lock_is_taken_over_and_an_inherited_one_is_shared(
    tmp_path: Path, monkeypatch
) -> None:
    import json
    import socket

    from tunefleet.launch.core import lock as lock_mod

    out = tmp_path / "run"
    out.mkdir()
    dead = {
        "token": "x",
        "host": socket.gethostname(),
        "pid": 2**22 + 17,
        "command": "tunefleet train",
        "since": 0,
    }
    (out / lock_mod.LOCK_FILE).write_text(json.dumps(dead))
    taken = lock_mod.OutputLock(out, "tunefleet train").acquire()
    assert taken.note is not None and "no longer exists" in taken.note
    # a launcher's ranks write under its lock (the token in TUNEFLEET_LOCK) and leave it in place
    monkeypatch.setenv(lock_mod.ENV_LOCK, taken.token)
    child = lock_mod.OutputLock(out, "tunefleet train (rank 0)").acquire()
    child.release()
    assert taken.held_by_us()
    taken.release()
    # a SLURM job's earlier attempt (same job id, another restart) is its own dead holder
    monkeypatch.delenv(lock_mod.ENV_LOCK)
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    earlier = {**dead, "host": "n2", "pid": 1, "slurm_job": "41", "slurm_restart": "0"}
    (out / lock_mod.LOCK_FILE).write_text(json.dumps(earlier))
    again = lock_mod.OutputLock(out, "tunefleet train").acquire()
    assert "SLURM job 41's earlier attempt" in str(again.note)
    again.release()
    # another host's holder that still refreshes its lock is alive: refused
    (out / lock_mod.LOCK_FILE).write_text(json.dumps({**earlier, "slurm_job": None}))
    with pytest.raises(Exception, match="is in use by"):
        lock_mod.OutputLock(out, "tunefleet train").acquire()


def test_a_refused_writer_leaves_no_directory_behind(tmp_path: Path) -> None:
    from tunefleet.launch.core.lock import OutputLock

    out = tmp_path / "new"
    OutputLock(out, "tunefleet train").acquire().release()
    assert not out.exists()


def test_set_aside_never_replaces_an_earlier_one(tmp_path: Path) -> None:
    """Two attempts that never checkpointed, set aside within the same second: both kept."""
    from tunefleet.launch.core.rundir import set_aside_metrics

    kept = []
    for text in ("first\n", "second\n"):
        (tmp_path / "metrics.jsonl").write_text(text)
        moved = set_aside_metrics(tmp_path)
        assert moved is not None and moved.name.startswith("metrics.jsonl.old-")
        kept.append(moved)
    assert [p.read_text() for p in kept] == ["first\n", "second\n"]
    assert not (tmp_path / "metrics.jsonl").exists() and set_aside_metrics(tmp_path) is None


def test_an_unusable_checkpoint_moved_aside_twice_keeps_both(tmp_path: Path) -> None:
    """A damaged checkpoint-3 moved aside, the step written again and damaged again within the same
    second: both kept under `checkpoint-3.unusable-<time>[-N]`, neither taken for a checkpoint."""
    kept = []
    for _ in range(2):
        path = write_checkpoint(tmp_path, 3)
        (path / ckpt.COMPLETE).unlink()
        kept.append(ckpt.move_aside(path, "no marker"))
    assert len(set(kept)) == 2 and all(
        p.name.startswith("checkpoint-3.unusable-") and p.is_dir() for p in kept
    )
    assert ckpt.checkpoint_dirs(tmp_path) == []


def test_a_torn_metrics_line_is_dropped_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A process killed while writing metrics.jsonl leaves half a line: the resume keeps the rows up to
    its checkpoint, drops the torn one and says so, instead of failing on it."""
    import json

    from tunefleet.launch.core.rundir import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert truncate_metrics(path, str(tmp_path / "checkpoint-2")) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().out
