"""The compatibility matrix, enforced before any model loads.

`resolve(recipe, hw)` returns the recipe with every setting a strategy silently requires filled
in (the 4-bit storage dtype under FSDP and ZeRO-3, ...); `check_compat(recipe, hw)` returns one
line per such adjustment for the launch summary. Both raise RecipeError for combinations known
to break, naming the setting and the fix. Pure: no torch, no file or network access; the
model's config.json, when the caller has it (`plan.find_model_config`), comes in as a mapping.

Each rule says what it rests on: a run on this machine (CPU, torch 2.13, accelerate 1.15,
DeepSpeed 0.19.8, transformers 5.23, PEFT 0.21, bitsandbytes 0.50), the installed source, or
the PEFT documentation.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from tunefleet.launch.core.errors import RecipeError
from tunefleet.launch.core.hardware import Hardware, strategy_for
from tunefleet.launch.core.recipe import PRECISION_DTYPE, WEIGHT_METHODS, Recipe
from tunefleet.launch.templates import FSDP_STRATEGIES

DEEPSPEED_STRATEGIES = ("deepspeed-zero2", "deepspeed-zero3")
BNB_4BIT = ("nf4", "fp4")
BNB = ("nf4", "fp4", "int8")

SHARDED_4BIT_STRATEGIES = ("fsdp-qlora", "deepspeed-zero3")
"""Strategies that shard a bitsandbytes 4-bit base."""


def sharded_4bit(strategy: str, quantization: str) -> bool:
    """Whether the 4-bit base is sharded over the ranks (FSDP-QLoRA, ZeRO-3 + QLoRA): its 4-bit
    weights are then stored in the parameter dtype (`_sharded_4bit_storage`), and its other weights
    stay in the model dtype (`distributed/model.py: prepare_quantized`, `memory.py`)."""
    return quantization in BNB_4BIT and strategy in SHARDED_4BIT_STRATEGIES


OFFLOAD_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
"""Optimizers that survive ZeRO optimizer offload unchanged: accelerate replaces the torch
optimizer by DeepSpeedCPUAdam (`map_pytorch_optim_to_deepspeed`), in AdamW mode only for
torch AdamW; SGD or the bitsandbytes optimizers would silently become (non-W) Adam."""

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
"""Attention kernels that take packed samples natively (`cu_seq_lens` from `position_ids`)."""

PADDING_FREE_ATTENTION = ("eager", "sdpa", *VARLEN_ATTENTION)
"""Attention implementations that keep packed samples apart (sdpa/eager through the block mask
transformers builds from `position_ids`)."""

PADDING_FREE_MODEL_TYPES = ("gemma", "llama", "mistral", "mixtral", "phi3", "qwen2", "qwen3", "qwen3_moe")
"""Model types whose packed samples were checked to stay apart, logits of each sample in a packed row
equal to its logits alone, with sdpa and eager (tests/test_padding_free.py). gpt-oss is not among
them: its packed samples leak into each other there (measured)."""

_PREQUANTIZED_NAME = re.compile(r"(?:^|[-_/.])(gptq|awq)(?:[-_/.]|$)", re.IGNORECASE)


def _fail(where: str, problem: str, fix: str) -> RecipeError:
    return RecipeError(f"{where}: {problem}", fix)


def model_quant_method(recipe: Recipe, model_config: Mapping[str, Any] | None = None) -> str | None:
    """The quantization the checkpoint ships with (`gptq`, `awq`, `mxfp4`, ...), or None.

    From config.json's `quantization_config.quant_method` when the config is known; otherwise
    guessed from the model id (`...-GPTQ`, `...-AWQ`, `gpt-oss`), since the Hub is not read here.
    """
    if model_config is not None:
        qc = model_config.get("quantization_config")
        method = qc.get("quant_method") if isinstance(qc, Mapping) else None
        return str(method).lower() if method else None
    name = recipe.model.name_or_path
    match = _PREQUANTIZED_NAME.search(name)
    if match:
        return match.group(1).lower()
    if "gpt-oss" in name.lower():
        return "mxfp4"
    return None


@dataclasses.dataclass
class _Resolution:
    """The recipe as the rules adjust it, one rule after another, and the note of each adjustment."""

    recipe: Recipe
    hw: Hardware
    model_config: Mapping[str, Any] | None
    notes: list[str] = dataclasses.field(default_factory=list)

    def replace(self, section: str, note: str, **changes: Any) -> None:
        """Change fields of one recipe section, recording why."""
        updated = dataclasses.replace(getattr(self.recipe, section), **changes)
        self.recipe = dataclasses.replace(self.recipe, **{section: updated})
        self.notes.append(note)


def _processes(r: _Resolution) -> None:
    """`auto` becomes single or ddp by the process count; `single` runs exactly one process."""
    asked, n = r.recipe.parallel.strategy, r.hw.num_processes
    if asked == "single" and n > 1:
        raise _fail(
            "parallel.strategy",
            f"`single` runs one process, but {n} were asked for",
            "use parallel.strategy=auto or ddp (or another multi-process strategy), or launch 1 process",
        )
    strategy = strategy_for(asked, n)
    if strategy == asked:
        return
    if asked == "auto":
        note = f"parallel.strategy: auto -> {strategy} ({n} process{'es' if n > 1 else ''})"
    else:
        note = "parallel.strategy: ddp on 1 process runs as `single` (nothing to replicate)"
    r.replace("parallel", note, strategy=strategy)


def _fsdp_on_cpu(r: _Resolution) -> None:
    """accelerate (state.py) turns FSDP on only for GPU-like devices and silently trains DDP instead
    (measured). FSDP2 runs on CPU through tunefleet's layer (distributed/cpu_fsdp.py; the entrypoint
    checks for DTensor parameters). FSDP1 does not: its sync_module_states looks up a GPU, and it
    segfaulted gathering a full state dict here."""
    par, s = r.recipe.parallel, r.recipe.parallel.strategy
    if s not in FSDP_STRATEGIES or not r.hw.use_cpu:
        return
    if par.fsdp_version == 1:
        raise _fail(
            "parallel.fsdp_version",
            f"{s} with FSDP1 needs GPUs (on CPU accelerate looks up a GPU for "
            "sync_module_states, and FSDP1 crashed gathering a full state dict here)",
            "use parallel.fsdp_version=2 (runs on CPU), or run on GPUs",
        )
    r.notes.append(
        f"parallel.strategy: {s} on CPU runs FSDP2 through tunefleet's compatibility layer "
        "(distributed/cpu_fsdp.py: accelerate alone would silently run DDP)"
    )


def _prequantized(r: _Resolution) -> None:
    """Checkpoints that ship quantized weights (MXFP4, GPTQ, AWQ) load in their own format."""
    m, s = r.recipe.model, r.recipe.parallel.strategy
    shipped = model_quant_method(r.recipe, r.model_config)
    if shipped == "mxfp4" and m.quantization in BNB:
        raise _fail(
            "model.quantization",
            f"{m.name_or_path!r} ships MXFP4 weights (gpt-oss); bitsandbytes "
            f"{m.quantization} cannot re-quantize them (transformers refuses a BitsAndBytesConfig "
            "for an Mxfp4 checkpoint, after the download)",
            "set model.quantization=mxfp4 (dequantized to model.dtype at load)",
        )
    if shipped in ("gptq", "awq") and m.quantization in BNB:
        raise _fail(
            "model.quantization",
            f"{m.name_or_path!r} is already {shipped.upper()}-quantized; "
            f"bitsandbytes {m.quantization} cannot quantize it again",
            "set model.quantization=none (the checkpoint loads in its own format)",
        )
    if shipped in ("gptq", "awq") and s in FSDP_STRATEGIES:
        raise _fail(
            "parallel.strategy",
            f"{s} cannot shard a pre-quantized {shipped.upper()} model: its packed "
            "int32 weights are buffers, which FSDP neither shards nor flattens with float parameters",
            "use ddp or deepspeed-zero2, or a bf16 checkpoint with fsdp-qlora",
        )
    if m.quantization == "mxfp4" and not m.mxfp4_dequantize:
        raise _fail(
            "model.mxfp4_dequantize",
            "training needs the MXFP4 weights dequantized (transformers' Mxfp4 quantizer is not trainable)",
            "set model.mxfp4_dequantize=true",
        )


def _weights_trained(r: _Resolution) -> None:
    """`full`/`freeze` train the model's own weights: they must be weights a gradient can move, and
    the strategy one that shards weights rather than a 4-bit base under adapters."""
    m, p, s = r.recipe.model, r.recipe.peft, r.recipe.parallel.strategy
    if p.method not in WEIGHT_METHODS:
        return
    if s == "fsdp-qlora":
        raise _fail(
            "parallel.strategy",
            f"fsdp-qlora shards a 4-bit base under adapters; peft.method={p.method} trains the weights themselves",
            "use parallel.strategy=fsdp (FSDP2 shards the weights, their gradients and optimizer state)",
        )
    if m.quantization in BNB:
        raise _fail(
            "model.quantization",
            f"peft.method={p.method} trains the base weights, and bitsandbytes {m.quantization} stores them "
            "quantized, where no gradient can move them (QLoRA trains an adapter beside them instead)",
            "set model.quantization=none to fine-tune the weights, or peft.method=lora to keep the 4-bit base",
        )


def _bitsandbytes_under_fsdp(r: _Resolution) -> None:
    """A bitsandbytes base is sharded only by `fsdp-qlora`, in 4 bits, with a float optimizer."""
    m, s, t = r.recipe.model, r.recipe.parallel.strategy, r.recipe.train
    if s == "fsdp" and m.quantization in BNB_4BIT:
        raise _fail(
            "parallel.strategy",
            f"fsdp with a {m.quantization} base needs the FSDP-QLoRA settings "
            "(4-bit storage dtype, auto-wrap, checkpointing)",
            "use parallel.strategy=fsdp-qlora",
        )
    if s == "fsdp-qlora" and m.quantization not in BNB_4BIT:
        raise _fail(
            "model.quantization",
            f"fsdp-qlora shards a bitsandbytes 4-bit base, but model.quantization={m.quantization!r}",
            "set model.quantization=nf4, or use parallel.strategy=fsdp",
        )
    if s in FSDP_STRATEGIES and m.quantization == "int8":
        raise _fail(
            "model.quantization",
            "FSDP cannot shard bitsandbytes int8 weights (int8 tensors have no "
            "floating storage dtype; the PEFT docs flag 8-bit + FSDP as broken)",
            "use model.quantization=nf4 with parallel.strategy=fsdp-qlora, or int8 with ddp/deepspeed",
        )
    if s == "fsdp-qlora" and t.optimizer == "paged_adamw_8bit":
        raise _fail(
            "train.optimizer",
            "paged_adamw_8bit fails when an FSDP-QLoRA checkpoint is saved (PEFT docs, FSDP caveats)",
            "use train.optimizer=adamw_torch (FSDP already shards its state)",
        )


def _fsdp1_with_4bit(r: _Resolution) -> None:
    """FSDP1 flattens each unit's parameters into one tensor of one dtype. Shown on CPU with plain
    FSDP1 on 2 gloo processes and the tiny demo model (tests/test_fsdp1.py): after PEFT's k-bit
    preparation a decoder layer holds fp32 norms beside the 16-bit storage of its 4-bit weights
    ("Must flatten tensors with uniform dtype"); without it (as tunefleet prepares sharded QLoRA)
    the layer flattens, but bitsandbytes re-registers every 4-bit weight as a new parameter in each
    forward (its quant-state repair), outside the flat parameters the sharding check counts.
    accelerate runs FSDP1 only on GPUs, so the combination has never run here: refused."""
    m, par = r.recipe.model, r.recipe.parallel
    if par.strategy in FSDP_STRATEGIES and par.fsdp_version == 1 and m.quantization in BNB_4BIT:
        raise _fail(
            "parallel.fsdp_version",
            f"FSDP1 with a {m.quantization} base is not supported: FSDP1 flattens each layer into one "
            "tensor of one dtype (PEFT's k-bit preparation puts fp32 norms beside the 16-bit 4-bit "
            "storage: 'Must flatten tensors with uniform dtype'), and bitsandbytes re-registers the 4-bit "
            "weights outside FSDP1's flat parameters at every forward; it has never run on a GPU here",
            "use parallel.fsdp_version=2 (the default): FSDP2 shards the 4-bit base as DTensors",
        )


def _qdora_under_zero3(r: _Resolution) -> None:
    """Measured: QDoRA (4-bit + use_dora) under ZeRO-3 fails in the first forward ('Params4bit'
    object has no attribute 'ds_status'); DoRA under ZeRO-2/ZeRO-3 unquantized and QDoRA under
    ZeRO-2 trained and matched DDP losses exactly. QDoRA under fsdp-qlora trains in bf16 on 2 gloo
    processes (tests/test_launch.py) since every trainable parameter is fp32 (model.adapter_dtype)."""
    m, p, s = r.recipe.model, r.recipe.peft, r.recipe.parallel.strategy
    if p.method == "dora" and m.quantization in BNB_4BIT and s == "deepspeed-zero3":
        raise _fail(
            "peft.method",
            "DoRA on a 4-bit base crashes under ZeRO-3 (measured: 'Params4bit' object "
            "has no attribute 'ds_status' in the first forward)",
            "use peft.method=lora, or deepspeed-zero2 / fsdp-qlora for QDoRA",
        )


def _skipped_steps_under_deepspeed(r: _Resolution) -> None:
    """A non-finite step is skipped by dropping its gradients before the optimizer steps; DeepSpeed's
    engine steps on gradients it keeps itself, which tunefleet cannot drop."""
    if r.recipe.train.max_nonfinite_steps and r.recipe.parallel.strategy in DEEPSPEED_STRATEGIES:
        raise _fail(
            "train.max_nonfinite_steps",
            f"{r.recipe.parallel.strategy} steps its optimizer on gradients DeepSpeed keeps itself, so a "
            "non-finite step cannot be skipped there (fp16's loss scaler skips its own overflow steps)",
            "set train.max_nonfinite_steps=0 (stop at the first non-finite step), or use ddp or fsdp",
        )


def _zero_offload_optimizer(r: _Resolution) -> None:
    """ZeRO optimizer offload swaps the optimizer (accelerate map_pytorch_optim_to_deepspeed)."""
    par, t = r.recipe.parallel, r.recipe.train
    if par.strategy not in DEEPSPEED_STRATEGIES or par.offload == "none":
        return
    if t.optimizer not in OFFLOAD_OPTIMIZERS:
        raise _fail(
            "train.optimizer",
            f"with parallel.offload={par.offload} accelerate replaces {t.optimizer} by "
            "DeepSpeed's CPU Adam without saying so (Adam, not AdamW, for it)",
            "use train.optimizer=adamw_torch, or parallel.offload=none",
        )
    r.notes.append(
        f"train.optimizer: {t.optimizer} runs as DeepSpeedCPUAdam (AdamW mode, same hyper-"
        "parameters) because ZeRO offloads the optimizer"
    )


def _sharded_4bit_storage(r: _Resolution) -> None:
    """4-bit storage dtype = the dtype FSDP / ZeRO-3 hold parameters in = the model dtype.

    FSDP1 flattens a layer's tensors into one (uniform dtype required); FSDP2 casts to the
    mixed-precision dtype and leaves non-float (uint8) 4-bit weights out of sharding (accelerate
    fsdp_utils). ZeRO-3 sharded uint8 and float storage alike here (measured); the HF ZeRO-3
    QLoRA recipe uses the parameter dtype, so it is the default there, not a requirement."""
    m, s = r.recipe.model, r.recipe.parallel.strategy
    if not sharded_4bit(s, m.quantization):
        return
    strict = s == "fsdp-qlora"
    precision = r.recipe.train.precision
    if precision == "auto":
        precision = "fp32" if r.hw.use_cpu else "bf16"
        hint = "" if r.hw.use_cpu else "; set train.precision=fp16 on GPUs without bf16"
        r.replace(
            "train",
            f"train.precision: auto -> {precision} ({s} stores the 4-bit weights in the "
            f"mixed-precision dtype, so it is fixed before launch{hint})",
            precision=precision,
        )
    dtype = PRECISION_DTYPE[precision]
    if strict and m.dtype not in ("auto", dtype):
        raise _fail(
            "model.dtype",
            f"{s} needs the model dtype equal to the mixed-precision dtype {dtype} "
            f"(train.precision={precision}), got {m.dtype}",
            f"drop model.dtype or set it to {dtype}",
        )
    if strict and m.quant_storage_dtype not in (None, dtype):
        raise _fail(
            "model.quant_storage_dtype",
            f"{s} stores the 4-bit weights in the parameter dtype "
            f"{dtype}; it is set automatically and {m.quant_storage_dtype} would break sharding",
            "drop model.quant_storage_dtype",
        )
    changed = {}
    if m.dtype == "auto":
        changed["dtype"] = dtype
    if m.quant_storage_dtype is None:
        changed["quant_storage_dtype"] = dtype
    if changed:
        why = (
            "FSDP shards 4-bit weights only when they are stored in the dtype it holds parameters in"
            if strict
            else "the HF ZeRO-3 QLoRA recipe stores 4-bit weights in the parameter dtype"
        )
        r.replace(
            "model",
            f"{', '.join(f'model.{k}={v}' for k, v in changed.items())}: {why} "
            "(bnb_4bit_quant_storage = mixed precision = model dtype)",
            **changed,
        )


def padding_free_problem(model_type: str | None, attn_implementation: str | None) -> str | None:
    """Why packed samples would not be kept apart, or None. Isolation rests on the attention
    reading sample boundaries from `position_ids` (flash attention's varlen kernels, or the block
    mask transformers builds from them for sdpa/eager when there is no attention mask and no KV
    cache); tests/test_padding_free.py checks it, sample by sample, for every model type listed."""
    if attn_implementation is not None and attn_implementation not in PADDING_FREE_ATTENTION:
        return (
            f"the attention implementation {attn_implementation!r} is not known to keep packed samples apart"
        )
    if model_type is not None and model_type not in PADDING_FREE_MODEL_TYPES:
        return (
            f"model type {model_type!r} is not among those verified to keep packed samples apart "
            f"({', '.join(PADDING_FREE_MODEL_TYPES)}): its attention may let samples see each other"
        )
    return None


def _padding_free(r: _Resolution) -> None:
    """`auto` packs micro batches only where it is faster; packing is refused where samples could leak."""
    b, m = r.recipe.batch, r.recipe.model
    varlen = not r.hw.use_cpu and m.attn_implementation in VARLEN_ATTENTION
    if b.padding_free == "auto":
        why = (
            "flash attention's variable-length kernels attend within each sample"
            if varlen
            else f"{m.attn_implementation or 'sdpa'} on {'CPU' if r.hw.use_cpu else 'GPU'} attends over the whole "
            "packed row, slower than micro batches grouped by length; batch.padding_free=true forces it"
        )
        r.replace("batch", f"batch.padding_free: auto -> {str(varlen).lower()} ({why})", padding_free=varlen)
    if r.recipe.batch.padding_free is not True:
        return
    model_type = r.model_config.get("model_type") if r.model_config is not None else None
    problem = padding_free_problem(model_type, m.attn_implementation)
    if problem:
        raise _fail(
            "batch.padding_free", problem, "set batch.padding_free=false (micro batches grouped by length)"
        )
    if not varlen:
        r.notes.append(
            f"batch.padding_free: {m.attn_implementation or 'sdpa'} keeps packed samples apart with a block mask "
            "over the whole row, which costs more than padding on this hardware (tools/bench_throughput.py)"
        )


def _gpu_kernels(r: _Resolution) -> None:
    """Flash attention and Liger are CUDA kernels: on CPU they are refused, never silently skipped."""
    m, t = r.recipe.model, r.recipe.train
    if r.hw.use_cpu and m.attn_implementation in VARLEN_ATTENTION:
        raise _fail(
            "model.attn_implementation",
            f"{m.attn_implementation} is a CUDA kernel; this run has no GPU",
            "use model.attn_implementation=sdpa (or leave it unset) on CPU",
        )
    if r.hw.use_cpu and t.liger_kernel:
        raise _fail(
            "train.liger_kernel",
            "Liger's Triton kernels need a CUDA GPU; this run has none",
            "set train.liger_kernel=false on CPU",
        )


def _loftq_on_cpu(r: _Resolution) -> None:
    """Measured (PEFT 0.21, this CPU machine, scipy installed): `peft.init: loftq` fails while the
    adapter is built, in `peft/utils/loftq_utils.py: loftq_init`, which moves every weight to "cuda"
    whatever the machine: "AssertionError: Torch not compiled with CUDA enabled". PEFT runs the same
    code again whenever it loads the adapter (merge, generate: refused there too)."""
    if r.recipe.peft.init == "loftq" and r.hw.use_cpu:
        raise _fail(
            "peft.init",
            "PEFT runs LoftQ's quantization on a CUDA GPU only (loftq_utils.py moves the weights to 'cuda'; "
            "on CPU: 'Torch not compiled with CUDA enabled')",
            "run peft.init=loftq on a GPU, or use peft.init=pissa / olora / default on CPU",
        )


def _eva_under_zero3(r: _Resolution) -> None:
    """Measured (`tunefleet launch --nproc 2`, demo, r=4): ZeRO-3 partitions the weights as the model
    loads (zero.Init), and EVA's forward passes come before DeepSpeed's engine exists to gather them:
    the first one fails in the embedding, "RuntimeError: 'weight' must be 2-D"
    (peft/tuners/lora/eva.py forward_fn_dict). EVA under FSDP2 and DDP trained (2 processes)."""
    if r.recipe.peft.init == "eva" and r.recipe.parallel.strategy == "deepspeed-zero3":
        raise _fail(
            "peft.init",
            "EVA runs the model over the first batches before DeepSpeed exists, and ZeRO-3 has partitioned "
            "its weights by then (measured: \"'weight' must be 2-D\" in EVA's first forward)",
            "use deepspeed-zero2, fsdp or ddp with peft.init=eva, or another peft.init under ZeRO-3",
        )


def _trainable_tokens_zero3_on_cpu(r: _Resolution) -> None:
    """Measured (`tunefleet launch --nproc 2`, demo, CPU): `peft.trainable_token_indices` under ZeRO-3
    fails while the adapter is built, in PEFT's `TrainableTokensLayer._collect_token_weights`
    (trainable_tokens/layer.py), which gathers the partitioned embedding rows onto
    `torch.cuda.current_device()` ("right now, only CUDA is implemented"): "AssertionError: Torch not
    compiled with CUDA enabled". On a GPU that path is PEFT's own; under DDP, ZeRO-2 and FSDP it ran."""
    if (
        r.recipe.peft.trainable_token_indices is not None
        and r.recipe.parallel.strategy == "deepspeed-zero3"
        and r.hw.use_cpu
    ):
        raise _fail(
            "peft.trainable_token_indices",
            "under deepspeed-zero3 PEFT gathers the partitioned embedding rows onto a CUDA device, which "
            "this machine lacks (measured: 'Torch not compiled with CUDA enabled' while the adapter is built)",
            "use ddp, deepspeed-zero2 or fsdp on CPU with peft.trainable_token_indices, or run ZeRO-3 on GPUs",
        )


def _layer_replication_sharded(r: _Resolution) -> None:
    """Measured (`tunefleet launch --nproc 2 --set parallel.strategy=fsdp`, demo, torch 2.13): PEFT's
    replicated layers share their frozen base weights, and FSDP2 shards each decoder layer as its own
    group: "ValueError: Parameter 'base_model.model.model.layers.2.self_attn.q_proj.base_layer.weight'
    is shared with a parameter already managed by another FSDP group". DDP, ZeRO-2 and ZeRO-3 trained."""
    s = r.recipe.parallel.strategy
    if r.recipe.peft.layer_replication and s in FSDP_STRATEGIES:
        raise _fail(
            "peft.layer_replication",
            f"the replicated layers share their base weights, and {s} shards every decoder layer on its own "
            "(measured: 'is shared with a parameter already managed by another FSDP group')",
            "use ddp or deepspeed-zero2/zero3 with peft.layer_replication",
        )


def _lora_fa_sharded(r: _Resolution) -> None:
    """Measured (`tunefleet launch --nproc 2`, demo, 3 steps):
    - FSDP2 (CPU layer): LoRA-FA fails at the first optimizer step, in PEFT's LoraFAOptimizer
      (lorafa.py, `A @ A.T + delta * torch.eye(r)` on sharded A): "aten.add.Tensor got mixed
      torch.Tensor and DTensor".
    - DeepSpeed ZeRO-2: it runs, but not as LoRA-FA: DeepSpeed hands the optimizer flattened
      parameter partitions, so LoraFAOptimizer's pairing of each A with its B by name never happens;
      A stays frozen but B moves differently (step-3 loss 6.393 against DDP's 6.614, final B off by
      9e-3; plain LoRA under ZeRO-2 equals DDP to 1e-6). ZeRO-3: the same loss, 6.393."""
    s = r.recipe.parallel.strategy
    if not r.recipe.peft.lora_fa:
        return
    if s in FSDP_STRATEGIES:
        raise _fail(
            "peft.lora_fa",
            f"LoRA-FA's optimizer multiplies whole A matrices, which {s} has sharded (measured: 'aten.add.Tensor "
            "got mixed torch.Tensor and DTensor' at the first step)",
            "use ddp with peft.lora_fa, or drop peft.lora_fa under FSDP",
        )
    if s in DEEPSPEED_STRATEGIES:
        raise _fail(
            "peft.lora_fa",
            f"under {s} DeepSpeed gives the optimizer flattened partitions, so LoRA-FA's optimizer cannot pair "
            "each A with its B and B is not updated by LoRA-FA's rule (measured: losses off DDP's by 0.2 "
            "after 2 updates)",
            "use ddp (or one process) with peft.lora_fa, or drop peft.lora_fa under DeepSpeed",
        )


def _alora_rows(r: _Resolution) -> None:
    """PEFT finds one aLoRA invocation per row, the last (`calculate_alora_offsets`): in a row packing
    several samples the adapter would act only from the last sample's invocation on, and the samples
    before it would train nothing (tests/test_lora_variants.py shows it on a packed row). `auto`
    becomes false; true is refused."""
    b = r.recipe.batch
    if r.recipe.peft.alora_invocation is None or b.padding_free is False:
        return
    if b.padding_free == "auto":
        r.replace(
            "batch",
            "batch.padding_free: auto -> false (aLoRA finds one invocation per row: samples must not share rows)",
            padding_free=False,
        )
        return
    raise _fail(
        "batch.padding_free",
        "aLoRA finds one invocation per row (the last), so in a packed row every sample but the last "
        "would never see the adapter",
        "set batch.padding_free=false (or auto) with peft.alora_invocation",
    )


RULES = (
    _processes,
    _fsdp_on_cpu,
    _prequantized,
    _weights_trained,
    _bitsandbytes_under_fsdp,
    _fsdp1_with_4bit,
    _qdora_under_zero3,
    _skipped_steps_under_deepspeed,
    _zero_offload_optimizer,
    _sharded_4bit_storage,
    _gpu_kernels,
    _loftq_on_cpu,
    _eva_under_zero3,
    _trainable_tokens_zero3_on_cpu,
    _layer_replication_sharded,
    _lora_fa_sharded,
    _alora_rows,
    _padding_free,
)
"""The compatibility matrix in the order it is applied: each rule refuses what breaks (naming the
fix) or fills in what a strategy silently requires (with a note)."""


def _resolve(
    recipe: Recipe, hw: Hardware, model_config: Mapping[str, Any] | None
) -> tuple[Recipe, list[str]]:
    resolution = _Resolution(recipe, hw, model_config)
    for rule in RULES:
        rule(resolution)
    return resolution.recipe, resolution.notes


def resolve_with_notes(
    recipe: Recipe,
    hw: Hardware,
    model_config: Mapping[str, Any] | None = None,
) -> tuple[Recipe, list[str]]:
    """The adjusted recipe and one line per adjustment; raises RecipeError for forbidden combinations."""
    return _resolve(recipe, hw, model_config)


def resolve(recipe: Recipe, hw: Hardware, model_config: Mapping[str, Any] | None = None) -> Recipe:
    """The recipe with every silently-required setting filled in (idempotent)."""
    return _resolve(recipe, hw, model_config)[0]


def check_compat(recipe: Recipe, hw: Hardware, model_config: Mapping[str, Any] | None = None) -> list[str]:
    """Lines for the launch summary, one per adjusted setting; raises RecipeError when the
    combination is known to break."""
    return _resolve(recipe, hw, model_config)[1]
