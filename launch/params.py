"""Parameter counts of a recipe's model and adapter, without downloading or allocating weights.

The model is built from its `config.json` on the meta device (shapes only, no memory), the
recipe's LoRA/DoRA adapter is applied there with PEFT, and the parameters are counted the way
PEFT's `get_nb_trainable_parameters()` / `print_trainable_parameters()` count them. For
bitsandbytes 4-bit weights PEFT multiplies the packed element count back (x2 per byte of
storage), and 8-bit weights keep their element count, so PEFT's numbers for nf4/fp4/int8 are
those of the unquantized model: that is what is counted here (tests check it on a real model).
MXFP4 (gpt-oss) is counted as the dequantized model, which matches the
`trainable params: 7,962,624 || all params: 20,922,719,808` printed in seed 000.

`lora_config_kwargs` is the single mapping from the recipe's `peft` section to
`peft.LoraConfig`; the trainer builds its adapter from it, so the count and the run agree.

torch, transformers and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunefleet.launch.core.errors import RecipeError
from tunefleet.launch.core.recipe import PeftConfig

_INIT_LORA_WEIGHTS: dict[str, bool | str] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
    "loftq": "loftq",
}

LOFTQ_CONFIG: dict[str, int] = {"loftq_bits": 4, "loftq_iter": 1}
"""`peft.LoftQConfig()` defaults as the dict LoraConfig stores (4-bit, one alternating step)."""


def lora_config_kwargs(peft: PeftConfig) -> dict[str, Any]:
    """The keyword arguments of `peft.LoraConfig` for the recipe's `peft` section (pure)."""
    kwargs: dict[str, Any] = {
        "task_type": "CAUSAL_LM",
        "r": peft.r,
        "lora_alpha": peft.alpha,
        "lora_dropout": peft.dropout,
        "bias": peft.bias,
        "target_modules": list(peft.target_modules)
        if isinstance(peft.target_modules, list)
        else peft.target_modules,
        "modules_to_save": list(peft.modules_to_save) if peft.modules_to_save else None,
        "use_dora": peft.method == "dora",
        "use_rslora": peft.use_rslora,
        "init_lora_weights": _INIT_LORA_WEIGHTS[peft.init],
    }
    if peft.init == "loftq":
        kwargs["loftq_config"] = dict(LOFTQ_CONFIG)
    return kwargs


def linear_module_names(model: Any) -> list[str]:
    """The distinct names of the model's linear layers, as `peft.target_modules` takes them."""
    import torch

    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name and not name.endswith("lm_head")
        }
    )


def check_module_names(model: Any, peft: PeftConfig) -> None:
    """Every listed module name must match a module of the model. PEFT matches a name when a module's
    full name is it or ends with `.` + it, and ignores a name that matches nothing as long as
    another one matches: a typo would silently train fewer layers."""
    names = [name for name, _ in model.named_modules()]

    def unmatched(keys: list[str] | None) -> list[str]:
        return [k for k in keys or [] if not any(n == k or n.endswith(f".{k}") for n in names)]

    lists = {
        "peft.target_modules": peft.target_modules if isinstance(peft.target_modules, list) else None,
        "peft.modules_to_save": peft.modules_to_save,
    }
    for key, listed in lists.items():
        missing = unmatched(listed)
        if missing:
            raise RecipeError(
                f"{key}: {', '.join(repr(m) for m in missing)} match{'es' if len(missing) == 1 else ''} no module of "
                f"{type(model).__name__}",
                f"use the model's module names; its linear layers are: {', '.join(linear_module_names(model))}"
                + (
                    ""
                    if key == "peft.target_modules"
                    else " (modules_to_save also takes e.g. embed_tokens, lm_head)"
                ),
            )


@dataclass(frozen=True, kw_only=True)
class ParamCounts:
    """Parameter counts of the base model with the adapter applied."""

    trainable: int
    """Trainable parameters, as PEFT's `get_nb_trainable_parameters()[0]`."""

    total: int
    """All parameters, as PEFT's `get_nb_trainable_parameters()[1]` (base + adapter)."""

    base: int
    """Parameters of the base model alone."""

    adapter: int
    """Parameters PEFT adds: LoRA A/B, DoRA magnitudes, `modules_to_save` copies."""

    quantized: int
    """Base parameters the recipe's quantization stores in low precision (0 for `none`)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_model_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A model's `config.json` as a dict, from a mapping, a `config.json` file or its directory."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(
            f"model config {str(path)!r} does not exist", "pass a config.json or its directory"
        ) from None
    except (OSError, ValueError) as exc:
        raise RecipeError(
            f"model config {str(path)!r} cannot be read: {exc}", "pass the model's config.json (a JSON file)"
        ) from None


def _quantized_numel(model: Any, quantization: str) -> int:
    """Elements of the base weights that `quantization` stores in low precision."""
    import torch

    if quantization == "none":
        return 0
    if quantization == "mxfp4":
        # transformers' Mxfp4 quantizer replaces the MoE expert blocks; their 3-D weights go MXFP4
        return sum(
            p.numel()
            for module in model.modules()
            if type(module).__name__.endswith("Experts")
            for p in module.parameters(recurse=False)
            if p.ndim == 3
        )
    # bitsandbytes: every plain nn.Linear except the output head (and tied weights)
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model)
    return sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and should_convert_module(name, skip)
    )


def param_counts(
    model_config: str | Path | Mapping[str, Any],
    peft: PeftConfig,
    quantization: str = "none",
    *,
    trust_remote_code: bool = False,
) -> ParamCounts:
    """Build the model on the meta device, apply the adapter, count as PEFT does.

    The adapter's initialisation is left at the default here: PiSSA/OLoRA/LoftQ change the
    starting values (and need real weights), never the shapes, so the counts do not depend on it.
    A `quantization_config` in the config (gpt-oss ships MXFP4) is ignored by `from_config`.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if isinstance(model_config, Mapping):
            raw = dict(model_config)
            config = AutoConfig.for_model(raw.pop("model_type", None), **raw)
        else:
            path = Path(model_config)
            config = AutoConfig.from_pretrained(
                path if path.is_dir() else path.parent, trust_remote_code=trust_remote_code
            )
    except (ValueError, KeyError, OSError) as exc:
        raise RecipeError(
            f"transformers cannot build the model config: {exc}",
            "pass the model's original config.json; models that ship their own code need "
            "model.trust_remote_code and their directory",
        ) from None
    kwargs = lora_config_kwargs(peft)
    kwargs["init_lora_weights"] = True
    kwargs.pop("loftq_config", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):  # the adapter too: no tensor is ever allocated
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            base = sum(p.numel() for p in model.parameters())
            quantized = _quantized_numel(model, quantization)
            check_module_names(model, peft)
            try:
                peft_model = get_peft_model(model, LoraConfig(**kwargs))
            except ValueError as exc:
                raise RecipeError(
                    f"peft: {exc}", "check peft.target_modules against the model's module names"
                ) from None
            trainable, total = peft_model.get_nb_trainable_parameters()
    return ParamCounts(trainable=trainable, total=total, base=base, adapter=total - base, quantized=quantized)


def count_params(
    model_config: str | Path | Mapping[str, Any], peft: PeftConfig, quantization: str = "none"
) -> tuple[int, int]:
    """(trainable, total) parameters, equal to PEFT's `get_nb_trainable_parameters()`."""
    counts = param_counts(model_config, peft, quantization)
    return counts.trainable, counts.total
