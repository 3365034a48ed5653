"""tunefleet's integration surface: every place it leans on a private (or undocumented) part of
transformers, TRL, PEFT or accelerate, in one module, and what it relies on elsewhere in
DeepSpeed and torch.

Each hook is here, not scattered: the Trainer methods tunefleet overrides (`trainer_base`), the
transformers function it swaps during a resume (`deepspeed_loader_replaced`), the accelerate class
it patches to run FSDP2 on CPU (`enable_fsdp2_on_cpu`), and the private functions and classes it
calls. `RELIANCES` says, for each one, what is relied on (name, signature, behaviour) and what
tunefleet does with it; `CHECKED_ON` the releases it was checked on. `problems()` checks every
reliance against the installed releases; tests/test_hf_compat.py runs it in the fast suite, so an
upgrade that renames or reshapes one fails there, by name, instead of showing up as a wrong
checkpoint or a silent fallback after a long run.

Nothing of tunefleet is imported here and every library is imported lazily: the launcher imports
this module without torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

CHECKED_ON = {
    "transformers": "5.23.0, 5.25.0",
    "trl": "1.16.0",
    "peft": "0.21.2",
    "accelerate": "1.15.0, 1.16.0",
    "deepspeed": "0.19.8",
    "torch": "2.13.0",
}
"""The releases every reliance below was checked on (the lock's, and the newest ones then)."""


# ----------------------------------------------------------------------------- transformers' Trainer


@functools.cache
def trainer_base() -> type:
    """TRL's SFTTrainer with the private Trainer methods tunefleet overrides, each handing over to
    one `tf_*` method of the subclass (`distributed/trainer.py`). Made on first use (TRL is heavy)."""
    from trl import SFTTrainer

    class TrainerHooks(SFTTrainer):  # type: ignore[misc]
        def _init_training_state(  # noqa: PLR0913 - transformers' signature
            self,
            max_steps: int,
            num_update_steps_per_epoch: int,
            num_train_epochs: int,
            resume_from_checkpoint: Any,
            trial: Any,
        ) -> tuple[int, int]:
            epochs_trained, _ = super()._init_training_state(
                max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
            )
            self.tf_after_training_state(max_steps, resume_from_checkpoint)  # type: ignore[attr-defined]
            return epochs_trained, 0  # no batch for the trainer to skip: the sampler seeks

        def _prepare_for_training(
            self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: Any
        ) -> Any:
            loader = self.tf_deepspeed_loader(resume_from_checkpoint)  # type: ignore[attr-defined]
            if loader is None:
                return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
            with deepspeed_loader_replaced(loader):
                return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)

        def _load_optimizer_and_scheduler(self, checkpoint: Any) -> None:
            if not self.tf_load_optimizer_state(checkpoint):  # type: ignore[attr-defined]
                super()._load_optimizer_and_scheduler(checkpoint)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            self.tf_save_checkpoint()  # type: ignore[attr-defined]

        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.tf_after_micro_batch(loss)  # type: ignore[attr-defined]
            return loss

        def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
            norm = super()._get_grad_norm(model, grad_norm=grad_norm)
            self.tf_before_optimizer_step(model, norm)  # type: ignore[attr-defined]
            return norm

        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
            batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
            return batches, self.tf_loss_normaliser(num_items_in_batch)  # type: ignore[attr-defined]

        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            if not self.tf_count_input_tokens(inputs):  # type: ignore[attr-defined]
                super()._track_num_input_tokens(inputs)

        def save_trainer_parts(self, directory: str, *, model: bool = True) -> None:
            """What transformers' own `_save_checkpoint` writes into a checkpoint, in its order:
            FLOs into the state, the model (adapter, or the shards of a sharded model; `model=False`
            where the optimizer's save holds it already), optimizer and scheduler, the gradient
            scaler, this rank's RNG state."""
            self.store_flos()
            if model:
                self.save_model(directory, _internal_call=True)
            self._save_optimizer_and_scheduler(directory)
            self._save_scaler(directory)
            self._save_rng_state(directory)

        def steps_before_this_attempt(self) -> int:
            """The step the trainer resumed from (0 on a fresh start)."""
            return int(getattr(self, "_initial_global_step", 0))

    return TrainerHooks


@contextlib.contextmanager
def deepspeed_loader_replaced(loader: Callable[[Any, Any], None]) -> Iterator[None]:
    """Within the block, transformers' DeepSpeed resume (`transformers.trainer.deepspeed_load_checkpoint`,
    looked up by `Trainer._prepare_for_training` when it runs) is `loader(engine, path)` instead."""
    import transformers.trainer as hf_trainer

    original = hf_trainer.deepspeed_load_checkpoint
    hf_trainer.deepspeed_load_checkpoint = lambda engine, path, **_: loader(engine, path)
    try:
        yield
    finally:
        hf_trainer.deepspeed_load_checkpoint = original


# ----------------------------------------------------------------------------- accelerate

_FSDP2_ON_CPU = "_tunefleet_cpu_fsdp"


def fsdp2_on_cpu_enabled() -> bool:
    from accelerate.state import AcceleratorState

    return bool(getattr(AcceleratorState.__init__, _FSDP2_ON_CPU, False))


def enable_fsdp2_on_cpu() -> None:
    """Let accelerate select FSDP2 on a CPU (gloo) world (why: `distributed/cpu_fsdp.py`). Wraps
    `AcceleratorState.__init__`: after the original, a MULTI_CPU state given an FSDP2 plugin is made
    FSDP the way accelerate does it for GPUs (distributed type, mixed precision on the plugin, the
    plugin on the state, PartialState's shared distributed type). Idempotent."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    if fsdp2_on_cpu_enabled():
        return
    original = AcceleratorState.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is None or self.distributed_type != DistributedType.MULTI_CPU:
            return
        if getattr(plugin, "fsdp_version", 1) != 2:
            return  # FSDP1 on CPU stays unsupported; the entrypoint's check stops the run
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type

    setattr(__init__, _FSDP2_ON_CPU, True)
    AcceleratorState.__init__ = __init__  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- TRL


def language_modeling_collator(pad_token_id: int, *, padding_free: bool) -> Any:
    """TRL's SFT collator (`trl.trainer.sft_trainer.DataCollatorForLanguageModeling`, not exported at
    the top level). Padding-free: a micro batch in one row, `position_ids` restarting at every sample,
    the first label of each sample masked."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=padding_free)


# ----------------------------------------------------------------------------- tokenizers and templates


def plain_fast_tokenizer(tokenizer: Any) -> bool:
    """A fast tokenizer whose `encode` is transformers' own call of the `tokenizers` backend (some
    model classes change the text in Python first: those are called one text at a time)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    cls = type(tokenizer)
    return (
        isinstance(tokenizer, TokenizersBackend)
        and cls._encode_plus is TokenizersBackend._encode_plus
        and cls.encode is PreTrainedTokenizerBase.encode
        and cls.tokenize is TokenizersBackend.tokenize
    )


def render_jinja_template(**kwargs: Any) -> Any:
    """transformers' chat-template renderer with `{% generation %}` spans
    (`transformers.utils.chat_template_utils.render_jinja_template`)."""
    from transformers.utils.chat_template_utils import render_jinja_template as render

    return render(**kwargs)


def template_internals() -> Any | None:
    """transformers' private chat-template pieces the skeleton renderer uses (`_alias_reasoning_fields`,
    `_compile_jinja_template`, `_plain_template_data`, `_render_with_assistant_indices`), or None when
    a release moved them (the per-row reference then serves every row: slower, the same tokens)."""
    try:
        from transformers.utils import chat_template_utils as ctu
    except ImportError:
        return None
    names = (
        "_alias_reasoning_fields",
        "_compile_jinja_template",
        "_plain_template_data",
        "_render_with_assistant_indices",
    )
    if not all(hasattr(ctu, n) for n in names):
        return None
    return ctu


def bnb_quantized_linears(model: Any) -> Iterator[Any]:
    """The `nn.Linear` modules bitsandbytes would quantize, by transformers' own rule (its keys not to
    convert: the output head, tied weights)."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model)
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and should_convert_module(name, skip):
            yield module


# ----------------------------------------------------------------------------- what is relied on


@dataclasses.dataclass(frozen=True)
class Reliance:
    what: str
    """The name and signature (or behaviour) relied on."""
    why: str
    """What tunefleet does with it, and where."""
    check: Callable[[], str | None]
    """None when the installed release has it; otherwise what is wrong."""


def _resolve(dotted: str) -> Any:
    """`package.module:Qualified.name` -> the object (ImportError / AttributeError when gone)."""
    module, _, qualname = dotted.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


def _has(dotted: str, *params: str) -> Callable[[], str | None]:
    """Check that `dotted` exists and, when `params` are given, takes them first, in this order."""

    def check() -> str | None:
        try:
            obj = _resolve(dotted)
        except (ImportError, AttributeError) as exc:
            return f"{dotted} is gone ({type(exc).__name__}: {exc})"
        if not params:
            return None
        names = [n for n in inspect.signature(obj).parameters if n != "self"]
        if names[: len(params)] != list(params):
            return f"{dotted} takes ({', '.join(names)}), tunefleet calls it with ({', '.join(params)})"
        return None

    return check


def _source_mentions(dotted: str, *needles: str) -> Callable[[], str | None]:
    """Check that the source of `dotted` still contains each of `needles` (a behaviour, not a name)."""

    def check() -> str | None:
        try:
            source = inspect.getsource(_resolve(dotted))
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            return f"{dotted} cannot be read ({type(exc).__name__}: {exc})"
        missing = [n for n in needles if n not in source]
        return f"{dotted} no longer mentions {', '.join(missing)}" if missing else None

    return check


def _attributes(dotted: str, *names: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            obj = _resolve(dotted)
        except (ImportError, AttributeError) as exc:
            return f"{dotted} is gone ({type(exc).__name__}: {exc})"
        missing = [n for n in names if not hasattr(obj, n)]
        return f"{dotted} has no {', '.join(missing)}" if missing else None

    return check


_TRAINER = "transformers.trainer:Trainer"

RELIANCES: tuple[Reliance, ...] = (
    Reliance(
        "transformers Trainer._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs, "
        "resume_from_checkpoint, trial) -> (epochs_trained, steps_to_skip)",
        "trainer_base: on resume the sampler seeks to the checkpoint's sample position and the trainer "
        "skips no batch (distributed/trainer.py, tf_after_training_state)",
        _has(
            f"{_TRAINER}._init_training_state",
            "max_steps",
            "num_update_steps_per_epoch",
            "num_train_epochs",
            "resume_from_checkpoint",
            "trial",
        ),  # fmt: skip
    ),
    Reliance(
        "transformers Trainer._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint), "
        "which loads a DeepSpeed checkpoint through the module attribute transformers.trainer."
        "deepspeed_load_checkpoint(engine, path, load_module_strict)",
        "trainer_base + deepspeed_loader_replaced: a ZeRO checkpoint of another world size is loaded by "
        "distributed/ds_reshard.py instead",
        lambda: (
            _has(
                f"{_TRAINER}._prepare_for_training", "max_steps", "train_dataloader", "resume_from_checkpoint"
            )()
            or _has("transformers.trainer:deepspeed_load_checkpoint", "deepspeed_engine", "checkpoint_path")()
            or _source_mentions(f"{_TRAINER}._prepare_for_training", "deepspeed_load_checkpoint")()
        ),
    ),
    Reliance(
        "transformers Trainer._load_optimizer_and_scheduler(checkpoint), called on resume once the "
        "optimizer and self.lr_scheduler exist (not under DeepSpeed, whose engine loads its own)",
        "trainer_base: a checkpoint whose optimizer state was removed (--resume-weights-only) keeps the "
        "fresh optimizer and brings the schedule to its step (TunefleetTrainer.tf_load_optimizer_state)",
        lambda: (
            _has(f"{_TRAINER}._load_optimizer_and_scheduler", "checkpoint")()
            or _source_mentions(f"{_TRAINER}._prepare_for_training", "self._load_optimizer_and_scheduler(")()
        ),
    ),
    Reliance(
        "transformers Trainer._save_checkpoint(model, trial), and the pieces it is made of: store_flos(), "
        "save_model(output_dir, _internal_call), _save_optimizer_and_scheduler(output_dir), "
        "_save_scaler(output_dir), _save_rng_state(output_dir)",
        "trainer_base: tunefleet's atomic checkpoint replaces the stock one and writes the same parts "
        "(save_trainer_parts) into its temporary directory",
        lambda: (
            _has(f"{_TRAINER}._save_checkpoint", "model", "trial")()
            or _has(f"{_TRAINER}.save_model", "output_dir", "_internal_call")()
            or _has(f"{_TRAINER}._save_optimizer_and_scheduler", "output_dir")()
            or _has(f"{_TRAINER}._save_scaler", "output_dir")()
            or _has(f"{_TRAINER}._save_rng_state", "output_dir")()
            or _has(f"{_TRAINER}.store_flos")()
        ),
    ),
    Reliance(
        "transformers Trainer.get_batch_samples(epoch_iterator, num_batches, device) -> (batches, "
        "num_items_in_batch: the label tokens of the whole global batch, all-reduced over the ranks)",
        "trainer_base: the loss of a step is normalised over its real token count; the debug switch "
        "TUNEFLEET_DEBUG_LOSS_NORM drops the count (tests/test_batch_equivalence.py)",
        _has(f"{_TRAINER}.get_batch_samples", "epoch_iterator", "num_batches", "device"),
    ),
    Reliance(
        "transformers Trainer.training_step(model, inputs, num_items_in_batch) -> the micro batch's loss; "
        "Trainer._get_grad_norm(model, grad_norm) -> the step's gradient norm, called on every rank right "
        "before optimizer.step() (after clipping)",
        "trainer_base: a non-finite loss or gradient norm stops the run at that step, or skips its update "
        "(train.max_nonfinite_steps), before the optimizer moves the weights",
        lambda: (
            _has(f"{_TRAINER}.training_step", "model", "inputs", "num_items_in_batch")()
            or _has(f"{_TRAINER}._get_grad_norm", "model", "grad_norm")()
            or _source_mentions(f"{_TRAINER}._run_epoch", "self._get_grad_norm(", "self.optimizer.step()")()
        ),
    ),
    Reliance(
        "transformers Trainer._track_num_input_tokens(inputs), counting state.num_input_tokens_seen",
        "trainer_base: a padding-free row counts every token (the stock count skips the eos/pad id)",
        _has(f"{_TRAINER}._track_num_input_tokens", "inputs"),
    ),
    Reliance(
        "transformers Trainer sets self._initial_global_step (the step a resumed run started from)",
        "trainer_base.steps_before_this_attempt: the run summary's steps of this attempt",
        _source_mentions(_TRAINER, "self._initial_global_step"),
    ),
    Reliance(
        "accelerate AcceleratorState.__init__(..., fsdp_plugin=...), its distributed_type and "
        "_mixed_precision, PartialState._shared_state, FullyShardedDataParallelPlugin.set_mixed_precision "
        "and .fsdp_version",
        "enable_fsdp2_on_cpu: FSDP2 on CPU/gloo (accelerate alone runs DDP there without a word)",
        lambda: (
            _has(
                "accelerate.state:AcceleratorState.__init__",
                "mixed_precision",
                "cpu",
                "dynamo_plugin",
                "deepspeed_plugin",
                "fsdp_plugin",
            )()
            or _source_mentions(
                "accelerate.state:AcceleratorState.__init__", "self._mixed_precision", "distributed_type"
            )()
            or _attributes("accelerate.state:PartialState", "_shared_state")()
            or _attributes("accelerate.utils:FullyShardedDataParallelPlugin", "set_mixed_precision")()
            or _source_mentions(
                "accelerate.utils.dataclasses:FullyShardedDataParallelPlugin", "fsdp_version"
            )()
        ),
    ),  # fmt: skip
    Reliance(
        "TRL trl.trainer.sft_trainer.DataCollatorForLanguageModeling(pad_token_id, padding_free=...)",
        "language_modeling_collator: padding-free micro batches (distributed/sft.py) and EVA's batches "
        "(distributed/eva.py)",
        _has("trl.trainer.sft_trainer:DataCollatorForLanguageModeling", "pad_token_id", "padding_free"),
    ),
    Reliance(
        "transformers TokenizersBackend (transformers.tokenization_utils_tokenizers) with _encode_plus and "
        "tokenize, PreTrainedTokenizerBase.encode",
        "plain_fast_tokenizer: many texts per call to the tokenizers backend when preparing data "
        "(distributed/data/batched.py); otherwise one text at a time",
        _attributes(
            "transformers.tokenization_utils_tokenizers:TokenizersBackend", "_encode_plus", "tokenize"
        ),
    ),
    Reliance(
        "transformers transformers.utils.chat_template_utils.render_jinja_template(conversations, tools, "
        "documents, chat_template, return_assistant_tokens_mask, ...) -> (texts, generation spans)",
        "render_jinja_template: the answer spans of chat rows ({% generation %}, distributed/data/chat.py)",
        _has(
            "transformers.utils.chat_template_utils:render_jinja_template",
            "conversations",
            "tools",
            "documents",
            "chat_template",
            "return_assistant_tokens_mask",
        ),  # fmt: skip
    ),
    Reliance(
        "transformers chat_template_utils._alias_reasoning_fields, _compile_jinja_template, "
        "_plain_template_data, _render_with_assistant_indices",
        "template_internals: the skeleton renderer of chat rows (distributed/data/skeleton.py); when gone, "
        "the per-row reference serves every row (slower)",
        _attributes(
            "transformers.utils.chat_template_utils",
            "_alias_reasoning_fields",
            "_compile_jinja_template",
            "_plain_template_data",
            "_render_with_assistant_indices",
        ),  # fmt: skip
    ),
    Reliance(
        "transformers transformers.quantizers.base.get_keys_to_not_convert(model), "
        "transformers.quantizers.quantizers_utils.should_convert_module(full_name, patterns)",
        "bnb_quantized_linears: how many weights bitsandbytes quantizes, for tunefleet plan's counts "
        "(launch/params.py)",
        lambda: (
            _has("transformers.quantizers.base:get_keys_to_not_convert", "model")()
            or _has(
                "transformers.quantizers.quantizers_utils:should_convert_module", "full_name", "patterns"
            )()
        ),
    ),
    Reliance(
        "PEFT peft.tuners.lora.eva.get_eva_state_dict(model, dataloader, ...), "
        "initialize_lora_eva_weights(model, eva_state_dict, ...)",
        "EVA's data-driven initialisation, computed on rank 0 (distributed/eva.py)",
        lambda: (
            _has("peft.tuners.lora.eva:get_eva_state_dict", "model", "dataloader")()
            or _has("peft.tuners.lora.eva:initialize_lora_eva_weights", "model")()
        ),
    ),
    Reliance(
        "DeepSpeed DeepSpeedEngine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters)",
        "the final adapter of a ZeRO-3 run, gathered without the frozen base (distributed/final_adapter.py)",
        _has(
            "deepspeed.runtime.engine:DeepSpeedEngine._zero3_consolidated_16bit_state_dict",
            "exclude_frozen_parameters",
        ),  # fmt: skip
    ),
    Reliance(
        "DeepSpeed ZeRO-1/2 DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state and "
        "_hp_optimizer_states_linked, single_partition_of_fp32_groups; ZeRO-3 fp32_partitioned_groups_flat; "
        "deepspeed.utils.safe_get/set_full_fp32_param and _optimizer_state",
        "ZeRO checkpoints that resume on another world size (distributed/ds_reshard.py)",
        lambda: (
            _has(
                "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state"
            )()
            or _source_mentions(
                "deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer",
                "_hp_optimizer_states_linked",
                "single_partition_of_fp32_groups",
            )()
            or _source_mentions(
                "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3", "fp32_partitioned_groups_flat"
            )()
            or _attributes(
                "deepspeed.utils",
                "safe_get_full_fp32_param",
                "safe_get_full_optimizer_state",
                "safe_set_full_fp32_param",
                "safe_set_full_optimizer_state",
            )()
        ),
    ),  # fmt: skip
    Reliance(
        "torch torch.distributed.fsdp._flat_param.FlatParameter and its _num_params",
        "the sharding check of FSDP1 runs, counted in original parameters (distributed/guard.py)",
        lambda: (
            _has("torch.distributed.fsdp._flat_param:FlatParameter")()
            or _source_mentions("torch.distributed.fsdp._flat_param:FlatParameter", "_num_params")()
        ),
    ),
)
"""Everything above, and what it rests on. A new hook comes with its entry here."""


def problems() -> list[str]:
    """One line per reliance the installed releases no longer satisfy (empty: all hold)."""
    out = []
    for reliance in RELIANCES:
        found = reliance.check()
        if found is not None:
            out.append(f"{found}\n    relied on: {reliance.what}\n    by: {reliance.why}")
    return out
