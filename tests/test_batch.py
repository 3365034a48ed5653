"""Batch math, schedule and LR: `tunefleet.launch.core.batch` against the real transformers code."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from tunefleet.launch.core import recipe as R
from tunefleet.launch.core.batch import (
    SCHEDULER_KWARGS,
    batch_change,
    count_warmup_steps,
    lr_at,
    lr_points,
    plan_batch,
    plan_schedule,
    split_rows,
)
from tunefleet.launch.core.errors import RecipeError

# ----------------------------------------------------------------------------- global batch


@pytest.mark.parametrize(
    ("micro", "global_", "world", "accum"),
    [(4, 16, 1, 4), (1, 4, 4, 1), (2, 64, 8, 4), (8, 16, 1, 2), (3, 36, 4, 3), (1, 128, 1, 128)],
)
def test_accumulation_divides(micro: int, global_: int, world: int, accum: int) -> None:
    plan = plan_batch(micro_batch_size=micro, global_batch_size=global_, max_length=512, world_size=world)
    assert plan.grad_accum_steps == accum
    assert (
        plan.micro_batch_size * plan.grad_accum_steps * plan.world_size == plan.global_batch_size == global_
    )
    assert plan.global_batch_tokens == global_ * 512
    assert plan.target == "samples"


def test_indivisible_names_nearest_choices() -> None:
    with pytest.raises(RecipeError) as info:
        plan_batch(micro_batch_size=4, global_batch_size=24, max_length=2048, world_size=5, procs_per_node=5)
    err = info.value
    assert "batch.global_batch_size=24" in err.problem
    assert "4 x world size 5 = 20" in err.problem
    assert "nearest valid global batches: 20, 40" in err.fix
    assert "micro batch sizes that divide it on world size 5: none" in err.fix
    assert "world sizes that divide it with micro batch 4: 1, 2, 3, 6" in err.fix
    assert "node counts (5 processes each): none" in err.fix


def test_indivisible_lists_micro_batches_and_nodes() -> None:
    with pytest.raises(RecipeError) as info:
        plan_batch(micro_batch_size=5, global_batch_size=24, max_length=128, world_size=2, procs_per_node=2)
    assert "nearest valid global batches: 20, 30" in info.value.fix
    assert "micro batch sizes that divide it on world size 2: 1, 2, 3, 4, 6, 12" in info.value.fix
    with pytest.raises(RecipeError) as info:
        plan_batch(micro_batch_size=2, global_batch_size=16, max_length=128, world_size=12, procs_per_node=4)
    # below one accumulation step: only the next multiple is offered
    assert "nearest valid global batches: 24;" in info.value.fix
    assert "world sizes that divide it with micro batch 2: 1, 2, 4, 8" in info.value.fix
    assert "node counts (4 processes each): 1, 2" in info.value.fix


def test_token_budget_sets_the_global_batch() -> None:
    plan = plan_batch(micro_batch_size=4, global_batch_tokens=65536, max_length=2048, world_size=2)
    assert (plan.global_batch_size, plan.grad_accum_steps, plan.target) == (32, 4, "tokens")
    assert plan.global_batch_tokens == 65536


def test_token_budget_must_be_a_multiple_of_max_length() -> None:
    with pytest.raises(RecipeError) as info:
        plan_batch(micro_batch_size=4, global_batch_tokens=100_000, max_length=2048, world_size=2)
    assert "not a multiple of data.max_length=2048" in info.value.problem
    assert "nearest valid token budgets: 98304, 100352" in info.value.fix


def test_token_budget_samples_must_divide_too() -> None:
    with pytest.raises(RecipeError) as info:
        plan_batch(micro_batch_size=4, global_batch_tokens=12 * 2048, max_length=2048, world_size=2)
    assert "24576 // 2048 = 12 samples, which must divide too" in info.value.problem
    assert "nearest valid token budgets: 16384, 32768" in info.value.fix
    assert "nearest valid global batches: 8, 16" in info.value.fix


@pytest.mark.parametrize(
    "kwargs",
    [
        {"global_batch_size": 8, "global_batch_tokens": 8192},
        {},
        {"global_batch_size": 0},
        {"global_batch_size": 8, "micro_batch_size": 0},
        {"global_batch_size": 8, "world_size": 0},
        {"global_batch_tokens": -2048},
    ],
)
def test_bad_batch_inputs(kwargs: dict) -> None:
    args = {"micro_batch_size": 1, "max_length": 2048, "world_size": 1, **kwargs}
    with pytest.raises(RecipeError):
        plan_batch(**args)


def test_resume_keeps_the_global_batch() -> None:
    old = plan_batch(micro_batch_size=2, global_batch_size=32, max_length=512, world_size=8)
    new = plan_batch(micro_batch_size=4, global_batch_size=32, max_length=512, world_size=2)
    assert batch_change(old.to_dict(), old) == (None, [])
    assert batch_change({}, new) == (None, [])  # a manifest from before batch plans were stored
    problem, (note,) = batch_change(old.to_dict(), new)
    assert problem is None and "world_size 8 -> 2" in note and "grad_accum_steps 2 -> 4" in note
    changed = plan_batch(micro_batch_size=4, global_batch_size=64, max_length=512, world_size=2)
    problem, _ = batch_change(old.to_dict(), changed)
    assert problem is not None and "batch.global_batch_size: 32 -> 64" in problem


# ----------------------------------------------------------------------------- recipe fields


def _recipe(**batch: object) -> R.Recipe:
    return R.from_dict(
        {
            "output_dir": "o",
            "model": {"name_or_path": "m"},
            "data": {"path": "d.jsonl", "max_length": 1024},
            "batch": batch,
        }
    )


def test_recipe_token_budget_resolves_the_global_batch() -> None:
    r = _recipe(micro_batch_size=2, global_batch_tokens=32768)
    assert r.batch.global_batch_size == 32  # one meaning downstream: samples per optimizer step
    assert (
        _recipe(micro_batch_size=2, global_batch_size=32, global_batch_tokens=32768).batch.global_batch_size
        == 32
    )
    with pytest.raises(RecipeError, match="disagrees with batch.global_batch_tokens"):
        _recipe(micro_batch_size=2, global_batch_size=16, global_batch_tokens=32768)
    with pytest.raises(RecipeError, match="not a multiple of data.max_length=1024"):
        _recipe(micro_batch_size=2, global_batch_tokens=5000)
    # the resolved recipe, dumped and reloaded (as a resume does), is still valid and the same
    again = R.from_dict(R.to_dict(r))
    assert again.batch.global_batch_size == 32 and again.batch.global_batch_tokens == 32768


# ----------------------------------------------------------------------------- schedule


def test_schedule_drops_the_incomplete_last_batch() -> None:
    s = plan_schedule(dataset_rows=1000, global_batch_size=16, epochs=3, max_steps=-1, warmup_ratio=0.03)
    assert (s.steps_per_epoch, s.total_steps, s.warmup_steps, s.dropped_rows_per_epoch) == (62, 186, 6, 8)
    assert s.epochs == 3.0 and s.last_batch == "drop"


def test_schedule_keep_is_the_stock_trainer_ceil() -> None:
    s = plan_schedule(
        dataset_rows=1000, global_batch_size=16, epochs=3, max_steps=-1, warmup_ratio=0.03, last_batch="keep"
    )
    assert (s.steps_per_epoch, s.total_steps, s.short_last_batch_samples, s.dropped_rows_per_epoch) == (
        63,
        189,
        8,
        0,
    )


def test_schedule_fractional_epochs_and_max_steps() -> None:
    s = plan_schedule(dataset_rows=100, global_batch_size=8, epochs=1.5, max_steps=-1, warmup_ratio=0.1)
    assert (s.steps_per_epoch, s.total_steps, s.warmup_steps) == (12, 18, 2)  # ceil(1.5 x 12), ceil(1.8)
    s = plan_schedule(dataset_rows=100, global_batch_size=8, epochs=3, max_steps=50, warmup_ratio=0.0)
    assert (s.total_steps, s.warmup_steps) == (50, 0)
    assert s.epochs == pytest.approx(50 / 12)


def test_schedule_needs_one_global_batch() -> None:
    with pytest.raises(RecipeError, match="fewer than one global batch of 16"):
        plan_schedule(dataset_rows=15, global_batch_size=16, epochs=1, max_steps=-1, warmup_ratio=0)


def test_steps_match_the_trainer_sampler() -> None:
    from tunefleet.distributed.sampler import GlobalBatchSampler

    for rows, global_, micro, world in [(1000, 16, 4, 1), (999, 32, 2, 4), (64, 64, 8, 8)]:
        s = plan_schedule(
            dataset_rows=rows, global_batch_size=global_, epochs=1, max_steps=-1, warmup_ratio=0
        )
        batch = plan_batch(micro_batch_size=micro, global_batch_size=global_, max_length=8, world_size=world)
        sampler = GlobalBatchSampler([rows], batch=batch, steps_per_epoch=s.steps_per_epoch, rank=0, seed=1)
        assert len(sampler) == s.steps_per_epoch * batch.grad_accum_steps  # what the HF Trainer divides by
        assert len(list(sampler)) == len(sampler)
        assert sum(len(b) for b in sampler) * world == rows - s.dropped_rows_per_epoch


def test_eval_hold_out_matches_the_data_module() -> None:
    from tunefleet.distributed.data import split_eval

    for rows, ratio in [(1000, 0.2), (999, 0.1), (7, 0.3), (50, 0.0)]:
        train, held_out = split_eval([{}] * rows, ratio)
        assert split_rows(rows, limit=None, eval_ratio=ratio) == (len(train), len(held_out))
    assert split_rows(5000, limit=1000, eval_ratio=0.2) == (800, 200)


def test_warmup_steps_match_training_arguments(tmp_path) -> None:
    from transformers import TrainingArguments

    for ratio in (0.0, 0.03, 0.1, 0.5):
        args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=ratio, use_cpu=True, report_to=[])
        for total in (1, 7, 33, 186, 1000):
            assert count_warmup_steps(total, ratio) == args.get_warmup_steps(total)


@pytest.mark.parametrize("name", list(SCHEDULER_KWARGS))
def test_lr_at_equals_the_transformers_scheduler_at_every_step(name: str) -> None:
    import torch
    from transformers import get_scheduler

    lr = 2e-4
    for rows, ratio in [(1000, 0.03), (7 * 16, 0.5), (16, 0.0), (333, 0.1)]:
        s = plan_schedule(dataset_rows=rows, global_batch_size=16, epochs=3, max_steps=-1, warmup_ratio=ratio)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched = get_scheduler(
            name,
            opt,
            num_warmup_steps=s.warmup_steps,
            num_training_steps=s.total_steps,
            scheduler_specific_kwargs=SCHEDULER_KWARGS[name] or None,
        )
        for step in range(s.total_steps):
            assert lr_at(step, schedule=s, lr=lr, scheduler_name=name) == sched.get_last_lr()[0], (name, step)
            opt.step()
            sched.step()


def test_lr_points() -> None:
    s = plan_schedule(dataset_rows=1000, global_batch_size=16, epochs=3, max_steps=-1, warmup_ratio=0.03)
    points = dict(lr_points(s, lr=2e-4, scheduler_name="cosine"))
    assert sorted(points) == [0, 6, 46, 93, 139, 185]
    assert points[0] == 0.0 and points[6] == 2e-4
    assert points[93] == pytest.approx(1e-4 * (1 + math.cos(math.pi * 87 / 180)))
    assert 0 < points[185] < 1e-7
    with pytest.raises(RecipeError, match="unknown scheduler"):
        lr_at(0, schedule=s, lr=1e-4, scheduler_name="cosine_with_restarts")


def test_batch_module_imports_without_torch() -> None:
    code = "import sys, tunefleet.launch.core.batch; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("sets", "target"),
    [
        (["batch.global_batch_size=16"], "samples"),
        (["batch.global_batch_tokens=2048", "data.max_length=128"], "tokens"),
    ],
)
def test_one_batch_plan_feeds_plan_json_and_the_manifest(tmp_path, sets, target) -> None:
    """The start-up check makes the run's one batch plan; plan.json (`build_plan` as the run calls
    it) and every checkpoint manifest (`sft.run_identity`) carry that plan, whichever target set it."""
    from tests.short_run import DEMO
    from tunefleet.distributed.sft import run_identity
    from tunefleet.launch.core import checkpoints as ckpt
    from tunefleet.launch.core import recipe as R
    from tunefleet.launch.core.args import StartOptions
    from tunefleet.launch.core.hardware import Hardware
    from tunefleet.launch.plan import build_plan
    from tunefleet.launch.preflight import preflight

    recipe = R.load(DEMO, [f"output_dir={tmp_path / 'run'}", "batch.micro_batch_size=2", *sets])
    checked = preflight(recipe, Hardware(num_processes=2, use_cpu=True), StartOptions())
    plan = build_plan(
        checked.recipe, nodes=1, procs_per_node=2, model_config=None, resolve=False, batch=checked.batch
    )
    manifest = ckpt.Manifest.for_step(
        run_identity(checked), step=3, steps_per_epoch=5, tokens_seen=0, save_s=0.1
    )
    assert plan["batch_target"] == manifest.batch_plan["target"] == checked.batch.target == target
    assert plan["global_batch_size"] == manifest.batch_plan["global_batch_size"] == 16
    assert plan["grad_accum_steps"] == manifest.batch_plan["grad_accum_steps"] == 4
    assert manifest.samples_seen == 3 * 16
