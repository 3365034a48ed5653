"""Padding-free micro batches (`batch.padding_free`): packed samples stay apart, losses equal the padded path.

Isolation is shown on tiny random models of every model type tunefleet allows to pack
(`compat.PADDING_FREE_MODEL_TYPES`): each sample's logits in a packed row (position_ids restarting
at every sample, no attention mask, no KV cache) equal its logits alone. The refusals are backed by
the same measurement: gpt-oss, and any model with its KV cache on, let packed samples see each other.
"""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch

from tunefleet.launch import compat
from tunefleet.launch.core import recipe as R
from tunefleet.launch.core.errors import RecipeError, TunefleetError
from tunefleet.launch.core.hardware import Hardware

DEMO = Path(str(resources.files("tunefleet.recipes"))) / "demo.yaml"
LENGTHS = (5, 9, 3, 12)
TOL = 1e-5


def tiny_model(model_type: str, attn: str, *, use_cache: bool = False, **extra: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(model_type, **settings)
        config.use_cache = use_cache
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def packed_vs_alone(model: Any, *, use_cache: bool = False) -> float:
    """Largest |logit difference| between each sample in one packed row and the sample alone."""
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, 128, (n,), generator=gen) for n in LENGTHS]
    with torch.no_grad():
        alone = [model(input_ids=s[None], use_cache=use_cache).logits[0] for s in samples]
        ids = torch.cat(samples)[None]
        positions = torch.cat([torch.arange(len(s)) for s in samples])[None]
        packed = model(input_ids=ids, position_ids=positions, use_cache=use_cache).logits[0]
    diffs, start = [], 0
    for s, logits in zip(samples, alone, strict=True):
        diffs.append(float((packed[start : start + len(s)] - logits).abs().max()))
        start += len(s)
    return max(diffs)


MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
EXTRA = {"mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2}, "qwen3_moe": MOE}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", compat.PADDING_FREE_MODEL_TYPES)
def test_every_allowed_model_type_keeps_packed_samples_apart(model_type: str, attn: str) -> None:
    assert packed_vs_alone(tiny_model(model_type, attn, **EXTRA.get(model_type, {}))) <= TOL


def test_what_is_refused_really_leaks() -> None:
    gpt_oss = tiny_model(
        "gpt_oss",
        "eager",
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    assert packed_vs_alone(gpt_oss) > 1e-2
    assert compat.padding_free_problem("gpt_oss", "eager") is not None
    # with the KV cache on, transformers builds no block mask: every sample sees the ones before it
    assert packed_vs_alone(tiny_model("llama", "sdpa", use_cache=True), use_cache=True) > 1e-2


def test_runtime_guard_refuses_a_leaking_setup() -> None:
    from tunefleet.distributed import guard

    recipe = R.load(DEMO, ["output_dir=x", "batch.padding_free=true"])
    guard.check_padding_free(tiny_model("llama", "sdpa"), recipe)
    with pytest.raises(TunefleetError, match="KV cache is on"):
        guard.check_padding_free(tiny_model("llama", "sdpa", use_cache=True), recipe)
    with pytest.raises(TunefleetError, match="model type 'gpt_oss'"):
        model = tiny_model("llama", "sdpa")
        model.config.model_type = "gpt_oss"  # what a gpt-oss checkpoint reports
        guard.check_padding_free(model, recipe)


def test_auto_picks_the_faster_path_and_says_so() -> None:
    recipe = R.load(DEMO, ["output_dir=x"])
    cpu, notes = compat.resolve_with_notes(recipe, Hardware(use_cpu=True))
    assert cpu.batch.padding_free is False
    assert any("batch.padding_free: auto -> false" in n and "slower" in n for n in notes)
    flash = R.load(
        DEMO, ["output_dir=x", "model.attn_implementation=flash_attention_2", "model.dtype=bfloat16"]
    )
    gpu, notes = compat.resolve_with_notes(flash, Hardware(use_cpu=False))
    assert gpu.batch.padding_free is True and any("auto -> true" in n for n in notes)
    forced, notes = compat.resolve_with_notes(
        R.load(DEMO, ["output_dir=x", "batch.padding_free=true"]), Hardware(use_cpu=True)
    )
    assert forced.batch.padding_free is True and any("costs more than padding" in n for n in notes)
    with pytest.raises(RecipeError, match="gpt_oss"):
        compat.resolve_with_notes(
            R.load(DEMO, ["output_dir=x", "batch.padding_free=true"]),
            Hardware(use_cpu=True),
            {"model_type": "gpt_oss"},
        )
    with pytest.raises(RecipeError, match="CUDA kernel"):
        compat.resolve_with_notes(flash, Hardware(use_cpu=True))
    with pytest.raises(RecipeError, match="Liger"):
        compat.resolve_with_notes(
            R.load(DEMO, ["output_dir=x", "train.liger_kernel=true"]), Hardware(use_cpu=True)
        )


def test_padding_free_loss_equals_the_padded_loss(tiny_model_dir: Path) -> None:
    """One micro batch of real demo examples: the token-loss sum and the label count are the same
    packed into one row as padded to the longest sample."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tunefleet.distributed import data as D

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [
        json.loads(line) for line in (DEMO.parent / "data" / "alpaca_demo.jsonl").read_text().splitlines()
    ]
    examples = [D.tokenize_example(r, fmt="alpaca", tokenizer=tokenizer, max_length=256) for r in rows[:6]]
    assert len({len(e["input_ids"]) for e in examples}) > 1
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model.config.use_cache = False

    def loss_sum(batch: dict[str, Any]) -> tuple[float, int]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits.double()
        labels = batch["labels"][..., 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[..., :-1, :].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        return float(loss), int((labels != -100).sum())

    pad = tokenizer.eos_token_id
    padded = loss_sum(DataCollatorForLanguageModeling(pad_token_id=pad)(examples))
    packed = loss_sum(DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(examples))
    assert packed[1] == padded[1]
    assert abs(packed[0] - padded[0]) <= 1e-6 * padded[0]
