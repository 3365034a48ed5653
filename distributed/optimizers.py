"""The optimizers of LoRA+ and LoRA-FA (`peft.loraplus_lr_ratio`, `peft.lora_fa`), built by PEFT.

The trainer asks for its optimizer here first (`TunefleetTrainer.create_optimizer`); None means
the stock one. Both keep the recipe's schedule: the scheduler scales every param group's own
learning rate, so LoRA+'s B groups stay at `ratio` x the A groups' rate through warm-up and decay.
Both are ordinary torch optimizers, so their state (per param group) goes into the checkpoint's
`optimizer.pt` and comes back on resume, also on another world size (the parameters and groups are
the same on any number of ranks).
"""

from __future__ import annotations

from typing import Any

from tunefleet.launch.core.recipe import PeftConfig


def create(model: Any, args: Any, peft: PeftConfig) -> Any | None:
    """The optimizer `peft` asks for over `model`'s trainable parameters, or None for the stock one."""
    if peft.lora_fa:
        from peft.optimizers import create_lorafa_optimizer

        # its own AdamW (train.optimizer is adamw_torch, recipe validation): lr and weight decay from
        # the recipe, the scaling of each layer (rank/alpha patterns, rsLoRA) read from the model
        return create_lorafa_optimizer(
            model, r=peft.r, lora_alpha=peft.alpha, lr=args.learning_rate, weight_decay=args.weight_decay
        )
    if peft.loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer
        from transformers import Trainer

        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        kwargs = dict(kwargs)
        lr = kwargs.pop("lr", args.learning_rate)
        return create_loraplus_optimizer(
            model,
            optimizer_cls,
            lr=lr,
            loraplus_lr_ratio=peft.loraplus_lr_ratio,
            loraplus_weight_decay=args.weight_decay,  # PEFT's default is 0: keep train.weight_decay
            **kwargs,
        )
    return None
