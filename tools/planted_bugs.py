"""Planted bugs: does the suite still catch each of them? (issue 20; docs/development.md)

    .venv/bin/python tools/planted_bugs.py                 # every bug, one at a time (~40 min on 2 cores)
    .venv/bin/python tools/planted_bugs.py B4 B11          # some of them
    .venv/bin/python tools/planted_bugs.py --check         # only that every pattern is still in the code

Each bug is one edit of a behaviour the slow tests guard: (name, file, the text to replace, its
replacement, the tests to run). The edit is made in this working tree, those tests run
(`pytest --timeout=600`), the file is put back, and the tests that failed are recorded in
runs/planted-bugs.json. A bug that no test catches is a hole in the suite. When the code moves, a
pattern stops matching: `--check` says which, so the list follows the code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BUGS = [
    (
        "B1 loss normalised per micro batch",
        "distributed/trainer.py",
        'return None if self.tf_loss_norm == "micro-batch" else num_items_in_batch',
        "return None",
        ["tests/test_batch_equivalence.py", "tests/test_train.py"],
    ),
    (
        "B2 resume seek off by one step",
        "distributed/sampler.py",
        "epoch=global_step // self.steps_per_epoch, step_in_epoch=global_step % self.steps_per_epoch",
        "epoch=global_step // self.steps_per_epoch, step_in_epoch=(global_step + 1) % self.steps_per_epoch",
        ["tests/test_resume.py"],
    ),
    (
        "B3 checkpoint without optimizer state",
        "launch/hf_compat.py",
        "            self._save_optimizer_and_scheduler(directory)\n",
        "",
        ["tests/test_resume.py"],
    ),
    (
        "B4 ZeRO resharding drops the Adam moments",
        "distributed/ds_reshard.py",
        "                safe_set_full_optimizer_state(p, entry[key].to(torch.float32), key)",
        "                pass",
        ["tests/test_resume_deepspeed.py", "tests/test_lora_optimizers.py"],
    ),
    (
        "B5 SLURM job never requeues itself",
        "slurm/sbatch.py",
        '\'scontrol requeue "$SLURM_JOB_ID" || echo "tunefleet: scontrol requeue failed" >&2\',',
        "'true || echo \"tunefleet: scontrol requeue failed\" >&2',",
        ["tests/test_slurm_cluster.py", "tests/test_slurm_train.py"],
    ),
    (
        "B6 padding-free rows miscount their tokens",
        "distributed/trainer.py",
        'tokens = torch.as_tensor(inputs["input_ids"].numel(),',
        'tokens = torch.as_tensor(inputs["input_ids"].numel() - 1,',
        ["tests/test_batch_equivalence.py", "tests/test_launch.py", "-k", "not launch or padding"],
    ),
    (
        "B7 mixture subsets ignore the epoch",
        "distributed/sampler.py",
        "rng = random.Random((seed * 1_000_003 + epoch) * 1_009 + s)",
        "rng = random.Random(seed * 1_009 + s)",
        ["tests/test_sampler.py", "tests/test_train.py", "tests/test_resume.py"],
    ),
    (
        "B8 EVA's state not broadcast from rank 0",
        "distributed/eva.py",
        "def _from_rank0(state: dict) -> dict:\n    if not _distributed():",
        "def _from_rank0(state: dict) -> dict:\n    if True:",
        ["tests/test_eva.py"],
    ),
    (
        "B9 temporary checkpoints never cleaned up",
        "launch/core/checkpoints.py",
        "if p.is_dir() and p.name.startswith((TMP_PREFIX, DELETING_PREFIX)):",
        "if p.is_dir() and p.name.startswith(DELETING_PREFIX):",
        ["tests/test_resume.py", "tests/test_checkpoints.py"],
    ),
    (
        "B10 a stop signal is not agreed on by every rank",
        "distributed/trainer.py",
        "            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # one tiny all-reduce",
        "            pass",
        [
            "tests/test_resume.py",
            "tests/test_launch.py",
            "tests/test_launch_nodes.py",
            "-k",
            "world_size or sigusr1",
        ],
    ),
    (
        "B11 ZeRO-3 final adapter not gathered",
        "distributed/final_adapter.py",
        "        return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)",
        "        return None",
        ["tests/test_launch.py", "-k", "zero3"],
    ),
    (
        "B12 exit code 75 not relayed by the launcher",
        "launch/workstation.py",
        "        return ranks_code or code",
        "        return code",
        ["tests/test_launch.py", "tests/test_launch_nodes.py", "-k", "sigusr1 or 75"],
    ),
    (
        "B13 metrics not truncated on resume",
        "distributed/sft.py",
        "    rundir.truncate_metrics(out / METRICS_FILE, checkpoint)\n",
        "",
        ["tests/test_resume.py"],
    ),
    (
        "B14 mixture weights ignored by the sampler",
        "distributed/sampler.py",
        "epoch_samples(self.sizes, self.weights, seed=self.seed, epoch=self.epoch),",
        "epoch_samples(self.sizes, [1.0] * len(self.sizes), seed=self.seed, epoch=self.epoch),",
        ["tests/test_sampler.py", "tests/test_train.py", "tests/test_resume.py", "-k", "mixture"],
    ),
    (
        "B15 an EVA run resumed without the ranks EVA chose",
        "distributed/sft.py",
        'config = eva.saved_config(checkpoint) if recipe.peft.init == "eva" and checkpoint is not None else None',
        "config = None",
        ["tests/test_eva.py"],
    ),
]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    only = {a for a in argv if not a.startswith("--")}
    missing = 0
    for name, rel, old, _new, _tests in BUGS:
        count = (REPO / rel).read_text().count(old)
        if count != 1:
            missing += 1
            print(
                f"{name.split()[0]}: the pattern is found {count} times in {rel}: update it", file=sys.stderr
            )
    if check or missing:
        return 1 if missing else 0
    out = REPO / "runs" / "planted-bugs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name, rel, old, new, tests in BUGS:
        if only and name.split()[0] not in only:
            continue
        path = REPO / rel
        text = path.read_text()
        path.write_text(text.replace(old, new))
        started = time.monotonic()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=600", *tests],
                cwd=REPO,
                capture_output=True,
                text=True,
                env={**os.environ, "CI": "true"},
            )
        finally:
            path.write_text(text)
        failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)))
        results[name] = {"tests_run": tests, "failed": failed, "seconds": round(time.monotonic() - started)}
        print(f"{name}: {len(failed)} test(s) caught it" + ("" if failed else "  <-- NOT CAUGHT"), flush=True)
        out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
