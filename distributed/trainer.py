"""The TRL SFTTrainer, with tunefleet's sample order and its counters.

Two changes to the stock trainer:
- the training data loader yields this rank's micro batches from `GlobalBatchSampler`, so the
  samples of every optimizer step are fixed by (seed, epoch), whatever the world size; accelerate
  does not re-shard it (it would pad the last batch with repeated samples);
- every logged step carries `samples_seen` and `tokens_seen`.
The loss of a step is the token-sum over the whole global batch divided by its label-token count
(the trainer's `num_items_in_batch` with `average_tokens_across_devices=True`).
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader
from trl import SFTTrainer

from tunefleet.distributed.sampler import GlobalBatchSampler


class EpochDataLoader(DataLoader):
    """A DataLoader whose `set_epoch` reaches the batch sampler (the trainer calls it each epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)  # type: ignore[union-attr]


class TunefleetTrainer(SFTTrainer):
    def __init__(self, *args: Any, global_batch_size: int, micro_batch_size: int, **kwargs: Any) -> None:
        self.tf_global_batch_size = global_batch_size
        self.tf_micro_batch_size = micro_batch_size
        super().__init__(*args, **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None
        sampler = GlobalBatchSampler(
            len(self.train_dataset),  # type: ignore[arg-type]
            global_batch_size=self.tf_global_batch_size,
            micro_batch_size=self.tf_micro_batch_size,
            world_size=self.args.world_size,
            rank=self.args.process_index,
            seed=self.args.seed,
        )
        return EpochDataLoader(
            self.train_dataset,  # type: ignore[arg-type]
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and not self.args.use_cpu,
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["samples_seen"] = self.state.global_step * self.tf_global_batch_size
            logs["tokens_seen"] = self.state.num_input_tokens_seen
        super().log(logs, start_time)
