"""Parameter counts of a recipe's model and adapter, without downloading or allocating weights;
what `peft.method` full and freeze train (`trainable_parameters`, the one selection rule).

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
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunefleet.launch.core.errors import RecipeError
from tunefleet.launch.core.recipe import WEIGHT_METHODS, PeftConfig

_INIT_LORA_WEIGHTS: dict[str, bool | str] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
    "loftq": "loftq",
    "eva": "eva",
}

LOFTQ_CONFIG: dict[str, int] = {"loftq_bits": 4, "loftq_iter": 1}
"""`peft.LoftQConfig()` defaults as the dict LoraConfig stores (4-bit, one alternating step)."""

EVA_DEFAULT_RHO = 2.0
"""`peft.EvaConfig().rho`: a layer may get up to twice `r` when EVA redistributes the ranks."""


def lora_config_kwargs(peft: PeftConfig, alora_invocation_tokens: list[int] | None = None) -> dict[str, Any]:
    """The keyword arguments of `peft.LoraConfig` for the recipe's `peft` section (pure).

    `alora_invocation_tokens`: `peft.alora_invocation` tokenised with the run's tokenizer (the
    runtime has it; `param_counts` passes a stand-in, aLoRA's shapes are LoRA's). LoRA+ and LoRA-FA
    are optimizers, not adapter settings: `distributed/optimizers.py`."""
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
    if peft.init == "eva":
        kwargs["eva_config"] = {"rho": peft.eva_rho if peft.eva_rho is not None else EVA_DEFAULT_RHO}
    optional = {
        "rank_pattern": dict(peft.rank_pattern) if peft.rank_pattern else None,
        "alpha_pattern": dict(peft.alpha_pattern) if peft.alpha_pattern else None,
        "target_parameters": list(peft.target_parameters) if peft.target_parameters else None,
        "trainable_token_indices": _copy_indices(peft.trainable_token_indices),
        "layer_replication": [list(pair) for pair in peft.layer_replication]
        if peft.layer_replication
        else None,
    }
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    if peft.alora_invocation is not None:
        if not alora_invocation_tokens:
            raise ValueError("peft.alora_invocation needs its tokens (tokenise it with the run's tokenizer)")
        kwargs["alora_invocation_tokens"] = list(alora_invocation_tokens)
    return kwargs


def _copy_indices(
    indices: list[int] | dict[str, list[int]] | None,
) -> list[int] | dict[str, list[int]] | None:
    if isinstance(indices, dict):
        return {name: list(ids) for name, ids in indices.items()}
    return list(indices) if indices else None


def describe_method(peft: PeftConfig, quantization: str = "none") -> str:
    """What is trained, in one line, for the run summary and the plan."""
    if peft.method == "full":
        return "full fine-tuning: every weight of the model"
    if peft.method == "freeze":
        n = peft.trainable_layers or 0
        parts = []
        if n:
            which = f"the last {n}" if n > 0 else f"the first {-n}"
            scope = f" ({', '.join(peft.trainable_modules)} only)" if peft.trainable_modules else ""
            parts.append(f"{which} decoder layer{'s' if abs(n) > 1 else ''}{scope}")
        if peft.extra_modules:
            parts.append(", ".join(peft.extra_modules))
        return f"partial fine-tuning (freeze): {' + '.join(parts)}; the rest frozen"
    method = {"lora": "LoRA", "dora": "DoRA"}[peft.method] + (" + rsLoRA" if peft.use_rslora else "")
    if quantization != "none":
        method = f"Q{method} ({quantization})"
    return "; ".join(
        [f"{method} r={peft.r} alpha={peft.alpha:g} targets={peft.target_modules}", *describe_variants(peft)]
    )


def describe_variants(peft: PeftConfig) -> list[str]:
    """One short phrase per LoRA variant the recipe turns on, for the run summary and the plan."""
    out = []
    if peft.init != "default":
        rho = f", rho {peft.eva_rho or EVA_DEFAULT_RHO:g}" if peft.init == "eva" else ""
        out.append(f"init {peft.init}{rho}")
    if peft.loraplus_lr_ratio is not None:
        out.append(f"LoRA+ (B at lr x {peft.loraplus_lr_ratio:g})")
    if peft.lora_fa:
        out.append("LoRA-FA (A frozen)")
    if peft.alora_invocation is not None:
        out.append(f"aLoRA from {peft.alora_invocation!r}")
    if peft.rank_pattern:
        out.append(f"ranks {peft.rank_pattern}")
    if peft.alpha_pattern:
        out.append(f"alphas {peft.alpha_pattern}")
    if peft.target_parameters:
        out.append(f"parameters {peft.target_parameters}")
    if peft.trainable_token_indices is not None:
        out.append(f"trainable tokens {peft.trainable_token_indices}")
    if peft.layer_replication:
        out.append(f"layers replicated {peft.layer_replication}")
    return out


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
    """Every listed module or parameter name must match one of the model, and every index or layer
    range must exist in it. PEFT matches a name when a module's full name is it or ends with `.` + it,
    and ignores a name that matches nothing as long as another one matches: a typo would silently train
    fewer layers. (The rank and alpha patterns are checked on the adapted model: `check_patterns`.)"""
    _check_target_parameters(model, peft.target_parameters)
    _check_token_indices(model, peft.trainable_token_indices)
    _check_layer_replication(model, peft.layer_replication)
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


def _check_target_parameters(model: Any, listed: list[str] | None) -> None:
    if not listed:
        return
    params = [name for name, _ in model.named_parameters()]
    missing = [k for k in listed if not any(n == k or n.endswith(f".{k}") for n in params)]
    if missing:
        raise RecipeError(
            f"peft.target_parameters: {', '.join(repr(m) for m in missing)} match{'es' if len(missing) == 1 else ''} "
            f"no parameter of {type(model).__name__}",
            "name parameters by (the end of) their full name; its matrices outside Linear layers are: "
            + (", ".join(_non_linear_matrices(model)) or "none"),
        )


def _non_linear_matrices(model: Any) -> list[str]:
    """Names (per decoder layer) of the model's matrix parameters that no Linear layer holds: what
    `target_parameters` is for (MoE experts) besides embeddings."""
    import torch

    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param.ndim >= 2:
                full = f"{module_name}.{param_name}"
                names.add(re.sub(r"^(.*\.)?layers\.\d+\.", "", full))
    return sorted(names)


def _check_token_indices(model: Any, indices: list[int] | dict[str, list[int]] | None) -> None:
    if indices is None:
        return
    if isinstance(indices, dict):
        modules = dict(model.named_modules())
        targets = {}
        for name, ids in indices.items():
            found = [m for n, m in modules.items() if n == name or n.endswith(f".{name}")]
            if not found:
                embeddings = [n for n, m in modules.items() if type(m).__name__ == "Embedding"]
                raise RecipeError(
                    f"peft.trainable_token_indices: {name!r} matches no module of {type(model).__name__}",
                    f"name its embedding module: {', '.join(embeddings)}",
                )
            targets[name] = (found[0], ids)
    else:
        targets = {"the input embedding": (model.get_input_embeddings(), indices)}
    for name, (module, ids) in targets.items():
        rows = getattr(module, "num_embeddings", None)
        if rows is None:
            raise RecipeError(
                f"peft.trainable_token_indices: {name!r} is a {type(module).__name__}, not a token embedding",
                "name an embedding module (e.g. embed_tokens)",
            )
        beyond = [i for i in ids if i >= rows]
        if beyond:
            raise RecipeError(
                f"peft.trainable_token_indices: token id(s) {beyond} are beyond {name}'s {rows} rows",
                f"use ids below {rows} (the tokenizer's ids; resize the embedding first for new tokens)",
            )


def _check_layer_replication(model: Any, ranges: list[list[int]] | None) -> None:
    if not ranges:
        return
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise RecipeError(
            f"peft.layer_replication: {type(model).__name__} has no `model.layers` list to replicate",
            "drop peft.layer_replication (PEFT replicates Llama-like decoder layers only)",
        )
    beyond = [pair for pair in ranges if pair[1] > len(layers)]
    if beyond:
        raise RecipeError(
            f"peft.layer_replication: {beyond} reach beyond the model's {len(layers)} layers (0..{len(layers) - 1})",
            f"end each range at {len(layers)} or below",
        )
    stacked = sum(end - start for start, end in ranges)
    if stacked < len(layers):  # PEFT builds the model from the ranges alone: the layers left out are gone
        missing = sorted(set(range(len(layers))) - {i for start, end in ranges for i in range(start, end)})
        raise RecipeError(
            f"peft.layer_replication: {ranges} stacks {stacked} layers, fewer than the model's {len(layers)}: layer(s) "
            f"{missing} would be dropped and a smaller model trained",
            f"cover every layer once, then add the copies: e.g. [[0, {len(layers)}], [{len(layers) - 1}, {len(layers)}]]",
        )


# ----------------------------------------------------------------------------- full and partial


def decoder_layers(model: Any) -> tuple[str, list[Any]]:
    """The model's decoder layers: (their list's full name, e.g. `model.layers`, and the layers).

    The list is the `nn.ModuleList` whose items are of a class in the model's `_no_split_modules`
    (transformers' name for "one decoder layer"), else the longest `nn.ModuleList`."""
    import torch

    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise RecipeError(
            f"peft.method=freeze: {type(model).__name__} has no list of decoder layers to choose from",
            "use peft.method=full, or peft.extra_modules to name what to train",
        )
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    named = [(n, m) for n, m in lists if type(m[0]).__name__ in layer_classes]
    name, found = max(named or lists, key=lambda item: len(item[1]))
    return name, list(found)


def _closest(missing: str, valid: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(missing, valid, n=3, cutoff=0.4)
    return f" (closest: {', '.join(close)})" if close else ""


def _submodule_names(module: Any) -> list[str]:
    """Relative names of a module's submodules (`mlp`, `mlp.up_proj`, `self_attn.q_proj`, ...)."""
    return [n for n, _ in module.named_modules() if n]


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith(f".{key}")


def trainable_parameters(model: Any, peft: PeftConfig) -> list[str]:
    """The full names of the parameters `peft.method` full/freeze trains, checked against the model:
    a layer count beyond its layers, or a module name that matches nothing, is refused with the valid
    ones (the closest first). The one selection rule: the run (`model.apply_method`) and the plan's
    counts both call it."""
    if peft.method == "full":
        return [n for n, _ in model.named_parameters()]
    layers_name, layers = decoder_layers(model)
    chosen: list[str] = []  # module prefixes whose parameters train
    n = peft.trainable_layers or 0
    if abs(n) > len(layers):
        raise RecipeError(
            f"peft.trainable_layers={n}: {type(model).__name__} has {len(layers)} decoder layers ({layers_name})",
            f"use a count from 1 to {len(layers)} (the last N) or -1 to -{len(layers)} (the first N)",
        )
    picked = range(len(layers) - n, len(layers)) if n > 0 else range(0, -n)
    inner = _submodule_names(layers[0])
    for key in peft.trainable_modules or []:
        if not any(_matches(m, key) for m in inner):
            raise RecipeError(
                f"peft.trainable_modules: {key!r} matches no submodule of a decoder layer "
                f"({type(layers[0]).__name__}){_closest(key, inner)}",
                f"name submodules of a layer: {', '.join(sorted({m.split('.')[0] for m in inner}))}, or their "
                f"parts (e.g. {', '.join([m for m in inner if '.' in m][:6])})",
            )
    for i in picked:
        prefix = f"{layers_name}.{i}"
        if not peft.trainable_modules:
            chosen.append(prefix)
            continue
        for m in inner:
            if any(_matches(m, key) for key in peft.trainable_modules):
                chosen.append(f"{prefix}.{m}")
    outside = [
        m
        for m, module in model.named_modules()
        if m
        and not m.startswith(f"{layers_name}.")
        and m != layers_name
        and any(True for _ in module.parameters())
    ]
    for key in peft.extra_modules or []:
        found = [m for m in outside if _matches(m, key)]
        if not found:
            top = sorted({m for m in outside if m.count(".") <= 1})
            raise RecipeError(
                f"peft.extra_modules: {key!r} matches no module outside the decoder layers{_closest(key, outside)}",
                f"name one of: {', '.join(top)}",
            )
        chosen += found
    # by identity: a tied output head (lm_head sharing embed_tokens' weight) is listed under one name
    ids = {id(param) for c in chosen for param in model.get_submodule(c).parameters()}
    return [n for n, param in model.named_parameters() if id(param) in ids]


def apply_selection(model: Any, peft: PeftConfig) -> int:
    """Set `requires_grad` for full/freeze (`trainable_parameters`); returns how many parameters train."""
    wanted = set(trainable_parameters(model, peft))
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_lora_a(peft_model: Any) -> None:
    """LoRA-FA trains B only: `create_lorafa_optimizer` freezes every parameter whose name holds
    `lora_A`. Done as soon as the adapter exists, so the counts (plan, run summary) show it."""
    for name, param in peft_model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)


def check_patterns(peft_model: Any, peft: PeftConfig) -> None:
    """Every rank/alpha regex must match an adapted module. PEFT keeps `r`/`alpha` for a module no
    regex matches, so a regex that matches nothing would silently change nothing."""
    from peft.tuners.lora import LoraLayer

    adapted = [
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    ]
    for key, patterns in (("rank_pattern", peft.rank_pattern), ("alpha_pattern", peft.alpha_pattern)):
        unmatched = [p for p in patterns or {} if not any(re.match(rf"(.*\.)?({p})$", n) for n in adapted)]
        if unmatched:
            shown = sorted({n.split(".", 2)[-1] if n.startswith("model.layers.") else n for n in adapted})
            raise RecipeError(
                f"peft.{key}: {', '.join(repr(p) for p in unmatched)} match{'es' if len(unmatched) == 1 else ''} "
                "no adapted module (PEFT matches a regex against the end of the module name)",
                f"match one of the adapted modules, e.g. layers\\.0\\.self_attn\\.q_proj; they are "
                f"(per layer): {', '.join(shown[:20])}",
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
    from tunefleet.launch.hf_compat import bnb_quantized_linears

    return sum(module.weight.numel() for module in bnb_quantized_linears(model))


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
    EVA can: with `peft.eva_rho` > 1 it moves rank between layers from the data, and these are the
    counts before it does (`tunefleet plan` says so; the run reports the real ones). LoRA-FA freezes
    every A matrix, as its optimizer does. A `quantization_config` in the config (gpt-oss ships
    MXFP4) is ignored by `from_config`.
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):  # the adapter too: no tensor is ever allocated
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            base = sum(p.numel() for p in model.parameters())
            quantized = _quantized_numel(model, quantization)
            if peft.method in WEIGHT_METHODS:  # the model's own weights: no adapter
                trainable = apply_selection(model, peft)
                return ParamCounts(trainable=trainable, total=base, base=base, adapter=0, quantized=quantized)
            check_module_names(model, peft)
            kwargs = lora_config_kwargs(peft, alora_invocation_tokens=[0] if peft.alora_invocation else None)
            kwargs["init_lora_weights"] = True
            kwargs.pop("loftq_config", None)
            kwargs.pop("eva_config", None)
            try:
                peft_model = get_peft_model(model, LoraConfig(**kwargs))
            except ValueError as exc:
                raise RecipeError(
                    f"peft: {exc}", "check peft.target_modules against the model's module names"
                ) from None
            check_patterns(peft_model, peft)
            if peft.lora_fa:
                freeze_lora_a(peft_model)
            trainable, total = peft_model.get_nb_trainable_parameters()
    return ParamCounts(trainable=trainable, total=total, base=base, adapter=total - base, quantized=quantized)


def count_params(
    model_config: str | Path | Mapping[str, Any], peft: PeftConfig, quantization: str = "none"
) -> tuple[int, int]:
    """(trainable, total) parameters, equal to PEFT's `get_nb_trainable_parameters()`."""
    counts = param_counts(model_config, peft, quantization)
    return counts.trainable, counts.total
