"""The recipe: one YAML file describes one run.

Typed, keyword-only config objects with a docstring under each field. Loading rejects unknown
keys (with the closest valid key), wrong types and impossible values before any model is
loaded. This module imports no torch: the launcher and the sbatch generator use it on login
nodes.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from tunefleet.launch.core.batch import samples_for_tokens
from tunefleet.launch.core.errors import RecipeError

DType = Literal["auto", "bfloat16", "float16", "float32"]
Quantization = Literal["none", "nf4", "fp4", "int8", "mxfp4"]
DataFormat = Literal["alpaca", "messages", "text", "prompt-completion"]
Strategy = Literal["auto", "single", "ddp", "fsdp", "fsdp-qlora", "deepspeed-zero2", "deepspeed-zero3"]
Optimizer = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "sgd",
]
Scheduler = Literal[
    "linear",
    "cosine",
    "constant",
    "constant_with_warmup",
    "cosine_with_min_lr",
    "polynomial",
]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
PRECISION_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""Mixed precision -> the dtype its weights are held in (and FSDP/DeepSpeed flatten, cast, gather)."""


def weight_dtype(recipe: Recipe, precision: str) -> str:
    """The dtype the model's weights are loaded (and, for full/freeze, trained) in, under the resolved
    `precision` (bf16, fp16, fp32): model.dtype when set; with `auto`, fp32 master weights for
    `full` (the trained weights and their optimizer state stay fp32 while the compute runs in
    16 bits: autocast, FSDP's mixed-precision policy, DeepSpeed's fp32 master), the compute dtype for
    the frozen base of an adapter and of `freeze` (whose trained parameters are made fp32 when the
    method is applied: `TRAINED_DTYPE`). The one rule: the run (`model.resolve_precision`) and the
    plan's memory estimate both use it."""
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    if recipe.peft.method == "full":
        return TRAINED_DTYPE
    return PRECISION_DTYPE[precision]


TRAINED_DTYPE = "float32"
"""The dtype full and freeze train their weights in (master weights) with `model.dtype: auto`."""


LoraInit = Literal["default", "gaussian", "pissa", "olora", "loftq", "eva"]


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    name_or_path: str
    """Hugging Face Hub id or local directory of the base model, or `tunefleet:tiny-llama` for
    the built-in demo model (built locally, no network)."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; None takes the default branch."""

    dtype: DType = "auto"
    """Dtype the weights are loaded in. `auto` follows the precision: bfloat16 for bf16,
    float16 for fp16, float32 on CPU or fp32."""

    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"] | None = None
    """Attention kernel; None lets transformers choose. gpt-oss needs `eager`."""

    trust_remote_code: bool = False
    """Run Python code shipped with the model repository. Off unless you trust the repo."""

    quantization: Quantization = "none"
    """`none`; bitsandbytes 4-bit `nf4`/`fp4` (QLoRA) or 8-bit `int8`; `mxfp4` for models that
    ship MXFP4 weights (gpt-oss)."""

    double_quant: bool = True
    """bitsandbytes 4-bit: quantize the quantization constants too (saves ~0.4 bit/param)."""

    compute_dtype: Literal["bfloat16", "float16", "float32"] | None = None
    """bitsandbytes 4-bit: dtype of the matmuls; None follows the model dtype."""

    quant_storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] | None = None
    """bitsandbytes 4-bit: dtype the packed weights are stored in; None = uint8 (FSDP needs
    it equal to the model dtype, which the FSDP-QLoRA strategy sets)."""

    mxfp4_dequantize: bool = True
    """mxfp4: dequantize the MXFP4 weights to `dtype` at load (needed to train on them)."""


Method = Literal["lora", "dora", "full", "freeze"]
ADAPTER_METHODS = ("lora", "dora")
"""Methods that train an adapter on a frozen base (every `peft.*` key but the freeze ones is theirs)."""
WEIGHT_METHODS = ("full", "freeze")
"""Methods that train the model's own weights (seed 004's full and partial fine-tuning)."""


@dataclass(kw_only=True, slots=True)
class PeftConfig:
    method: Method = "lora"
    """What is trained: `lora`; `dora` (weight-decomposed LoRA, PEFT `use_dora`); `full` (every
    weight of the model); `freeze` (partial: everything frozen except `trainable_layers`,
    `trainable_modules` of them and `extra_modules`). `full` and `freeze` keep fp32 master weights
    and optimizer state (model.dtype auto) while computing in train.precision."""

    trainable_layers: int | None = None
    """`freeze` only: train the last N decoder layers (negative: the first N)."""

    trainable_modules: list[str] | None = None
    """`freeze` only: within those layers, train only these submodules (by name or the end of their
    name, e.g. [mlp] or [self_attn.q_proj]); None trains the whole layers."""

    extra_modules: list[str] | None = None
    """`freeze` only: modules outside the decoder layers to train too (e.g. [lm_head], [embed_tokens],
    [norm])."""

    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r."""

    init: LoraInit = "default"
    """Adapter initialisation: `default` (A Kaiming, B zero), `gaussian`, `pissa`, `olora`,
    `loftq` (unquantized base only: LoftQ quantizes itself; PEFT runs it on a GPU only), `eva`
    (data-driven: A from the SVD of each adapted layer's input activations over the run's first
    micro batches, ranks redistributed between layers; computed once on rank 0 and sent to every
    rank)."""

    eva_rho: float | None = None
    """`init: eva` only: the most rank a layer may get, as a multiple of `r` (>= 1; None = PEFT's
    2.0). 1.0 keeps every layer at `r` (no redistribution), which `tunefleet plan` can count exactly."""

    r: int = 16
    """LoRA rank."""

    alpha: float = 32
    """LoRA alpha (scaling numerator)."""

    dropout: float = 0.05
    """Dropout on the LoRA branch input."""

    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train."""

    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]) or `all-linear` (every linear layer but the
    output head)."""

    modules_to_save: list[str] | None = None
    """Extra modules trained in full and saved with the adapter (e.g. [embed_tokens, lm_head])."""

    rank_pattern: dict[str, int] | None = None
    """Per-layer ranks: regex -> rank for the adapted modules whose name it matches at the end
    (PEFT's rule: `(.*\\.)?(<regex>)$`), e.g. {"layers\\.0\\.self_attn\\.q_proj": 4, "mlp": 8}; the
    others keep `r`. Every regex must match an adapted module."""

    alpha_pattern: dict[str, float] | None = None
    """Per-layer alphas: regex -> alpha, matched like `rank_pattern`; the others keep `alpha`."""

    target_parameters: list[str] | None = None
    """Parameters (not Linear modules) to adapt, by name or name suffix: the MoE expert tensors of
    e.g. gpt-oss ([mlp.experts.gate_up_proj, mlp.experts.down_proj]). Each must match a parameter
    of the model. With only these, write `target_modules: []`."""

    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Train only these rows of the token embedding (new or special tokens) instead of the whole
    matrix: a list of token ids for the input embedding, or {embedding module name: [ids]}."""

    layer_replication: list[list[int]] | None = None
    """Grow the model by stacking ranges of its decoder layers, [start, end) each: [[0, 2], [1, 2]]
    turns layers 0,1 into 0,1,1. Copies share their frozen base weights; each gets its own
    adapter. Llama-like models (`model.layers`) only."""

    alora_invocation: str | None = None
    """Activated LoRA: the adapter acts only from the last occurrence of this string on (e.g. the
    prompt's `### Response:\n`), so a base model's KV cache of the text before it can be reused.
    Tokenised with the run's tokenizer; it must occur before the first trained token of every
    training example. An aLoRA adapter cannot be merged."""

    loraplus_lr_ratio: float | None = None
    """LoRA+: the B matrices learn at `train.lr` x this ratio (the paper suggests 16), the A
    matrices at `train.lr` (PEFT's `create_loraplus_optimizer` with `train.optimizer`)."""

    lora_fa: bool = False
    """LoRA-FA: A stays frozen at its initialisation and B is trained with LoRA-FA's projected
    AdamW (PEFT's `create_lorafa_optimizer`), which needs no activations for A: less memory.
    Needs `train.optimizer: adamw_torch` (it replaces it)."""


@dataclass(kw_only=True, slots=True)
class MixtureSource:
    path: str
    """A local JSONL/JSON/Parquet file, a directory saved with `datasets`, or a Hub dataset name."""

    format: DataFormat | None = None
    """The format of this source's rows; None takes `data.format`."""

    weight: float = 1.0
    """This source's share of every epoch, relative to the other sources' weights (> 0)."""

    limit: int | None = None
    """Use only the first N rows of this source (before its evaluation hold-out)."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: str = ""
    """A local JSONL/JSON/Parquet file, a directory saved with `datasets`, or a Hub dataset name.
    Leave it out when `mixture` lists the sources."""

    format: DataFormat = "alpaca"
    """`alpaca` (instruction/input/output), `messages` (chat turns rendered with the model's
    chat template), `text` (plain text), `prompt-completion`. With a mixture: the format of the
    sources that name none, and of `eval_path`."""

    mixture: list[MixtureSource] | None = None
    """Several training sources instead of `path`: a list of {path, format, weight, limit}. Each
    epoch keeps the total example count of all sources and shares it out by weight (a source whose
    share exceeds its examples repeats them, reshuffled; one below gives a fresh random subset
    each epoch), deterministic from train.seed and the epoch, never the world size. `eval_ratio`
    holds out the first rows of every source."""

    split: str = "train"
    """Split to read from a dataset name or directory."""

    eval_path: str | None = None
    """Separate evaluation data (in `format`); None uses `eval_ratio` or no evaluation."""

    eval_ratio: float = 0.0
    """Fraction of rows held out for evaluation (the first rows, as seed 003 does; with a mixture,
    the first rows of every source)."""

    limit: int | None = None
    """Use only the first N rows of the training data (before the eval split). With a mixture, each
    source takes its own `limit` instead."""

    max_length: int = 2048
    """Sequences are truncated to this many tokens."""

    text_field: str = "text"
    """Column holding the text for the `text` format."""

    messages_field: str = "messages"
    """Column holding the conversation for the `messages` format."""

    completion_only_loss: bool = True
    """Train on the answer tokens only (assistant turns / completion / alpaca response):
    prompt tokens get label -100. Ignored for the `text` format."""

    num_proc: int | None = None
    """Processes that tokenise the data (`tunefleet prepare`, or the first rank of a run that finds
    no prepared data). None: one per CPU core this process may use (at most 32), fewer for small
    datasets; 1 tokenises in the main process. Several need Linux (forked workers; elsewhere 1). The
    tokens are the same for every value, so it is not part of the cache key and may change on resume."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    epochs: float = 1.0
    """Passes over the training data; ignored when `max_steps` > 0."""

    max_steps: int = -1
    """Optimizer steps to run; -1 runs `epochs` epochs."""

    lr: float = 2e-4
    """Peak learning rate."""

    lr_scheduler: Scheduler = "cosine"
    """Learning-rate schedule after warm-up."""

    warmup_ratio: float = 0.03
    """Fraction of the total steps spent warming up linearly from 0."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""

    optimizer: Optimizer = "adamw_torch"
    """Optimizer. `paged_*` and `adamw_8bit` come from bitsandbytes; `adamw_torch_fused` needs
    a GPU."""

    seed: int = 42
    """Seed for the adapter initialisation, data order and dropout."""

    precision: Precision = "auto"
    """Mixed precision: `bf16`, `fp16`, `fp32`, or `auto` (bf16 on GPUs that have it, fp32
    on CPU)."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    logging_steps: int = 10
    """Log loss/lr to metrics.jsonl every N optimizer steps."""

    save_steps: int = 500
    """Write a checkpoint every N optimizer steps (0 = only at the end)."""

    eval_steps: int = 0
    """Evaluate every N optimizer steps (0 = no periodic evaluation)."""

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)
    """Experiment trackers to log to (none by default)."""

    max_nonfinite_steps: int = 0
    """Optimizer steps whose loss or gradient norm is not finite (NaN, inf) that the run skips (no
    update) before it stops with an error; 0 stops at the first. fp16's loss scaler skips its own
    overflow steps whatever this is. Not under DeepSpeed (its engine steps on its own gradients)."""

    export_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """`full`/`freeze`: the dtype of the model written to `final/`; `auto` is the training dtype (bf16
    under bf16, fp16 under fp16, else fp32)."""

    liger_kernel: bool = False
    """Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) through
    transformers' integration: less memory and more speed on GPUs. Needs a CUDA GPU and the
    `liger-kernel` package."""


@dataclass(kw_only=True, slots=True)
class BatchConfig:
    micro_batch_size: int = 1
    """Samples per device per forward/backward pass."""

    global_batch_size: int = 8
    """Samples per optimizer step, over all devices and accumulation steps. Accumulation is
    derived: global_batch_size / (micro_batch_size x world size), which must be whole."""

    global_batch_tokens: int | None = None
    """Alternative target: tokens per optimizer step counted at data.max_length (torchtitan's
    convention). It must be a multiple of data.max_length; the global batch becomes
    global_batch_tokens // data.max_length samples (leave global_batch_size out, or equal)."""

    group_by_length: bool = True
    """Within each optimizer step, sort its samples by length and cut them into micro batches of
    similar length (less padding), dealt to the ranks so each gets about the same number of tokens.
    The samples of every step, and so the loss and the gradients, stay those of `false`."""

    padding_free: Literal["auto"] | bool = "auto"
    """Put each micro batch's samples in one row with `position_ids` restarting at every sample and
    no padding; the attention keeps the samples apart. `auto`: on where it is faster (flash
    attention's variable-length kernels: `model.attn_implementation: flash_attention_2/3` on GPUs),
    off elsewhere (sdpa on CPU attends over the whole row); the plan and the run summary say which."""


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    strategy: Strategy = "auto"
    """How the run is spread over devices: `auto` (one process: `single`; several: `ddp`),
    `single`, `ddp`, `fsdp`, `fsdp-qlora`, `deepspeed-zero2`, `deepspeed-zero3`. The plan, the run
    summary and plan.json say what `auto` became."""

    fsdp_version: Literal[1, 2] = 2
    """`fsdp`/`fsdp-qlora` only: 2 (per-parameter sharding, `fully_shard`) or 1 (flat-parameter
    FSDP, rendered with use_orig_params=false as the PEFT docs prescribe for LoRA)."""

    offload: Literal["none", "optimizer", "optimizer+params"] = "none"
    """Keep state in CPU RAM to save GPU memory. `optimizer`: ZeRO-2/3 optimizer states and the
    update step (DeepSpeed's CPU Adam). `optimizer+params`: ZeRO-3 also offloads parameters;
    FSDP offloads parameters, gradients and the optimizer step together, so FSDP takes only
    this value."""

    state_dict: Literal["sharded", "full"] = "sharded"
    """`fsdp`/`fsdp-qlora` only: how checkpoints are written. `sharded`: each rank writes its
    own shard (fast; resume only); `full`: gathered on rank 0 into a normal adapter at every save
    (slower). The final adapter is a normal PEFT adapter either way. (ZeRO-3 checkpoints always
    hold both: DeepSpeed shards and the adapter, gathered alone by the trainer.)"""

    fsdp_wrap_classes: list[str] | None = None
    """`fsdp`/`fsdp-qlora` only: module class names that each become one FSDP unit (the
    decoder layer, e.g. [LlamaDecoderLayer]); None takes the model's own `_no_split_modules`."""

    zero3_gathered_params: float | None = None
    """`deepspeed-zero3` only: how many parameters a rank may hold gathered at once, and how near
    its next use a gathered parameter must be to stay gathered (DeepSpeed's
    stage3_max_live_parameters and stage3_max_reuse_distance). None: DeepSpeed's 1e9, under which a
    model below ~5e8 parameters stays gathered whole from its forward to its backward. Lower it when
    ZeRO-3 runs out of memory in forward/backward (e.g. 1e8; 0 gathers every layer again for its
    backward, as FSDP does)."""

    zero3_sub_group_size: float | None = None
    """`deepspeed-zero3` only: the optimizer step updates a rank's partition in pieces of this
    many elements, each with its fp32 gradient and the optimizer's temporaries (DeepSpeed's
    sub_group_size). None: DeepSpeed's 1e9, one piece for any partition below that. Lower it when
    ZeRO-3 runs out of memory in the optimizer step (e.g. 1e8)."""


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    keep_last: int | None = 2
    """Keep only the newest N checkpoints (None keeps all)."""


@dataclass(kw_only=True, slots=True)
class Recipe:
    output_dir: str
    """Where this run writes everything: recipe.yaml, metrics.jsonl, checkpoints, final/."""

    model: ModelConfig
    """The base model and how it is loaded."""

    data: DataConfig
    """Training (and evaluation) data."""

    peft: PeftConfig = field(default_factory=PeftConfig)
    """The adapter trained on top of the frozen base."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and schedule."""

    batch: BatchConfig = field(default_factory=BatchConfig)
    """Micro and global batch sizes."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel strategy."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint retention."""


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "peft": PeftConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "batch": BatchConfig,
    "parallel": ParallelConfig,
    "checkpoint": CheckpointConfig,
}


class DataSource(typing.NamedTuple):
    """One training source of a recipe as the data code reads it."""

    where: str
    """The recipe key that names it: `data.path` or `data.mixture[i].path` (for messages)."""
    data: DataConfig
    """The data section with this source's path, format and limit (every other setting shared)."""
    weight: float
    """Its weight in the mixture (1.0 for a single source)."""


def data_sources(d: DataConfig) -> list[DataSource]:
    """The training sources of a data section, in order: `data.path` alone, or each mixture entry."""
    if d.mixture is None:
        return [DataSource("data.path", d, 1.0)]
    return [
        DataSource(
            f"data.mixture[{i}].path",
            dataclasses.replace(d, path=s.path, format=s.format or d.format, limit=s.limit, mixture=None),
            s.weight,
        )
        for i, s in enumerate(d.mixture)
    ]


def stats_format(d: DataConfig) -> str:
    """The format that counts of the whole training split are worded for: the sources' one, or
    `mixed` (answers, not texts, are what truncation cuts unless every source is `text`)."""
    formats = {s.data.format for s in data_sources(d)}
    return formats.pop() if len(formats) == 1 else "mixed"


# ----------------------------------------------------------------------------- type checking


_YAML11_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        key_tp, value_tp = get_args(tp)
        return f"mapping of {_type_name(key_tp)} to {_type_name(value_tp)}"
    if dataclasses.is_dataclass(tp):
        return f"mapping of {', '.join(f.name for f in dataclasses.fields(tp))}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are accepted for floats)."""
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{where}.")
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            if isinstance(value, list) and get_origin(option) is list:
                return _coerce(value, option, where)  # a list's own errors say which item is wrong
            try:
                return _coerce(value, option, where)
            except RecipeError:
                continue
        raise _type_error(value, tp, where)
    if origin is Literal:
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(
            f"{where}: {value!r} is not one of {', '.join(repr(a) for a in get_args(tp))}{hint}",
            f"set {where} to one of the listed values",
        )
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(value, tp, where)
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, tp, where)
        key_tp, value_tp = get_args(tp)
        return {
            _coerce(k, key_tp, f"{where} key {k!r}"): _coerce(v, value_tp, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(value, tp, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, tp, where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(value, tp, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string; accept it as a number
        raise _type_error(value, tp, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(value, tp, where)
    raise TypeError(f"unsupported annotation {tp!r} at {where}")  # a bug in this module


def _type_error(value: Any, tp: Any, where: str) -> RecipeError:
    return RecipeError(
        f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}",
        f"write {where} as {_type_name(tp)}",
    )


SYNONYMS = {
    "learning_rate": "lr",
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "max_seq_length": "max_length",
    "max_seq_len": "max_length",
    "per_device_train_batch_size": "micro_batch_size",
    "batch_size": "micro_batch_size",
    "optim": "optimizer",
    "lr_scheduler_type": "lr_scheduler",
    "torch_dtype": "dtype",
    "model_name_or_path": "name_or_path",
    "model_name": "name_or_path",
}
"""Names other tools use for a recipe key (transformers' TrainingArguments, PEFT's LoraConfig, TRL)."""


def _unknown_key(key: str, valid: list[str], prefix: str) -> RecipeError:
    full = f"{prefix}{key}"
    close = [SYNONYMS[key]] if SYNONYMS.get(key) in valid else []
    if not close:
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:
        # catch synonyms difflib cannot see (peft.rank -> peft.r)
        close = [v for v in valid if v and (key.startswith(v) or v.startswith(key))][:1]
    hint = f" — did you mean {prefix}{close[0]}?" if close else ""
    return RecipeError(
        f"unknown recipe key {full!r}{hint}",
        f"valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(valid)}",
    )


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{where}: expected a mapping of keys, got {type(raw).__name__} {raw!r}",
            f"write {where} as `key: value` lines",
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown_key(str(key), list(fields), prefix)
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        names = ", ".join(f"{prefix}{m}" for m in missing)
        raise RecipeError(f"missing required recipe key(s): {names}", f"add {names} to the recipe")
    return cls(**kwargs)


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one `--set section.key=value`; the value is read as YAML (typed like the file)."""
    if "=" not in text:
        raise RecipeError(
            f"--set {text!r}: expected section.key=value",
            "write e.g. --set train.max_steps=100",
        )
    key, _, value_text = text.partition("=")
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise RecipeError(f"--set {text!r}: {key!r} is not a dotted key", "write e.g. --set peft.r=8")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(
            f"--set {text!r}: the value is not valid YAML ({getattr(exc, 'problem', None) or exc})",
            f"quote the value: --set '{key}=\"{value_text.strip()}\"' (or close its brackets)",
        ) from None
    comment = re.search(r"(^|\s)#", value_text)
    if comment and "#" not in yaml.safe_dump(value):  # YAML read the rest of the value as a comment
        raise RecipeError(
            f"--set {text!r}: YAML reads everything from {value_text[comment.start() :].strip()!r} on as a "
            f"comment, so the value would be {value!r}",
            f"quote the value: --set '{key}=\"{value_text.strip()}\"'",
        )
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw recipe mapping with every `--set` applied in order."""
    out = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(
                    f"--set {text!r}: {part!r} is not a section",
                    f"set a key inside a section, e.g. --set {part}=...",
                )
            node = child
        node[path[-1]] = value
    return out


# ----------------------------------------------------------------------------- validation


def _check(cond: bool, where: str, problem: str, fix: str) -> None:
    if not cond:
        raise RecipeError(f"{where}: {problem}", fix)


def validate(recipe: Recipe) -> Recipe:
    """Reject impossible values and incompatible combinations (no model or data is touched).

    Returns the recipe with `batch.global_batch_size` in samples (derived from
    `batch.global_batch_tokens` when that is the target); the input is not changed."""
    _check(bool(recipe.output_dir.strip()), "output_dir", "is empty", "set output_dir to a directory")
    _validate_model_peft(recipe.model, recipe.peft)
    _validate_method(recipe.peft)
    _check(
        recipe.train.export_dtype == "auto" or recipe.peft.method in WEIGHT_METHODS,
        "train.export_dtype",
        f"only peft.method=full/freeze export a model, but peft.method={recipe.peft.method!r} saves an adapter",
        "drop train.export_dtype (`tunefleet merge --dtype` sets the dtype of a merged adapter)",
    )
    _validate_peft_variants(recipe.peft, recipe.train)
    _validate_data(recipe.data)
    _validate_mixture_total(recipe.data)
    _validate_train(recipe.train)
    batch = _validate_batch(recipe.batch, recipe.data.max_length)
    k = recipe.checkpoint.keep_last
    _check(k is None or k >= 1, "checkpoint.keep_last", f"must be >= 1 or null, got {k}", "use e.g. 2")
    _validate_parallel(recipe.parallel)
    return dataclasses.replace(recipe, batch=batch)


def _validate_model_peft(m: ModelConfig, p: PeftConfig) -> None:
    _check(bool(m.name_or_path.strip()), "model.name_or_path", "is empty", "name a model id or directory")
    _check(p.r > 0, "peft.r", f"must be > 0, got {p.r}", "use e.g. peft.r=16")
    _check(p.alpha > 0, "peft.alpha", f"must be > 0, got {p.alpha}", "use e.g. peft.alpha=32")
    _check(0 <= p.dropout < 1, "peft.dropout", f"must be in [0, 1), got {p.dropout}", "use e.g. 0.05")
    if isinstance(p.target_modules, list):
        _check(
            bool(p.target_modules) or bool(p.target_parameters),
            "peft.target_modules",
            "is an empty list (and no peft.target_parameters are given)",
            "list module names (e.g. [q_proj, v_proj]) or write all-linear",
        )
    if p.init == "loftq":
        _check(
            m.quantization == "none",
            "peft.init",
            "loftq needs an unquantized base "
            f"(it quantizes the base itself), but model.quantization={m.quantization!r}",
            "set model.quantization=none or choose another peft.init",
        )
    if p.init in ("pissa", "olora"):
        _check(
            m.quantization in ("none", "mxfp4"),
            "peft.init",
            f"{p.init} decomposes the base weights and cannot start from bitsandbytes "
            f"{m.quantization} weights",
            "set model.quantization=none or peft.init=default",
        )


LORA_ONLY = (
    "use_rslora",
    "init",
    "eva_rho",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "alora_invocation",
    "loraplus_lr_ratio",
    "lora_fa",
)
"""Adapter settings that change what `lora`/`dora` train: refused with `full`/`freeze` (which would
ignore them). The adapter's shape (r, alpha, dropout, bias, target_modules) is left alone: a recipe
switched to full fine-tuning with `--set peft.method=full` keeps its LoRA section, unused."""

FREEZE_ONLY = ("trainable_layers", "trainable_modules", "extra_modules")


def _validate_method(p: PeftConfig) -> None:
    """`full`/`freeze` against the adapter settings, and what `freeze` needs. Whether the names and
    the layer count exist in the model is checked on the model (`launch/params.py`)."""
    defaults = {f.name: f.default for f in dataclasses.fields(PeftConfig)}
    if p.method != "freeze":
        for key in FREEZE_ONLY:
            _check(
                getattr(p, key) is None,
                f"peft.{key}",
                f"only peft.method=freeze reads it, but peft.method={p.method!r}",
                f"drop peft.{key}, or set peft.method=freeze",
            )
    if p.method in WEIGHT_METHODS:
        for key in LORA_ONLY:
            _check(
                getattr(p, key) == defaults[key],
                f"peft.{key}",
                f"is a LoRA setting, and peft.method={p.method} trains the model's own weights (no adapter)",
                f"drop peft.{key}, or use peft.method=lora",
            )
    if p.method != "freeze":
        return
    _check(
        bool(p.trainable_layers) or bool(p.extra_modules),
        "peft.method",
        "freeze trains nothing unless peft.trainable_layers (a non-zero count) or peft.extra_modules says what",
        "set e.g. peft.trainable_layers=2 (the last 2 decoder layers) or peft.extra_modules=[lm_head]",
    )
    for key in ("trainable_modules", "extra_modules"):
        names = getattr(p, key)
        _check(
            names is None or (bool(names) and all(n.strip() for n in names)),
            f"peft.{key}",
            "is empty or holds an empty name",
            f"list module names (e.g. [mlp]) or drop peft.{key}",
        )
    _check(
        p.trainable_modules is None or bool(p.trainable_layers),
        "peft.trainable_modules",
        "names submodules of the trainable layers, but peft.trainable_layers selects none",
        "set peft.trainable_layers (e.g. 2), or list the modules in peft.extra_modules",
    )


def _validate_peft_variants(p: PeftConfig, t: TrainConfig) -> None:
    """The LoRA variants of seed 003: each value possible on its own, the optimizer ones exclusive.
    What depends on the model (names, ranges) is checked on it: `launch/params.py`."""
    for key, mapping, kind in (
        ("rank_pattern", p.rank_pattern, int),
        ("alpha_pattern", p.alpha_pattern, float),
    ):
        for regex, value in (mapping or {}).items():
            try:
                re.compile(regex)
            except re.error as exc:
                raise RecipeError(
                    f"peft.{key}: {regex!r} is not a regular expression ({exc})",
                    "escape special characters, e.g. layers\\.0\\.self_attn\\.q_proj",
                ) from None
            _check(
                value > 0,
                f"peft.{key}[{regex!r}]",
                f"must be > 0, got {value}",
                f"use a positive {kind.__name__}",
            )
        _check(
            mapping is None or bool(mapping),
            f"peft.{key}",
            "is empty",
            f"drop peft.{key} or give regex: value",
        )
    if p.target_parameters is not None:
        _check(
            bool(p.target_parameters) and all(n.strip() for n in p.target_parameters),
            "peft.target_parameters",
            "is empty or holds an empty name",
            "list parameter names (e.g. [mlp.experts.gate_up_proj]) or drop it",
        )
        _check(
            p.dropout == 0,
            "peft.dropout",
            f"PEFT's LoRA on parameters (peft.target_parameters) has no dropout, got {p.dropout} "
            "(PEFT: 'lora.ParamWrapper does not work with lora_dropout != 0')",
            "set peft.dropout=0",
        )
    tokens = p.trainable_token_indices
    lists = list(tokens.values()) if isinstance(tokens, dict) else [tokens] if tokens is not None else []
    _check(
        tokens is None or (bool(lists) and all(lists)),
        "peft.trainable_token_indices",
        "is empty or names an embedding without token ids",
        "list token ids (e.g. [128000, 128001]) or drop it",
    )
    for ids in lists:
        _check(
            all(i >= 0 for i in ids) and len(set(ids)) == len(ids),
            "peft.trainable_token_indices",
            f"token ids must be >= 0 and distinct, got {ids}",
            "list each token id once",
        )
    for pair in p.layer_replication or []:
        _check(
            len(pair) == 2 and 0 <= pair[0] < pair[1],
            "peft.layer_replication",
            f"each item is a range [start, end) of layers with 0 <= start < end, got {pair}",
            "write e.g. [[0, 2], [1, 2]]",
        )
    _check(
        p.layer_replication is None or bool(p.layer_replication),
        "peft.layer_replication",
        "is empty",
        "drop it or list layer ranges, e.g. [[0, 2], [1, 2]]",
    )
    _check(
        p.alora_invocation is None or bool(p.alora_invocation.strip()),
        "peft.alora_invocation",
        "is empty",
        "give the text that starts the adapter's part (e.g. the prompt's last line), or drop it",
    )
    _validate_eva(p)
    _validate_lora_optimizers(p, t)


def _validate_eva(p: PeftConfig) -> None:
    _check(
        p.eva_rho is None or p.init == "eva",
        "peft.eva_rho",
        f"only peft.init=eva reads it, but peft.init={p.init!r}",
        "drop peft.eva_rho or set peft.init=eva",
    )
    _check(
        p.eva_rho is None or p.eva_rho >= 1,
        "peft.eva_rho",
        f"must be >= 1 (the most rank a layer may get, as a multiple of peft.r), got {p.eva_rho}",
        "use 1.0 (no redistribution) or PEFT's 2.0",
    )


def _validate_lora_optimizers(p: PeftConfig, t: TrainConfig) -> None:
    """LoRA+ and LoRA-FA each build the optimizer: one at a time, LoRA-FA with its own AdamW."""
    ratio = p.loraplus_lr_ratio
    _check(
        ratio is None or (ratio > 0 and math.isfinite(ratio)),
        "peft.loraplus_lr_ratio",
        f"must be > 0 and finite, got {ratio}",
        "use e.g. 16 (the LoRA+ paper's suggestion)",
    )
    if not p.lora_fa:
        return
    _check(
        ratio is None,
        "peft.lora_fa",
        "LoRA-FA and LoRA+ (peft.loraplus_lr_ratio) each build the optimizer",
        "keep one of them",
    )
    _check(
        t.optimizer == "adamw_torch",
        "peft.lora_fa",
        f"LoRA-FA trains with its own AdamW, which would replace train.optimizer={t.optimizer!r} without a word",
        "set train.optimizer=adamw_torch (the LoRA-FA optimizer takes train.lr and train.weight_decay)",
    )
    _check(
        p.method == "lora",
        "peft.lora_fa",
        "the LoRA-FA optimizer pairs every LoRA parameter with the next one as (A, B); DoRA's magnitude "
        "vectors break the pairs",
        "use peft.method=lora with LoRA-FA, or drop peft.lora_fa",
    )


def _validate_data(d: DataConfig) -> None:
    if d.mixture is None:
        _check(
            bool(d.path.strip()),
            "data.path",
            "is empty",
            "name a data file, directory or dataset (or list several sources in data.mixture)",
        )
    else:
        _validate_mixture(d)
    _check(d.max_length > 0, "data.max_length", f"must be > 0, got {d.max_length}", "use e.g. 2048")
    _check(
        0 <= d.eval_ratio < 1,
        "data.eval_ratio",
        f"must be in [0, 1), got {d.eval_ratio}",
        "use e.g. 0.1 (10% held out)",
    )
    _check(
        not (d.eval_path and d.eval_ratio),
        "data.eval_ratio",
        "both data.eval_path and data.eval_ratio are set",
        "keep one of them",
    )
    _check(
        d.limit is None or d.limit > 0,
        "data.limit",
        f"must be > 0, got {d.limit}",
        "drop it or use a positive count",
    )
    _check(
        d.num_proc is None or d.num_proc >= 1,
        "data.num_proc",
        f"must be >= 1 or null, got {d.num_proc}",
        "drop it (one process per CPU core) or use e.g. 4",
    )


def _validate_mixture(d: DataConfig) -> None:
    assert d.mixture is not None
    _check(
        not d.path.strip(),
        "data.path",
        f"is set ({d.path!r}) together with data.mixture, which lists the sources",
        "move it into data.mixture as one more source ({path: ..., weight: 1}), or drop data.mixture",
    )
    _check(
        bool(d.mixture),
        "data.mixture",
        "is an empty list",
        "list the sources as {path, format, weight, limit} mappings, or use data.path for one",
    )
    _check(
        d.limit is None,
        "data.limit",
        "is set together with data.mixture, where each source takes its own limit",
        "drop data.limit and set data.mixture[i].limit on the sources to cut",
    )
    for i, s in enumerate(d.mixture):
        where = f"data.mixture[{i}]"
        _check(bool(s.path.strip()), f"{where}.path", "is empty", "name a data file, directory or dataset")
        _check(
            s.weight > 0 and math.isfinite(s.weight),
            f"{where}.weight",
            f"must be a number > 0, got {s.weight}",
            "use a positive proportion, e.g. 1 (drop the source to leave it out)",
        )
        _check(
            s.limit is None or s.limit > 0,
            f"{where}.limit",
            f"must be > 0, got {s.limit}",
            "drop it or use a positive count",
        )


def _validate_mixture_total(d: DataConfig) -> None:
    total = sum(s.weight for s in d.mixture or [])
    _check(
        math.isfinite(total),
        "data.mixture",
        f"the weights add up to {total} (beyond a float's range)",
        "give the weights as proportions, e.g. 1 and 3",
    )


def _validate_train(t: TrainConfig) -> None:
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}", "use e.g. 2e-4")
    _check(0 <= t.seed < 2**32, "train.seed", f"must be in [0, 2**32), got {t.seed}", "use e.g. 42")
    _check(
        0 <= t.warmup_ratio < 1,
        "train.warmup_ratio",
        f"must be in [0, 1), got {t.warmup_ratio}",
        "use e.g. 0.03",
    )
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}", "use e.g. 0.0")
    _check(
        t.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0, got {t.max_grad_norm}", "use e.g. 1.0"
    )
    _check(
        t.max_steps == -1 or t.max_steps > 0,
        "train.max_steps",
        f"must be -1 (use epochs) or > 0, got {t.max_steps}",
        "use e.g. 100",
    )
    _check(
        t.max_steps > 0 or t.epochs > 0,
        "train.epochs",
        f"must be > 0, got {t.epochs}",
        "use e.g. train.epochs=3 or set train.max_steps",
    )
    _check(
        t.max_nonfinite_steps >= 0,
        "train.max_nonfinite_steps",
        f"must be >= 0, got {t.max_nonfinite_steps}",
        "use 0 (stop at the first non-finite step) or a small count, e.g. 3",
    )
    for name in ("logging_steps", "save_steps", "eval_steps"):
        value = getattr(t, name)
        _check(
            value >= (1 if name == "logging_steps" else 0),
            f"train.{name}",
            f"must be {'>= 1' if name == 'logging_steps' else '>= 0'}, got {value}",
            "use e.g. 10",
        )


def _validate_batch(b: BatchConfig, max_length: int) -> BatchConfig:
    """The batch section with the global batch in samples (one meaning downstream)."""
    _check(
        b.micro_batch_size > 0,
        "batch.micro_batch_size",
        f"must be > 0, got {b.micro_batch_size}",
        "use e.g. 1",
    )
    global_batch_size = b.global_batch_size
    if b.global_batch_tokens is not None:
        derived = samples_for_tokens(b.global_batch_tokens, max_length)
        default = next(f.default for f in dataclasses.fields(BatchConfig) if f.name == "global_batch_size")
        _check(
            b.global_batch_size in (derived, default),
            "batch.global_batch_size",
            f"{b.global_batch_size} disagrees with batch.global_batch_tokens={b.global_batch_tokens} "
            f"(= {derived} samples of data.max_length={max_length})",
            "set only one of them",
        )
        global_batch_size = derived
    _check(
        global_batch_size > 0,
        "batch.global_batch_size",
        f"must be > 0, got {global_batch_size}",
        "use e.g. 16",
    )
    _check(
        global_batch_size % b.micro_batch_size == 0,
        "batch.global_batch_size",
        f"{global_batch_size} is not a multiple of batch.micro_batch_size={b.micro_batch_size}",
        "choose a global batch that micro batch x accumulation x world size can reach",
    )
    return dataclasses.replace(b, global_batch_size=global_batch_size)


def _validate_parallel(par: ParallelConfig) -> None:
    """Settings that only some strategies read are rejected elsewhere, never silently ignored.
    Hardware- and model-dependent rules live in tunefleet.launch.compat."""
    s = par.strategy
    fsdp = s in ("fsdp", "fsdp-qlora")
    _check(
        fsdp or par.fsdp_version == 2,
        "parallel.fsdp_version",
        f"only the fsdp strategies read it, but parallel.strategy={s!r}",
        "drop parallel.fsdp_version",
    )
    _check(
        fsdp or par.state_dict == "sharded",
        "parallel.state_dict",
        f"only the fsdp strategies read it, but parallel.strategy={s!r}",
        "drop parallel.state_dict",
    )
    _check(
        fsdp or par.fsdp_wrap_classes is None,
        "parallel.fsdp_wrap_classes",
        f"only the fsdp strategies read it, but parallel.strategy={s!r}",
        "drop parallel.fsdp_wrap_classes",
    )
    for key, least in (("zero3_gathered_params", 0), ("zero3_sub_group_size", 1)):
        value = getattr(par, key)
        if value is None:
            continue
        _check(
            s == "deepspeed-zero3",
            f"parallel.{key}",
            f"only deepspeed-zero3 reads it, but parallel.strategy={s!r}",
            f"drop parallel.{key}",
        )
        _check(
            math.isfinite(value) and value >= least and value == int(value),
            f"parallel.{key}",
            f"must be a whole number of parameters >= {least}, got {value}",
            "use e.g. 1e8, or drop it for DeepSpeed's 1e9",
        )
    if par.fsdp_wrap_classes is not None:
        _check(
            bool(par.fsdp_wrap_classes) and all(c.strip() for c in par.fsdp_wrap_classes),
            "parallel.fsdp_wrap_classes",
            "is empty or holds an empty name",
            "list class names (e.g. [LlamaDecoderLayer]) or drop it to use the model's own",
        )
    if par.offload != "none":
        _check(
            s in ("fsdp", "fsdp-qlora", "deepspeed-zero2", "deepspeed-zero3"),
            "parallel.offload",
            f"{par.offload!r} needs a sharding strategy, but parallel.strategy={s!r}",
            "use parallel.strategy=deepspeed-zero3 (or fsdp), or parallel.offload=none",
        )
    _check(
        not (s == "deepspeed-zero2" and par.offload == "optimizer+params"),
        "parallel.offload",
        "ZeRO-2 does not partition parameters, so it cannot offload them",
        "use parallel.offload=optimizer, or parallel.strategy=deepspeed-zero3",
    )
    _check(
        not (fsdp and par.offload == "optimizer"),
        "parallel.offload",
        "FSDP cannot offload the optimizer alone: its CPU offload moves parameters, gradients and "
        "the optimizer step together",
        "use parallel.offload=optimizer+params (or none)",
    )


# ----------------------------------------------------------------------------- entry points


def from_dict(raw: Any, overrides: list[str] | None = None) -> Recipe:
    """Build and validate a recipe from a plain mapping and `--set` overrides."""
    if not isinstance(raw, dict):
        raise RecipeError(
            f"a recipe is a mapping of sections, got {type(raw).__name__}", "start from recipes/demo.yaml"
        )
    raw = apply_overrides(raw, overrides or [])
    return validate(_build(Recipe, raw, ""))


def _duplicate_key(text: str) -> tuple[str, int, int] | None:
    """The first key written twice in one mapping of a YAML text, as (dotted key, first line,
    second line), or None. PyYAML keeps the last value without a word."""

    def walk(node: yaml.Node, prefix: str) -> tuple[str, int, int] | None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                key, line = str(key_node.value), key_node.start_mark.line + 1
                if key in seen:
                    return f"{prefix}{key}", seen[key], line
                seen[key] = line
                found = walk(value_node, f"{prefix}{key}.")
                if found:
                    return found
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                found = walk(item, prefix)
                if found:
                    return found
        return None

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    return walk(root, "") if root is not None else None


def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML file, apply `--set` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(
            f"recipe file {str(path)!r} does not exist",
            "pass the path of a YAML recipe, e.g. recipes/demo.yaml",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(
            f"recipe file {str(path)!r} cannot be read: {exc}",
            "check the path and that it is a UTF-8 YAML file",
        ) from None
    try:
        duplicate = _duplicate_key(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(
            f"recipe file {str(path)!r} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}",
            f"fix the YAML{where} (quote values that hold ':', '#' or brackets)",
        ) from None
    if duplicate:
        key, first, second = duplicate
        raise RecipeError(
            f"{path}: {key} is written twice (lines {first} and {second}); YAML would keep the second "
            "without a word",
            f"delete one of the two {key.rsplit('.', 1)[-1]!r} lines",
        )
    try:
        recipe = from_dict(raw, overrides)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc.problem}", exc.fix) from None
    return _resolve_data_paths(recipe, path.resolve().parent)


_LOOKED_UP_NEXT_TO: dict[str, Path] = {}
"""Relative data paths this process looked up next to a recipe without finding them there, with
that recipe's directory: the error that reports a missing data file then names both places."""


def _resolve_data_paths(recipe: Recipe, base: Path) -> Recipe:
    """Relative data paths that exist next to the recipe file are made absolute (anything else is
    left as written: a path relative to the working directory, or a dataset name)."""
    d = recipe.data
    named: list[tuple[Any, str]] = [(d, "path"), (d, "eval_path"), *((s, "path") for s in d.mixture or [])]
    for holder, name in named:
        value = getattr(holder, name)
        if not value or Path(value).expanduser().is_absolute() or value.startswith("~"):
            continue
        if (base / value).exists():
            setattr(holder, name, str((base / value).resolve()))
        else:
            _LOOKED_UP_NEXT_TO[value] = base
    return recipe


def data_path_places(value: str) -> list[tuple[Path, str]]:
    """Where a data path is looked for, in order, each with its name: an absolute path is itself; a
    relative one is looked for next to the recipe (when it came from a recipe file), then in the
    working directory."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return [(path, "as written")]
    places = []
    if value in _LOOKED_UP_NEXT_TO:
        places.append((_LOOKED_UP_NEXT_TO[value] / path, "next to the recipe"))
    return [*places, (Path.cwd() / path, "the working directory")]


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (every default written out)."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


HARMLESS_ON_RESUME = (
    "output_dir",
    "train.logging_steps",
    "train.save_steps",
    "train.eval_steps",
    "train.report_to",
    "train.gradient_checkpointing",
    "train.liger_kernel",
    "train.export_dtype",
    "train.max_nonfinite_steps",
    "batch.micro_batch_size",
    "batch.group_by_length",
    "batch.padding_free",
    "parallel.",
    "checkpoint.",
    "model.attn_implementation",
    "data.num_proc",
)
"""Keys that may change between a checkpoint and its resumption without changing the training
(logging, node count, micro batch and thus accumulation, ...). Everything else must match: the
evaluation split included (`data.eval_ratio` holds out the first rows, so changing it changes the
training rows and their order; so does `data.mixture`, its sources, weights and limits)."""


OWNED_BY_THE_BATCH_PLAN = ("batch.global_batch_size", "batch.global_batch_tokens")
"""Keys whose change on resume the batch plan judges (`batch.batch_change`: the global batch in
samples must stay, whichever target set it), not `resume_diff`."""


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    """`section.key` -> value; a value that is a mapping itself (peft.rank_pattern) stays one value."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _section_defaults() -> dict[str, Any]:
    """`section.key` -> its default, for every key that has one."""
    out: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f"{section}.{f.name}"] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f"{section}.{f.name}"] = f.default_factory()
    return out


def resume_diff(saved: dict[str, Any], current: Recipe) -> tuple[list[str], list[str]]:
    """Compare the recipe a checkpoint was written with to the current one.

    Returns (breaking, harmless): lines `key: saved -> current`. A key the saved recipe lacks was
    added to tunefleet after the checkpoint was written; at its default it trains as before. The
    global batch is the batch plan's to judge (`OWNED_BY_THE_BATCH_PLAN`).
    """
    old, new = _flatten(saved), _flatten(to_dict(current))
    defaults = _section_defaults()
    breaking, harmless = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or key in OWNED_BY_THE_BATCH_PLAN:
            continue
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue
        line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        if any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS_ON_RESUME):
            harmless.append(line)
        else:
            breaking.append(line)
    return breaking, harmless


def fingerprint(recipe: Recipe, keys: list[str] | None = None) -> str:
    """A stable hash of the resolved recipe (or of the listed dotted keys)."""
    data = to_dict(recipe)
    if keys is not None:
        picked = {}
        for key in keys:
            node: Any = data
            for part in key.split("."):
                node = node[part]
            picked[key] = node
        data = picked
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
