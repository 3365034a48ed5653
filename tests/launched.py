"""Training runs launched once per test session and shared by every test that asserts on them.

A multi-process run costs ~10-15 s on the 2-core machine, most of it starting processes; the
properties tests check of it (losses equal to one process, the sharding in effect, the final
adapter or model, its checkpoints, a resume on another world size from one of them) are many. So
each run is described once here (`SPECS`: processes and overrides of the demo recipe), launched the
first time a test asks for it (`Launched.get`, the session fixture `launched` in conftest.py), and
read by all the others. Tests never write into a shared run's directory: a resume goes to a new
output_dir (`--resume CHECKPOINT`).

Runs of one process whose code path is `tunefleet train`'s run in the test process itself
(`sft.run`): the same code without a second interpreter's start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tunefleet.distributed import cpu_fsdp

DEMO = Path(str(resources.files("tunefleet.recipes"))) / "demo.yaml"
EXTENSIONS = Path.home() / ".cache" / "tunefleet" / "torch_extensions"
"""DeepSpeed JIT-compiles its shared-memory op once into this cache (g++ and ninja needed)."""

TOL = 1e-5
"""Per-step losses: any strategy vs one process."""
ADAPTER_TOL = 1e-4
"""Final adapter (or model) weights vs one process. Looser than the losses because Adam divides each
gradient element by its own magnitude: an element whose gradient is near eps (1e-8) moves by up to
lr in the first steps whatever its tiny value, so last-bit differences in ZeRO-3's reduce-scatter
become ~1e-5 differences in a few lora_B elements (measured 6e-6 for ZeRO-3, 4e-5 for ZeRO-3 +
QLoRA, set at step 1-2 and not growing; DDP/ZeRO-2 4e-7) while the losses agree to 1e-6."""
ADAPTER_OUTLIERS = 1e-4
"""The share of elements allowed beyond ADAPTER_TOL (`weights_differ`): lora_A's gradient is exactly
0 at step 1 (lora_B starts at 0) and ~1e-9 at step 2, where a 3-rank sum's last bit can flip its
sign and Adam moves the element by lr either way. Measured: ZeRO-2 on 3 processes, 9 of 299,008
elements beyond 1e-5, the largest 1.8e-4 (lr 3e-3), the losses equal to 5e-7. A wrong gather or a
stale shard moves whole tensors, thousands of elements."""


def weights_differ(got: dict[str, Any], want: dict[str, Any]) -> tuple[float, int, int]:
    """(largest difference, elements beyond ADAPTER_TOL, elements) of two state dicts, which must
    hold the same names; `assert_weights_match` bounds the last two."""
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    worst, beyond, total = 0.0, 0, 0
    for k in want:
        diff = (got[k].float() - want[k].float()).abs()
        worst = max(worst, diff.max().item())
        beyond += int((diff > ADAPTER_TOL).sum().item())
        total += diff.numel()
    return worst, beyond, total


def assert_weights_match(got: dict[str, Any], want: dict[str, Any], name: str, *, lr: float) -> None:
    """Every element within ADAPTER_TOL, but for at most ADAPTER_OUTLIERS of them, each of which
    still within the lr Adam can move it by in the run's steps."""
    worst, beyond, total = weights_differ(got, want)
    print(
        f"{name}: max |weights - 1 process| = {worst:.2e} ({beyond} of {total} beyond {ADAPTER_TOL})",
        flush=True,
    )
    assert beyond <= ADAPTER_OUTLIERS * total, (
        f"{beyond} of {total} elements differ by more than {ADAPTER_TOL}"
    )
    assert worst <= 2 * lr * STEPS, f"an element differs by {worst}, more than Adam moves it in {STEPS} steps"


STEPS = 4
BASE = (
    "data.limit=32",
    "data.max_length=64",
    "batch.micro_batch_size=2",
    "batch.global_batch_size=8",
    f"train.max_steps={STEPS}",
    "train.logging_steps=1",
    "train.save_steps=2",
    "train.warmup_ratio=0",
    "peft.dropout=0.0",
    "train.precision=fp32",
    "checkpoint.keep_last=null",
)
"""The short demo run every shared run starts from: 4 steps, checkpoints at steps 2 and 4."""
QLORA = ("model.quantization=nf4",)
IN_ORDER = "batch.group_by_length=false"
"""The references cut micro batches in sampler order; the launched runs group them by length (the
default): the same steps, whatever the strategy."""

FULL = ("peft.method=full", "train.lr=1e-4", "data.eval_ratio=0.25")
"""Full fine-tuning of the demo model: every weight, at a full fine-tune's learning rate; 8 rows held
out, so the last step is evaluated (its eval loss is what final/ must reproduce)."""
FREEZE = (
    "peft.method=freeze",
    "peft.trainable_layers=1",
    "peft.extra_modules=[lm_head]",
    "train.lr=1e-4",
    "data.eval_ratio=0.25",
)
"""Partial fine-tuning: the last decoder layer and the output head train, the rest stays frozen."""


@dataclass(frozen=True)
class Spec:
    nproc: int
    overrides: tuple[str, ...]
    in_process: bool = False
    """One process run with `sft.run` in the test process (the references)."""
    env: tuple[tuple[str, str], ...] = field(default_factory=tuple)


SPECS: dict[str, Spec] = {
    # one process, in this process: what every launch is compared with (same global batch)
    "lora-8": Spec(1, (IN_ORDER,), in_process=True),
    "qlora-8": Spec(1, (IN_ORDER, *QLORA, "model.quant_storage_dtype=float32"), in_process=True),
    "lora-6": Spec(1, (IN_ORDER, "batch.global_batch_size=6"), in_process=True),
    "full-8": Spec(1, (IN_ORDER, *FULL), in_process=True),
    "freeze-8": Spec(1, (IN_ORDER, *FREEZE), in_process=True),
    # LoRA / QLoRA under every strategy (tests/test_launch.py)
    "ddp": Spec(2, ("parallel.strategy=ddp",)),
    "zero2": Spec(2, ("parallel.strategy=deepspeed-zero2",)),
    "zero3": Spec(2, ("parallel.strategy=deepspeed-zero3",)),
    "zero3-qlora": Spec(2, ("parallel.strategy=deepspeed-zero3", *QLORA)),
    "fsdp": Spec(2, ("parallel.strategy=fsdp",)),
    "ddp-padding-free": Spec(2, ("parallel.strategy=ddp", "batch.padding_free=true")),
    "fsdp-qlora": Spec(2, ("parallel.strategy=fsdp-qlora", *QLORA)),
    "zero2-3proc": Spec(3, ("parallel.strategy=deepspeed-zero2", "batch.global_batch_size=6")),
    # full and partial fine-tuning (tests/test_full_finetune.py)
    "full-ddp": Spec(2, ("parallel.strategy=ddp", *FULL)),
    "full-fsdp": Spec(2, ("parallel.strategy=fsdp", *FULL)),
    "full-zero2": Spec(2, ("parallel.strategy=deepspeed-zero2", *FULL)),
    "full-zero3": Spec(2, ("parallel.strategy=deepspeed-zero3", *FULL)),
    "freeze-fsdp": Spec(2, ("parallel.strategy=fsdp", *FREEZE)),
    "freeze-ddp": Spec(2, ("parallel.strategy=ddp", *FREEZE)),
}


def sets(*overrides: str) -> list[str]:
    return [arg for o in [*BASE, *overrides] for arg in ("--set", o)]


def launch_argv(out: Path, nproc: int, *overrides: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tunefleet.launch.cli",
        "launch",
        str(DEMO),
        "--nproc",
        str(nproc),
        *sets(f"output_dir={out}", *overrides),
        *extra,
    ]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS))
    e.pop(cpu_fsdp.ENV_SWITCH, None)
    return {**e, **extra}


def run_launch(
    out: Path,
    nproc: int,
    overrides: list[str] | tuple[str, ...],
    *,
    extra: tuple[str, ...] = (),
    **env_extra: str,
) -> subprocess.CompletedProcess:
    """`tunefleet launch --nproc N` of the demo with BASE + `overrides`; its output in `.stdout`."""
    log = out.parent / f"{out.name}.log"
    with log.open("w") as f:
        proc = subprocess.run(
            launch_argv(out, nproc, *overrides, extra=extra),
            env=env(**env_extra),
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=420,
        )
    proc.stdout = log.read_text()  # type: ignore[assignment]
    return proc


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def max_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) for s in a)


def adapter(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def plan_in_effect(out: Path) -> dict[str, Any]:
    return json.loads((out / "plan.json").read_text())["in_effect"]


class Launched:
    """The shared runs of one test session (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, Path] = {}
        self.seconds: dict[str, float] = {}

    def get(self, name: str) -> Path:
        """The output directory of run `name` (SPECS), launched now if no test has asked for it yet."""
        if name not in self.done:
            spec = SPECS[name]
            out = self.root / name
            started = time.monotonic()
            if spec.in_process:
                from tunefleet.distributed import sft
                from tunefleet.launch.core import recipe as R

                assert sft.run(R.load(DEMO, [*BASE, f"output_dir={out}", *spec.overrides])) == 0
            else:
                proc = run_launch(out, spec.nproc, spec.overrides, **dict(spec.env))
                assert proc.returncode == 0, proc.stdout[-6000:]
            self.seconds[name] = time.monotonic() - started
            print(f"shared run {name}: {self.seconds[name]:.1f} s", flush=True)
            self.done[name] = out
        return self.done[name]
