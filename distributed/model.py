"""Loading the tokenizer, the (optionally quantized) base model and the PEFT adapter for a recipe."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from tunefleet.launch.compat import BNB, sharded_4bit
from tunefleet.launch.core.errors import RecipeError, TunefleetError
from tunefleet.launch.core.layout import atomic_dir
from tunefleet.launch.core.recipe import (
    PRECISION_DTYPE,
    TRAINED_DTYPE,
    WEIGHT_METHODS,
    ModelConfig,
    Recipe,
    weight_dtype,
)
from tunefleet.launch.loading import placed_on_gpu_at_load, rank0_loads_weights

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "uint8": torch.uint8,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Precision:
    """What the run computes in, resolved from the recipe and the hardware."""

    mode: str
    """`bf16`, `fp16` or `fp32` (mixed precision of the trainer)."""
    dtype: torch.dtype
    """Dtype the base weights are loaded in."""
    use_cpu: bool
    """True when no GPU is used (must be passed to the trainer explicitly)."""


def resolve_precision(recipe: Recipe) -> Precision:
    """Pick the precision: explicit values win; `auto` is bf16 on GPUs that support it, else fp32."""
    use_cpu = not torch.cuda.is_available()
    mode = recipe.train.precision
    if mode == "auto":
        if use_cpu:
            mode = "fp32"
        else:
            mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "fp16" and use_cpu:
        raise RecipeError(
            "train.precision=fp16 needs a GPU (fp16 mixed precision is not supported on CPU)",
            "use train.precision=bf16 or fp32 on CPU",
        )
    return Precision(mode=mode, dtype=_DTYPES[weight_dtype(recipe, mode)], use_cpu=use_cpu)


def export_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype of a full/freeze run's final model: train.export_dtype, or the compute dtype of the
    run (bf16 under bf16, fp16 under fp16, else fp32) when `auto`."""
    if recipe.train.export_dtype != "auto":
        return _DTYPES[recipe.train.export_dtype]
    return _DTYPES[PRECISION_DTYPE[resolve_precision(recipe).mode]]


def resolve_model_path(model: ModelConfig) -> str:
    """The path or hub id to load; the built-in demo model is built locally on first use."""
    from tunefleet.distributed.demo_model import TINY_LLAMA_ID, ensure_tiny_llama, use_one_thread

    if model.name_or_path == TINY_LLAMA_ID:
        use_one_thread()
        return str(ensure_tiny_llama())
    if model.name_or_path.startswith("tunefleet:"):
        raise RecipeError(
            f"model.name_or_path: unknown built-in model {model.name_or_path!r}",
            f"the built-in model is {TINY_LLAMA_ID!r}; otherwise name a hub id or a directory",
        )
    if Path(model.name_or_path).expanduser().is_dir():
        from tunefleet.launch.loading import weights_problem

        problem = weights_problem(Path(model.name_or_path).expanduser())
        if problem is not None:
            raise TunefleetError(
                f"model.name_or_path={model.name_or_path!r}: {problem} (a download cut short?)",
                "download the model again (e.g. `hf download MODEL --local-dir DIR`), or copy it whole",
            )
    return model.name_or_path


def load_tokenizer(path: str, model: ModelConfig) -> Any:
    """The tokenizer, with pad = eos when it has none and right padding (as the seeds do)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except OSError as exc:
        raise TunefleetError(
            f"cannot load the tokenizer of model.name_or_path={path!r}: {exc}",
            "check the model id or directory (and HF_TOKEN for gated models; offline machines need a local copy)",
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _check_bitsandbytes(quantization: str, use_cpu: bool) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise RecipeError(
            f"model.quantization={quantization} needs bitsandbytes, which cannot be loaded here: {exc}",
            "install bitsandbytes (pip install bitsandbytes) or set model.quantization=none",
        ) from None
    if use_cpu and quantization == "int8":
        raise RecipeError(
            "model.quantization=int8 (LLM.int8) has no CPU kernels for training in bitsandbytes",
            "on CPU use model.quantization=nf4 (4-bit) or none",
        )


def quantization_config(model: ModelConfig, precision: Precision) -> Any | None:
    """The transformers quantization config for the recipe, or None."""
    q = model.quantization
    if q == "none":
        return None
    if q == "mxfp4":
        from transformers import Mxfp4Config  # type: ignore[attr-defined]

        return Mxfp4Config(dequantize=model.mxfp4_dequantize)
    _check_bitsandbytes(q, precision.use_cpu)
    from transformers import BitsAndBytesConfig

    if q == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = _DTYPES[model.compute_dtype] if model.compute_dtype else precision.dtype
    storage = _DTYPES[model.quant_storage_dtype] if model.quant_storage_dtype else torch.uint8
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q,
        bnb_4bit_use_double_quant=model.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )


def load_kwargs(recipe: Recipe, precision: Precision, *, local_rank: int = 0) -> dict[str, Any]:
    """The keyword arguments of `from_pretrained` for the recipe: dtype, quantization, placement."""
    m = recipe.model
    kwargs: dict[str, Any] = {
        "dtype": precision.dtype,
        "revision": m.revision,
        "trust_remote_code": m.trust_remote_code,
    }
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    qconfig = quantization_config(m, precision)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    device_map = _device_map(recipe, precision, local_rank)
    if device_map is not None:
        kwargs["device_map"] = device_map
    return kwargs


def _device_map(recipe: Recipe, precision: Precision, local_rank: int) -> dict[str, Any] | None:
    """The rank's GPU when the weights must be loaded straight onto it (`loading.placed_on_gpu_at_load`:
    MXFP4), else None (transformers' or the trainer's placement)."""
    if not placed_on_gpu_at_load(recipe, use_cpu=precision.use_cpu):
        return None
    return {"": local_rank}


def load_model(path: str, recipe: Recipe, precision: Precision, *, rank: int = 0, world_size: int = 1) -> Any:
    """The base model in the recipe's dtype and quantization, ready for PEFT.

    Under FSDP2 with several processes only rank 0 reads the weights; the other ranks build the
    model on the meta device (buffers real: rotary tables are computed, not loaded) and receive
    rank 0's weights when accelerate shards the model (`loading.rank0_loads_weights`)."""
    if rank != 0 and rank0_loads_weights(recipe, world_size) and _broadcast_loading_in_effect(precision):
        model = empty_model(path, recipe, precision)
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        model = from_pretrained(path, **load_kwargs(recipe, precision, local_rank=local_rank))
    model.config.use_cache = False  # the cache is useless in training and breaks gradient checkpointing
    return model


def _broadcast_loading_in_effect(precision: Precision) -> bool:
    """Whether accelerate will broadcast rank 0's weights into this rank's shards: launched with an
    FSDP config that turns RAM-efficient loading on (accelerate's variables), and FSDP really in
    effect (on CPU only through distributed/cpu_fsdp.py). Otherwise accelerate runs DDP, or nothing
    distributed, with this rank's weights as loaded: they must be real, so that the run reaches the
    check that stops it with a clear error (guard.check_distributed) instead of failing on the meta
    device."""
    from tunefleet.distributed import cpu_fsdp

    def on(name: str) -> bool:
        return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")

    if not (on("ACCELERATE_USE_FSDP") and on("FSDP_CPU_RAM_EFFICIENT_LOADING")):
        return False
    return not precision.use_cpu or cpu_fsdp.is_enabled()


def empty_model(path: str, recipe: Recipe, precision: Precision) -> Any:
    """The model's architecture with its parameters on the meta device: nothing read, nothing held."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    m = recipe.model
    try:
        config = AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except OSError as exc:
        raise TunefleetError(
            f"cannot load the config of model.name_or_path={path!r}: {exc}",
            "check the model id or directory (and HF_TOKEN for gated models; offline machines need a local copy)",
        ) from None
    kwargs: dict[str, Any] = {"dtype": precision.dtype, "trust_remote_code": m.trust_remote_code}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def from_pretrained(path: str, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained`, with a readable error when the model cannot be found."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise TunefleetError(
            f"cannot load model.name_or_path={path!r}: {exc}",
            "check the model id or directory (and HF_TOKEN for gated models; offline machines need a local copy)",
        ) from None


def prepare_quantized(model: Any, recipe: Recipe) -> Any:
    """Get a bitsandbytes base ready for adapters.

    Replicated (single, ddp, ZeRO-2): PEFT's `prepare_model_for_kbit_training`, which also casts
    every non-quantized weight (embeddings, output head, norms) to fp32. Sharded: the FSDP-QLoRA
    references (TRL's sharded-QLoRA path, PEFT's and Answer.AI's FSDP-QLoRA scripts) skip it, and so
    does this: the fp32 copies would double or quadruple what the unquantized weights cost on every
    rank, and FSDP1 cannot flatten fp32 norms with the 16-bit 4-bit storage of their layer. What
    training needs from it is kept: a frozen base (get_peft_model freezes it anyway) and, with
    activation checkpointing, gradients on the embedding output so checkpointed layers backpropagate."""
    if not sharded_4bit(recipe.parallel.strategy, recipe.model.quantization):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    for param in model.parameters():
        param.requires_grad_(False)
    if recipe.train.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def apply_peft(
    model: Any, recipe: Recipe, *, alora_invocation_tokens: list[int] | None = None, config: Any = None
) -> Any:
    """Wrap the base model with the recipe's adapter (k-bit preparation for QLoRA).

    `config`: a LoraConfig to use instead of the recipe's (resuming an EVA run: the ranks EVA chose,
    `eva.saved_config`). EVA's data-driven initialisation itself comes after: `eva.initialize`."""
    from peft import LoraConfig, get_peft_model

    from tunefleet.launch.params import check_module_names, check_patterns, freeze_lora_a, lora_config_kwargs

    if recipe.model.quantization in BNB:
        model = prepare_quantized(model, recipe)
    check_module_names(model, recipe.peft)
    if config is None:
        config = LoraConfig(**lora_config_kwargs(recipe.peft, alora_invocation_tokens))
    try:
        with warnings.catch_warnings():
            # EVA: PEFT suggests low_cpu_mem_usage to skip initialising A before EVA replaces it; for
            # adapters this small the saving is nothing
            warnings.filterwarnings(
                "ignore", message="lora with eva initialization used with low_cpu_mem_usage"
            )
            peft_model = get_peft_model(model, config)
    except ValueError as exc:
        # e.g. target modules not found in the model
        raise RecipeError(
            f"peft: {exc}", "check peft.target_modules against the model's module names"
        ) from None
    check_patterns(peft_model, recipe.peft)
    if recipe.peft.lora_fa:
        freeze_lora_a(peft_model)
    return peft_model


def apply_method(
    model: Any, recipe: Recipe, *, alora_invocation_tokens: list[int] | None = None, config: Any = None
) -> Any:
    """What `peft.method` trains: an adapter on the frozen base (`lora`, `dora`: `apply_peft`), or the
    model's own weights (`full`: all of them; `freeze`: the selection of `params.trainable_parameters`,
    the rule the plan counts with). The rest stays frozen."""
    if recipe.peft.method in WEIGHT_METHODS:
        from tunefleet.launch.params import apply_selection

        apply_selection(model, recipe.peft)
        if recipe.model.dtype == "auto":  # freeze: a 16-bit frozen base, fp32 master copies of what trains
            for param in model.parameters():
                if param.requires_grad and param.dtype != _DTYPES[TRAINED_DTYPE]:  # meta too: no copy
                    param.data = param.data.to(_DTYPES[TRAINED_DTYPE])
        return model
    return apply_peft(model, recipe, alora_invocation_tokens=alora_invocation_tokens, config=config)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters of the model as built, before sharding: PEFT's own count for an
    adapter (4-bit weights counted unpacked), else every parameter (ZeRO-3's partitioned ones by their
    full size)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)

    def numel(p: Any) -> int:
        return int(getattr(p, "ds_numel", 0) or p.numel())

    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


def check_loadable_here(recipe: Recipe) -> None:
    """PEFT recomputes a LoftQ adapter's quantized base when it loads it, and only on a GPU
    (`peft/utils/loftq_utils.py` moves the weights to "cuda": on CPU "Torch not compiled with CUDA
    enabled"): refuse before loading anything."""
    if recipe.peft.init == "loftq" and not torch.cuda.is_available():
        raise TunefleetError(
            "this run's adapter was initialised with LoftQ (peft.init=loftq); PEFT rebuilds LoftQ's quantized "
            "base weights when it loads the adapter, and only on a CUDA GPU",
            "run this on a machine with a GPU",
        )


def materialize_trainable(model: Any) -> Any:
    """Give trainable parameters still on the meta device (a rank that read no weights: `load_model`)
    a distinct CPU address. accelerate maps the optimizer's parameters to their FSDP2 shards by
    storage address (`data_ptr`), which is 0 for every meta tensor: the optimizer would then hold one
    parameter many times (seen here as a failed checkpoint save). The values are never read: rank 0's
    are broadcast into the shards. So each placeholder is one element of one shared buffer, viewed at
    the parameter's shape with zero strides: a full fine-tune's billions of parameters cost a few
    bytes each here, not a second copy of the model on every rank. The frozen base stays on the meta
    device."""
    import torch.nn as nn

    wanted = [
        (module, name, param)
        for module in model.modules()
        for name, param in list(module._parameters.items())
        if param is not None and param.requires_grad and param.is_meta
    ]
    if not wanted:
        return model
    dtypes = {param.dtype for _, _, param in wanted}
    buffers = {dtype: torch.empty(len(wanted), dtype=dtype, device="cpu") for dtype in dtypes}
    for i, (module, name, param) in enumerate(wanted):
        cell = buffers[param.dtype][i : i + 1]
        placeholder = cell.as_strided(tuple(param.shape), (0,) * param.dim())
        module._parameters[name] = nn.Parameter(placeholder, requires_grad=True)
    return model


def save_adapter(model: Any, tokenizer: Any, out_dir: Path, state_dict: dict[str, Any] | None = None) -> None:
    """Save the adapter and tokenizer into `out_dir` atomically (temp dir, then rename).

    `state_dict`: the adapter weights gathered from shards (final_adapter.py); None reads the model."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)


def adapter_dtype(recipe: Recipe) -> torch.dtype | None:
    """The dtype every trainable parameter has when training starts; None leaves PEFT's choice.

    The one decision about adapter dtypes. Unquantized bases: PEFT already keeps adapters in fp32
    (`autocast_adapter_dtype`) and nothing recasts them. bitsandbytes bases: TRL's SFTTrainer casts
    the LoRA A/B weights of a quantized model to bf16 whatever the precision, and leaves DoRA's
    magnitude in fp32; every precision needs one fp32 dtype instead:
    - fp16: the gradient scaler cannot unscale 16-bit gradients (fp16: "Attempting to unscale FP16
      gradients", seen here; bf16: PyTorch's CUDA unscale kernel is built for fp32 and fp16 only);
      fp32 adapters under fp16 autocast is the mixed-precision recipe;
    - bf16: FSDP2 needs one dtype for the trainable parameters of a unit ("FSDP expects uniform
      original parameter dtype": bf16 LoRA beside fp32 DoRA magnitudes in QDoRA), accelerate's own
      fp32 upcast of trainable parameters is skipped when 4-bit parameters exist, and a bf16
      magnitude would be frozen by rounding (TRL keeps it fp32 for that reason); the compute still
      runs in bf16 (autocast, FSDP's mixed-precision policy);
    - fp32: fp32 asked means fp32 (bf16 rounding made 2-process losses differ from 1 by ~1e-4).
    Under DeepSpeed the engine keeps its own 16-bit copy and fp32 master weights whatever this is."""
    if recipe.model.quantization in BNB:
        return torch.float32
    return None


def match_adapter_dtype(model: Any, recipe: Recipe) -> None:
    """Give every trainable parameter `adapter_dtype` (after the trainer exists: TRL recasts before)."""
    dtype = adapter_dtype(recipe)
    if dtype is None:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
