"""Loading the tokenizer, the (optionally quantized) base model and the PEFT adapter for a recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from tunefleet.launch.core.errors import RecipeError, TunefleetError
from tunefleet.launch.core.layout import atomic_dir
from tunefleet.launch.core.recipe import PRECISION_DTYPE, ModelConfig, Recipe

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
    if recipe.model.dtype == "auto":
        dtype = _DTYPES[PRECISION_DTYPE[mode]]
    else:
        dtype = _DTYPES[recipe.model.dtype]
    return Precision(mode=mode, dtype=dtype, use_cpu=use_cpu)


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


def load_model(path: str, recipe: Recipe, precision: Precision) -> Any:
    """The base model in the recipe's dtype and quantization, ready for PEFT."""
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
    model = from_pretrained(path, **kwargs)
    model.config.use_cache = False  # the cache is useless in training and breaks gradient checkpointing
    return model


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


def apply_peft(model: Any, recipe: Recipe) -> Any:
    """Wrap the base model with the recipe's LoRA/DoRA adapter (k-bit preparation for QLoRA)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from tunefleet.launch.params import check_module_names, lora_config_kwargs

    if recipe.model.quantization in ("nf4", "fp4", "int8"):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    check_module_names(model, recipe.peft)
    try:
        return get_peft_model(model, LoraConfig(**lora_config_kwargs(recipe.peft)))
    except ValueError as exc:
        # e.g. target modules not found in the model
        raise RecipeError(
            f"peft: {exc}", "check peft.target_modules against the model's module names"
        ) from None


def save_adapter(model: Any, tokenizer: Any, out_dir: Path, state_dict: dict[str, Any] | None = None) -> None:
    """Save the adapter and tokenizer into `out_dir` atomically (temp dir, then rename).

    `state_dict`: the adapter weights gathered from shards (final_adapter.py); None reads the model."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)


def match_adapter_dtype(model: Any, recipe: Recipe, precision: Precision) -> None:
    """fp32 asked means fp32 adapters. TRL's SFTTrainer casts QLoRA adapters to bf16 whatever the
    precision (the QLoRA paper's default); in an fp32 run bf16 rounding made 2-process losses
    differ from 1 by ~1e-4."""
    if recipe.model.quantization not in ("nf4", "fp4", "int8") or precision.mode != "fp32":
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
