"""The TRL SFTTrainer, with tunefleet's sample order and its counters.

Changes to the stock trainer:
- the training data loader yields this rank's micro batches from `GlobalBatchSampler` (over the
  sources of a `data.mixture`, by weight), so the samples of every optimizer step are fixed by
  (seed, epoch), whatever the world size; accelerate
  does not re-shard it (it would pad the last batch with repeated samples);
- on resume the sampler seeks straight to the sample position (no batch is replayed);
- checkpoints are atomic (the format is `launch/core/checkpoints.py`'s): written to a temporary
  directory, flushed by every rank, completed by a manifest and a marker, renamed into place;
- a preemption signal (SIGTERM/SIGUSR1 on any rank) is agreed on at the next step boundary,
  followed by a checkpoint and a stop;
- every logged step carries `samples_seen` and `tokens_seen`.
The loss of a step is the token-sum over the whole global batch divided by its label-token count
(the trainer's `num_items_in_batch` with `average_tokens_across_devices=True`): transformers'
`Trainer.get_batch_samples` counts the label tokens (`labels[..., 1:] != -100`) of this rank's
accumulation window and all-reduces the count over ranks; TRL's `compute_loss` divides each micro
batch's token-loss sum by that global count and multiplies by the world size, which DDP's gradient
averaging divides out again. Proven by `tests/test_batch_equivalence.py`.

Debug switch (tests only, never in a real run): `TUNEFLEET_DEBUG_LOSS_NORM=micro-batch` drops the
global count (`num_items_in_batch=None`), so every micro batch is normalised by its own token count,
the trainer divides by the accumulation steps and DDP averages the ranks: the mean of per-micro-batch
means, i.e. the stock behaviour without the fix, which depends on the split. It exists so that the
equivalence test can show that it fails under that normalisation.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from tunefleet.distributed import ds_reshard, optimizers
from tunefleet.distributed.final_adapter import save_checkpoint_adapter
from tunefleet.distributed.sampler import GlobalBatchSampler, padded_token_ratio
from tunefleet.launch import hf_compat
from tunefleet.launch.core import checkpoints as ckpt
from tunefleet.launch.core.batch import BatchPlan, Schedule
from tunefleet.launch.core.errors import named_write_failure
from tunefleet.launch.core.recipe import ADAPTER_METHODS, PeftConfig

TRAINER_STATE_NAME = "trainer_state.json"

DEBUG_LOSS_NORM_ENV = "TUNEFLEET_DEBUG_LOSS_NORM"
"""Debug only: `micro-batch` normalises the loss per micro batch (wrong on purpose, see the module doc)."""
DEBUG_LOSS_NORMS = ("global", "micro-batch")


def debug_loss_norm() -> str:
    """The loss normalisation asked for by TUNEFLEET_DEBUG_LOSS_NORM: `global` (the default) or `micro-batch`."""
    value = os.environ.get(DEBUG_LOSS_NORM_ENV, "").strip() or "global"
    if value not in DEBUG_LOSS_NORMS:
        raise ValueError(f"{DEBUG_LOSS_NORM_ENV}={value!r}: expected one of {', '.join(DEBUG_LOSS_NORMS)}")
    return value


def example_lengths(dataset: Any) -> list[int]:
    """Tokens of every example, read from the Arrow column without decoding the rows."""
    import pyarrow.compute as pc

    if getattr(dataset, "_indices", None) is not None:  # a selection: the table's order is not the dataset's
        return [len(ids) for ids in dataset["input_ids"]]
    return pc.list_value_length(dataset.data.column("input_ids")).to_pylist()


class StopFlag:
    """Set by SIGTERM/SIGUSR1; read at step boundaries. A second signal changes nothing.

    `with flag:` installs the handlers and puts back the ones before on leaving, so a caller that
    trains in its own process (the tests, a notebook) is not left with a SIGTERM that only sets
    a flag: processes it forks later would outlive a terminate."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._before: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        self._before = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)
        self._before = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
            print(
                f"received {signal.Signals(signum).name}: checkpointing at the end of this step", flush=True
            )

    @property
    def raised(self) -> bool:
        return self.signal is not None


class EpochDataLoader(DataLoader):
    """A DataLoader whose `set_epoch` reaches the batch sampler (the trainer calls it each epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)  # type: ignore[union-attr]


class StepBoundary(TrainerCallback):
    """At every optimizer-step boundary: the true epoch, and the ranks' agreement on a stop signal."""

    def __init__(self, trainer: TunefleetTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        t = self.trainer
        # the trainer's own epoch counter restarts within a resumed epoch: derive it from the step
        state.epoch = state.global_step / t.tf_steps_per_epoch
        if t.tf_diverged is not None:  # nothing after the last finite step is saved or evaluated
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False
            return
        if t.tf_stop is None:
            return
        flag = torch.tensor([1 if t.tf_stop.raised else 0], device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # one tiny all-reduce
        if flag.item():
            t.tf_stopped = True
            control.should_save = True
            control.should_training_stop = True


class TunefleetTrainer(hf_compat.trainer_base()):  # type: ignore[misc]
    """TRL's SFTTrainer with tunefleet's hooks (`hf_compat.trainer_base`: each private Trainer method
    tunefleet overrides hands over to one `tf_*` method below)."""

    optimizer: Any

    def __init__(
        self,
        *args: Any,
        batch: BatchPlan,
        schedule: Schedule,
        group_by_length: bool,
        padding_free: bool,
        source_sizes: list[int],
        source_weights: list[float],
        identity: ckpt.RunIdentity,
        keep_last: int | None,
        max_nonfinite_steps: int = 0,
        stop: StopFlag | None = None,
        peft: PeftConfig | None = None,
        fresh_optimizer: bool = False,
        **kwargs: Any,
    ) -> None:
        self.tf_batch = batch
        self.tf_schedule = schedule
        self.tf_global_batch_size = batch.global_batch_size
        self.tf_steps_per_epoch = schedule.steps_per_epoch
        self.tf_group_by_length = group_by_length
        self.tf_padding_free = padding_free
        self.tf_source_sizes = source_sizes  # the examples of each source, laid end to end
        self.tf_source_weights = source_weights
        self.tf_identity = identity
        self.tf_keep_last = keep_last
        self.tf_max_nonfinite_steps = max_nonfinite_steps
        self.tf_stop = stop
        self.tf_peft = peft
        self.tf_fresh_optimizer = fresh_optimizer  # resuming a checkpoint whose optimizer state was removed
        self.tf_trains_adapter = peft is None or peft.method in ADAPTER_METHODS
        self.tf_stopped = False
        self.tf_step_finite = True
        self.tf_step_losses: list[float] = []
        self.tf_nonfinite_steps = 0
        self.tf_diverged: dict[str, Any] | None = None
        self.tf_sampler: GlobalBatchSampler | None = None
        self.tf_save_times_s: list[float] = []
        self.tf_loss_norm = debug_loss_norm()
        super().__init__(*args, **kwargs)
        self.tf_lengths = example_lengths(self.train_dataset)
        if self.tf_loss_norm != "global" and self.args.process_index == 0:
            print(
                f"WARNING: {DEBUG_LOSS_NORM_ENV}={self.tf_loss_norm}: the loss is normalised per micro batch "
                "(a debug switch for tests; results depend on the micro batch / world size split)",
                flush=True,
            )
        self.add_callback(StepBoundary(self))

    def batching(self) -> dict[str, Any]:
        """How micro batches are made (for the summary and plan.json), with the padding they cost."""
        ratios = {
            grouped: padded_token_ratio(
                self.tf_lengths,
                sizes=self.tf_source_sizes,
                weights=self.tf_source_weights,
                batch=self.tf_batch,
                steps_per_epoch=self.tf_steps_per_epoch,
                seed=self.args.seed,
                grouped=grouped,
            )
            for grouped in (False, True)
        }
        return {
            "group_by_length": self.tf_group_by_length,
            "padding_free": self.tf_padding_free,
            "padded_token_ratio": round(1.0 if self.tf_padding_free else ratios[self.tf_group_by_length], 4),
            "padded_token_ratio_in_order": round(ratios[False], 4),
        }

    def create_optimizer(self, model: Any = None) -> Any:
        """LoRA+ / LoRA-FA build their own optimizer (`optimizers.py`); otherwise the stock one. Also
        reached under DeepSpeed, which wraps the optimizer this returns."""
        if self.optimizer is None and self.tf_peft is not None:
            self.optimizer = optimizers.create(
                self.model if model is None else model, self.args, self.tf_peft
            )
        return super().create_optimizer(model)

    def get_train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None
        sampler = GlobalBatchSampler(
            self.tf_source_sizes,
            weights=self.tf_source_weights,
            batch=self.tf_batch,
            steps_per_epoch=self.tf_steps_per_epoch,
            rank=self.args.process_index,
            seed=self.args.seed,
            lengths=self.tf_lengths if self.tf_group_by_length else None,
            padding_free=self.tf_padding_free,
        )
        self.tf_sampler = sampler
        return EpochDataLoader(
            self.train_dataset,  # type: ignore[arg-type]
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and not self.args.use_cpu,
        )

    # ------------------------------------------------------------------ hooks (launch/hf_compat.py)

    def tf_after_training_state(self, max_steps: int, resume_from_checkpoint: Any) -> None:
        """The training state is set up (and, resuming, read from the checkpoint)."""
        # the recipe's intervals win over the ones saved in the checkpoint (a harmless change on resume)
        self.state.compute_steps(self.args, max_steps)
        if resume_from_checkpoint is not None and self.tf_sampler is not None:
            # seek to the exact sample position; 0 batches for the trainer to skip (no replay). A
            # checkpoint of the last step leaves nothing to train: the trainer goes straight to the end
            # (it would otherwise train the next batch before checking max_steps)
            self.tf_sampler.seek_to_step(self.state.global_step, total_steps=max_steps)

    def tf_load_optimizer_state(self, checkpoint: Any) -> bool:
        """Resuming with a fresh optimizer (`--resume-weights-only`: the checkpoint's optimizer state
        was removed): the optimizer keeps its fresh state and the schedule, a function of the step, is
        stepped to the checkpoint's step (its `scheduler.pt` is not read: it may be gone or stale).
        True: done here, the stock loading is skipped. False: the stock loading."""
        if checkpoint is None or not self.tf_fresh_optimizer:
            return False
        import warnings

        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose
            warnings.simplefilter("ignore")
            for _ in range(ckpt.read_manifest(Path(checkpoint)).step):
                self.lr_scheduler.step()
        return True

    def tf_deepspeed_loader(self, resume_from_checkpoint: Any) -> Any:
        """A ZeRO checkpoint from another world size is loaded by `ds_reshard.load` instead of
        DeepSpeed's own loader (which refuses it); None keeps the stock loading."""
        if (
            resume_from_checkpoint is not None
            and self.is_deepspeed_enabled
            and ckpt.read_manifest(Path(resume_from_checkpoint)).world_size != self.args.world_size
        ):
            # an adapter's state was saved whole (zero_state.pt); a full or partial fine-tune's is
            # re-cut from DeepSpeed's own ZeRO-3 files (ZeRO-2 of another world size is refused at start)
            return ds_reshard.load if self.tf_trains_adapter else ds_reshard.load_zero3_partitions
        return None

    def tf_save_checkpoint(self) -> None:
        """Atomic checkpoint: temporary dir, every rank's part flushed, manifest + marker, rename. A
        write the machine refuses (disk full, read-only, quota) is named, and this rank's partial
        write removed (`errors.named_write_failure`); the checkpoints before it stay as they were."""
        step = self.state.global_step
        run_dir = Path(str(self.args.output_dir))
        tmp = ckpt.tmp_dir_for(run_dir, step)
        try:
            self._write_checkpoint(step, run_dir, tmp)
        except (OSError, RuntimeError) as exc:
            named = named_write_failure(exc, tmp.parent, f"writing {ckpt.dirname(step)} into {tmp.parent}")
            if named is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # tunefleet's own partial write: frees the space
            raise named from None

    def _write_checkpoint(self, step: int, run_dir: Path, tmp: Path) -> None:
        started = time.monotonic()
        final = ckpt.dir_for(run_dir, step)
        if self.args.should_save:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()

        # a full ZeRO-3 model's weights are in DeepSpeed's own per-rank files, which the optimizer's
        # save writes: transformers' save_model would write them once more (after failing to gather
        # a 16-bit copy on rank 0)
        zero3_weights = (
            not self.tf_trains_adapter
            and self.is_deepspeed_enabled
            and self.model_wrapped.zero_optimization_partition_weights()
        )
        self.save_trainer_parts(str(tmp), model=not zero3_weights)
        # an adapter is small: gathered whole next to the shards. A full or partial fine-tune's weights
        # and optimizer state stay in the ranks' shards (DCP under FSDP2, DeepSpeed's own under ZeRO)
        if self.tf_trains_adapter:
            if self.is_fsdp_enabled:  # + a normal PEFT adapter gathered from the shards (merge/generate)
                save_checkpoint_adapter(self, tmp)
            if self.is_deepspeed_enabled:  # + the trainable state in a rank-independent file (ds_reshard.py)
                ds_reshard.save(self.model_wrapped, tmp, main_process=self.args.should_save)
        if self.args.should_save:
            for cb in [
                c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)
            ]:
                self.state.stateful_callbacks[cb.__class__.__name__] = cb.state()  # type: ignore[index,call-overload]
            self.state.save_to_json(str(tmp / TRAINER_STATE_NAME))
        if tmp.exists():
            ckpt.fsync_tree(tmp)  # this rank's part is on stable storage
        self.accelerator.wait_for_everyone()
        if os.environ.get("TUNEFLEET_TEST_SAVE_DELAY_S"):  # tests: widen the window before the marker
            time.sleep(float(os.environ["TUNEFLEET_TEST_SAVE_DELAY_S"]))

        if self.args.should_save:
            save_s = time.monotonic() - started
            manifest = ckpt.Manifest.for_step(
                self.tf_identity,
                step=step,
                steps_per_epoch=self.tf_steps_per_epoch,
                tokens_seen=self.state.num_input_tokens_seen,
                save_s=save_s,
            )
            ckpt.finalize(tmp, final, manifest)
            ckpt.apply_retention(run_dir, self.tf_keep_last)
            self.tf_save_times_s.append(save_s)
            print(f"checkpoint {final.name} complete ({save_s:.2f} s)", flush=True)
        self.accelerator.wait_for_everyone()

    def tf_after_micro_batch(self, loss: Any) -> None:
        """Every micro batch: remember whether its loss was finite (checked at the optimizer step)."""
        if not bool(torch.isfinite(loss.detach()).all()):
            self.tf_step_finite = False
            self.tf_step_losses.append(float(loss.detach().float().mean()))

    def tf_before_optimizer_step(self, model: Any, grad_norm: Any) -> None:
        """Every rank, right before the optimizer steps: a step whose loss (on any rank) or gradient
        norm is not finite moves no weight. It stops the run (`tf_diverged`: nothing is saved after the
        last finite step), or, within `train.max_nonfinite_steps`, only skips its update. Under fp16
        the loss scaler's own overflow steps (an infinite gradient norm) are left to it."""
        norm = float(grad_norm) if grad_norm is not None else None
        finite = self.tf_step_finite and (self.args.fp16 or norm is None or math.isfinite(norm))
        flag = torch.tensor([1 if finite else 0], device=self.args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        losses, self.tf_step_finite, self.tf_step_losses = self.tf_step_losses, True, []
        if flag.item():
            return
        self.tf_nonfinite_steps += 1
        step = self.state.global_step + 1
        allowed = self.tf_max_nonfinite_steps
        if not self.is_deepspeed_enabled:
            for param in model.parameters():  # the optimizer skips a parameter without a gradient
                param.grad = None
        if self.tf_nonfinite_steps > allowed:
            self.tf_diverged = {"step": step, "loss": losses[0] if losses else None, "grad_norm": norm}
            return
        if self.args.process_index == 0:
            print(
                f"warning: step {step}: the loss or the gradient norm ({norm}) is not finite; its update is "
                f"skipped ({self.tf_nonfinite_steps} of train.max_nonfinite_steps={allowed})",
                flush=True,
            )

    def tf_loss_normaliser(self, num_items_in_batch: Any) -> Any:
        """The global label-token count of a step, which the loss is divided by.

        Only the debug switch changes anything here (see the module doc): with
        TUNEFLEET_DEBUG_LOSS_NORM=micro-batch the count is dropped, so the loss is normalised per
        micro batch. The count is still computed (and all-reduced) first, so every rank makes the
        same collective calls either way."""
        return None if self.tf_loss_norm == "micro-batch" else num_items_in_batch

    def tf_count_input_tokens(self, inputs: dict[str, Any]) -> bool:
        """A padding-free row has no padding and no attention mask: every token counts (the stock
        count would skip every eos, which doubles as the pad token). False: the stock count."""
        if self.tf_padding_free and "attention_mask" not in inputs:
            tokens = torch.as_tensor(inputs["input_ids"].numel(), device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()
            return True
        return False

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["samples_seen"] = self.state.global_step * self.tf_global_batch_size
            logs["tokens_seen"] = self.state.num_input_tokens_seen
        super().log(logs, start_time)
