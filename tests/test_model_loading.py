"""How the base model is loaded and prepared (distributed/model.py), shown on the tiny demo model.

- `adapter_dtype`: the one decision about the dtype of trainable parameters. TRL's SFTTrainer
  really casts QLoRA's LoRA A/B to bf16 and leaves DoRA's magnitude fp32 (checked here on a real
  trainer); `match_adapter_dtype` then gives every trainable parameter fp32, in every precision.
- Sharded QLoRA (fsdp-qlora, ZeRO-3) skips PEFT's `prepare_model_for_kbit_training`: the
  non-quantized weights stay in the model dtype (half the bytes of PEFT's fp32 copies), checkpointed
  layers still get gradients, and one FSDP1 unit holds a single dtype.
- `load_kwargs`: MXFP4 (gpt-oss) is placed on the rank's GPU when loading on GPUs.
- Plain FSDP2 on several processes: ranks other than 0 read no weights (meta device); that the
  broadcast from rank 0 then gives them the right weights is tests/test_launch.py's `fsdp` case
  (losses = one process).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch

from tunefleet.distributed import model as model_mod
from tunefleet.launch import compat
from tunefleet.launch.core import recipe as R
from tunefleet.launch.core.hardware import Hardware
from tunefleet.launch.loading import rank0_loads_weights

DEMO = Path(str(resources.files("tunefleet.recipes"))) / "demo.yaml"


def recipe(*overrides: str, processes: int = 1) -> R.Recipe:
    raw = R.load(DEMO, ["output_dir=/tmp/unused", "model.dtype=auto", *overrides])
    return compat.resolve(raw, Hardware(num_processes=processes, use_cpu=True))


def prepared(r: R.Recipe) -> Any:
    precision = model_mod.resolve_precision(r)
    base = model_mod.load_model(model_mod.resolve_model_path(r.model), r, precision)
    return model_mod.apply_peft(base, r)


def plain_weights(model: Any) -> dict[str, torch.Tensor]:
    """The frozen base weights that are not 4-bit: embeddings, norms, output head."""
    return {
        n: p for n, p in model.named_parameters() if not p.requires_grad and type(p).__name__ != "Params4bit"
    }


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_adapters_are_fp32_in_every_precision(precision: str, quantization: str) -> None:
    """fp16 needs fp32 adapters for the gradient scaler, bf16 QDoRA one dtype for FSDP2."""
    r = R.from_dict(
        {
            "output_dir": "o",
            "model": {"name_or_path": "m", "quantization": quantization},
            "data": {"path": "d"},
            "train": {"precision": precision},
        }
    )
    assert model_mod.adapter_dtype(r) == torch.float32


def test_unquantized_adapters_keep_peft_dtype() -> None:
    r = R.from_dict({"output_dir": "o", "model": {"name_or_path": "m"}, "data": {"path": "d"}})
    assert model_mod.adapter_dtype(r) is None


def test_trl_casts_qlora_adapters_and_match_adapter_dtype_unifies_them(tmp_path: Path) -> None:
    """bf16 QDoRA through TRL's SFTTrainer: LoRA A/B bf16 beside fp32 magnitudes (what FSDP2 refused,
    "expects uniform original parameter dtype"), then one dtype, fp32, for every trainable parameter."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    r = recipe("model.quantization=nf4", "peft.method=dora", "train.precision=bf16")
    model = prepared(r)
    args = SFTConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to="none", max_steps=1)
    tokenizer = model_mod.load_tokenizer(model_mod.resolve_model_path(r.model), r.model)
    data = Dataset.from_dict({"text": ["a short text", "another one"]})
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainable = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert {d for n, d in trainable.items() if "lora_magnitude_vector" in n} == {torch.float32}
    assert {d for n, d in trainable.items() if "lora_A" in n or "lora_B" in n} == {torch.bfloat16}

    model_mod.match_adapter_dtype(trainer.model, r)
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}


def test_sharded_qlora_keeps_the_model_dtype() -> None:
    """PEFT's k-bit preparation (ddp) casts embeddings, norms and head to fp32; sharded QLoRA keeps
    them bf16 (half the bytes), and one decoder layer's base tensors share one dtype (FSDP1's flat
    parameter needs that)."""
    common = ("model.quantization=nf4", "train.precision=bf16", "train.gradient_checkpointing=true")
    # the same 4-bit storage as sharded QLoRA's, so that only the preparation differs
    replicated = prepared(
        recipe("parallel.strategy=ddp", "model.quant_storage_dtype=bfloat16", *common, processes=2)
    )
    sharded = prepared(recipe("parallel.strategy=fsdp-qlora", *common, processes=2))

    rep, sha = plain_weights(replicated), plain_weights(sharded)
    assert sorted(rep) == sorted(sha) and rep
    assert {p.dtype for p in rep.values()} == {torch.float32}
    assert {p.dtype for p in sha.values()} == {torch.bfloat16}
    rep_bytes = sum(p.numel() * p.element_size() for p in rep.values())
    sha_bytes = sum(p.numel() * p.element_size() for p in sha.values())
    print(f"non-quantized base weights: k-bit prepared {rep_bytes:,} bytes, sharded QLoRA {sha_bytes:,}")
    assert rep_bytes == 2 * sha_bytes

    def layer_dtypes(model: Any) -> set[torch.dtype]:
        layer = model.base_model.model.model.layers[0]
        return {p.dtype for n, p in layer.named_parameters() if "lora_" not in n}

    assert layer_dtypes(replicated) == {torch.bfloat16, torch.float32}  # cannot be one FSDP1 flat parameter
    assert layer_dtypes(sharded) == {torch.bfloat16}

    # what training still needs from the preparation: a frozen base, and gradients flowing into
    # checkpointed layers (the embedding output requires grad)
    assert all(not p.requires_grad for n, p in sharded.named_parameters() if "lora_" not in n)
    ids = torch.tensor([[1, 5, 9]])
    assert sharded.get_input_embeddings()(ids).requires_grad


def test_zero3_qlora_is_sharded_too() -> None:
    r = recipe("parallel.strategy=deepspeed-zero3", "model.quantization=nf4", processes=2)
    assert compat.sharded_4bit(r.parallel.strategy, r.model.quantization)
    assert not compat.sharded_4bit("deepspeed-zero2", "nf4") and not compat.sharded_4bit("fsdp-qlora", "none")


@pytest.mark.parametrize(
    ("strategy", "use_cpu", "placed"),
    [
        ("single", False, True),
        ("ddp", False, True),
        ("deepspeed-zero2", False, True),
        ("fsdp", False, False),  # FSDP takes the model from the CPU and places its shards
        ("deepspeed-zero3", False, False),  # zero.Init; transformers refuses a device_map with it
        ("single", True, False),
    ],
)
def test_mxfp4_is_placed_on_the_ranks_gpu(strategy: str, use_cpu: bool, placed: bool) -> None:
    """gpt-oss: without a device_map transformers dequantizes MXFP4 on the CPU, on every rank."""
    r = R.from_dict(
        {
            "output_dir": "o",
            "model": {"name_or_path": "openai/gpt-oss-20b", "quantization": "mxfp4"},
            "data": {"path": "d"},
            "parallel": {"strategy": strategy},
        }
    )
    precision = model_mod.Precision(mode="bf16", dtype=torch.bfloat16, use_cpu=use_cpu)
    kwargs = model_mod.load_kwargs(r, precision, local_rank=3)
    assert type(kwargs["quantization_config"]).__name__ == "Mxfp4Config"
    assert kwargs["quantization_config"].dequantize is True
    assert kwargs.get("device_map") == ({"": 3} if placed else None)


def test_bitsandbytes_and_plain_models_get_no_device_map() -> None:
    """bitsandbytes places itself on the current CUDA device; the trainer moves plain models."""
    for quantization in ("none", "nf4"):
        r = recipe(f"model.quantization={quantization}")
        precision = model_mod.Precision(mode="bf16", dtype=torch.bfloat16, use_cpu=False)
        assert "device_map" not in model_mod.load_kwargs(r, precision, local_rank=1)


def test_under_fsdp2_only_rank_0_reads_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Launched with the FSDP config (accelerate's variables) and FSDP in effect (on CPU: cpu_fsdp)."""
    from tunefleet.distributed import cpu_fsdp

    r = recipe("parallel.strategy=fsdp", processes=2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    cpu_fsdp.enable()
    precision = model_mod.resolve_precision(r)
    path = model_mod.resolve_model_path(r.model)
    other = model_mod.load_model(path, r, precision, rank=1, world_size=2)
    assert {p.device.type for p in other.parameters()} == {"meta"}
    assert {b.device.type for b in other.buffers()} == {"cpu"}  # rotary tables are computed, not read
    first = model_mod.load_model(path, r, precision, rank=0, world_size=2)
    assert {p.device.type for p in first.parameters()} == {"cpu"}
    assert sorted(n for n, _ in first.named_parameters()) == sorted(n for n, _ in other.named_parameters())
    for (name, a), (_, b) in zip(first.named_buffers(), other.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    # launched without the FSDP config (torchrun by hand): accelerate would not broadcast, the
    # weights are read (and the start-up check then stops the run with a clear error)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    by_hand = model_mod.load_model(path, r, precision, rank=1, world_size=2)
    assert {p.device.type for p in by_hand.parameters()} == {"cpu"}
    # a 4-bit base, FSDP1 or one process: every rank loads
    for overrides, processes in (
        (("parallel.strategy=fsdp-qlora", "model.quantization=nf4"), 2),
        (("parallel.strategy=fsdp", "parallel.fsdp_version=1"), 2),
        (("parallel.strategy=fsdp",), 1),
    ):
        raw = R.load(DEMO, ["output_dir=/tmp/unused", "model.dtype=auto", *overrides])
        assert not rank0_loads_weights(raw, processes)
