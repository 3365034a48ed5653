"""Parameter counts (against PEFT), the memory model (against autograd) and `tunefleet plan`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tunefleet.launch.core import recipe as R
from tunefleet.launch.core.errors import RecipeError
from tunefleet.launch.core.recipe import PeftConfig
from tunefleet.launch.memory import (
    GIB,
    MemoryInputs,
    ModelShape,
    activation_bytes_per_token_per_layer,
    estimate_load_memory,
    estimate_memory,
)
from tunefleet.launch.params import LOFTQ_CONFIG, count_params, lora_config_kwargs, param_counts
from tunefleet.launch.plan import build_plan, render_plan
from tunefleet.launch.plan_inputs import count_dataset_rows, find_model_config, make_plan

FIXTURES = Path(__file__).parent / "fixtures" / "model_configs"
DEMO = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_llama_config(**overrides: object):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**settings, **overrides})


# ----------------------------------------------------------------------------- LoraConfig mapping


def test_lora_config_kwargs_maps_every_field() -> None:
    peft = PeftConfig(
        method="dora",
        use_rslora=True,
        init="gaussian",
        r=8,
        alpha=16,
        dropout=0.1,
        bias="lora_only",
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
    )
    assert lora_config_kwargs(peft) == {
        "task_type": "CAUSAL_LM",
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "bias": "lora_only",
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["lm_head"],
        "use_dora": True,
        "use_rslora": True,
        "init_lora_weights": "gaussian",
    }
    defaults = lora_config_kwargs(PeftConfig())
    assert defaults["init_lora_weights"] is True and defaults["target_modules"] == "all-linear"
    assert defaults["use_dora"] is False and defaults["modules_to_save"] is None
    assert {lora_config_kwargs(PeftConfig(init=i))["init_lora_weights"] for i in ("pissa", "olora")} == {
        "pissa",
        "olora",
    }
    loftq = lora_config_kwargs(PeftConfig(init="loftq"))
    assert loftq["init_lora_weights"] == "loftq" and loftq["loftq_config"] == LOFTQ_CONFIG


def test_lora_config_kwargs_are_accepted_by_peft() -> None:
    from peft import LoftQConfig, LoraConfig

    assert LOFTQ_CONFIG == vars(LoftQConfig())
    for peft in (PeftConfig(), PeftConfig(method="dora", init="pissa", modules_to_save=["embed_tokens"])):
        config = LoraConfig(**lora_config_kwargs(peft))
        assert (
            config.r == peft.r
            and config.lora_alpha == peft.alpha
            and config.use_dora == (peft.method == "dora")
        )


# ----------------------------------------------------------------------------- counts vs PEFT


@pytest.mark.parametrize(
    "peft",
    [
        PeftConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
        PeftConfig(r=16, alpha=32, target_modules="all-linear"),
        PeftConfig(r=4, method="dora", target_modules=ALL_PROJ),
        PeftConfig(r=8, bias="all", target_modules=["q_proj", "k_proj"]),
        PeftConfig(r=8, bias="lora_only", use_rslora=True, target_modules="all-linear"),
        PeftConfig(r=8, target_modules=["o_proj", "down_proj"], modules_to_save=["lm_head", "embed_tokens"]),
    ],
    ids=["qv", "all-linear", "dora", "bias-all", "lora-only-rslora", "modules-to-save"],
)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "attention-bias"])
def test_counts_equal_peft_on_a_real_model(peft: PeftConfig, bias: bool) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = _tiny_llama_config(attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)  # real CPU weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = get_peft_model(model, LoraConfig(**lora_config_kwargs(peft))).get_nb_trainable_parameters()
    assert count_params(config.to_dict(), peft) == real


def test_counts_equal_peft_on_a_4bit_model(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = _tiny_llama_config()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb, dtype=torch.bfloat16)
        packed = sum(p.numel() * 2 for p in model.parameters() if type(p).__name__ == "Params4bit")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        peft = PeftConfig(r=8, target_modules="all-linear")
        real = get_peft_model(model, LoraConfig(**lora_config_kwargs(peft))).get_nb_trainable_parameters()
    counts = param_counts(tmp_path, peft, "nf4")
    assert (counts.trainable, counts.total) == real
    assert counts.quantized == packed  # exactly the weights bitsandbytes quantizes


def _closed_form_lora(config: dict, r: int, targets: list[str]) -> int:
    """r x (in + out) per adapted projection per layer, from the config alone (independent of PEFT)."""
    h = config["hidden_size"]
    heads, kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads", config["num_attention_heads"]),
    )
    d = config.get("head_dim") or h // heads
    i = config["intermediate_size"]
    shapes = {
        "q_proj": (h, heads * d),
        "k_proj": (h, kv * d),
        "v_proj": (h, kv * d),
        "o_proj": (heads * d, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    return config["num_hidden_layers"] * sum(r * sum(shapes[t]) for t in targets)


PUBLISHED = {
    # fixture: (base params, r, alpha, targets, trainable, total) -- see fixtures/model_configs/README.md
    "qwen3-14b": (14_768_307_200, 16, 32, "all-linear", 64_225_280, 14_832_532_480),
    "qwen2.5-7b-instruct": (7_615_616_512, 16, 32, "all-linear", 40_370_176, 7_655_986_688),
    "llama-varco-8b-instruct": (8_030_261_248, 8, 32, ["q_proj", "v_proj"], 3_407_872, 8_033_669_120),
    # seed 000 lists all seven projections for gpt-oss and prints 7,962,624 trainable parameters: PEFT
    # silently ignored gate/up/down, which gpt-oss's experts do not have; tunefleet refuses that list
    "gpt-oss-20b": (20_914_757_184, 16, 32, ALL_PROJ[:4], 7_962_624, 20_922_719_808),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_fixture_models_on_the_meta_device(name: str) -> None:
    base, r, alpha, targets, trainable, total = PUBLISHED[name]
    config = json.loads((FIXTURES / name / "config.json").read_text())
    counts = param_counts(FIXTURES / name, PeftConfig(r=r, alpha=alpha, target_modules=targets))
    assert (counts.base, counts.trainable, counts.total) == (base, trainable, total)
    if config["model_type"] != "gpt_oss":  # its experts are not nn.Linear: LoRA reaches attention only
        names = ALL_PROJ if targets == "all-linear" else targets
        assert counts.trainable == _closed_form_lora(config, r, names)
    # all-linear = the seven projections on these architectures (the four attention ones on gpt-oss)
    linear = ALL_PROJ[:4] if config["model_type"] == "gpt_oss" else ALL_PROJ
    assert (
        count_params(config, PeftConfig(r=r, alpha=alpha, target_modules="all-linear"))[0]
        == count_params(config, PeftConfig(r=r, alpha=alpha, target_modules=linear))[0]
    )
    if config["model_type"] == "gpt_oss":
        with pytest.raises(RecipeError, match="'gate_proj', 'up_proj', 'down_proj' match no module"):
            param_counts(FIXTURES / name, PeftConfig(r=r, alpha=alpha, target_modules=ALL_PROJ))


def test_quantized_parameter_counts() -> None:
    qwen = param_counts(FIXTURES / "qwen3-14b", PeftConfig(target_modules=ALL_PROJ), "nf4")
    config = json.loads((FIXTURES / "qwen3-14b" / "config.json").read_text())
    embed = config["vocab_size"] * config["hidden_size"]
    h, d = config["hidden_size"], config["head_dim"]
    norms = config["num_hidden_layers"] * (2 * h + 2 * d) + h  # 2 norms + q/k norms per layer, final norm
    assert qwen.quantized == qwen.base - 2 * embed - norms  # every projection; not embeddings, head, norms
    oss = param_counts(FIXTURES / "gpt-oss-20b", PeftConfig(target_modules=ALL_PROJ[:4]), "mxfp4")
    assert oss.quantized == 24 * 32 * (2880 * 2 * 2880 + 2880 * 2880)  # the expert matrices only


def test_gpt_oss_fixture_keeps_its_mxfp4_quantization_config() -> None:
    config = json.loads((FIXTURES / "gpt-oss-20b" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert config["num_local_experts"] == 32 and config["num_experts_per_tok"] == 4


def test_unknown_target_modules_are_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="peft"):
        count_params(_tiny_llama_config().to_dict(), PeftConfig(target_modules=["c_attn"]))


# ----------------------------------------------------------------------------- memory model


def _saved_activation_bytes(layers: int, *, attn: str, dropout: float, targets, mixed: bool) -> int:
    """Bytes autograd keeps for backward (parameters and their casts excluded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _tiny_llama_config(num_hidden_layers=layers, hidden_size=128, intermediate_size=352)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.bfloat16 if mixed else torch.float32, attn_implementation=attn
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            model,
            LoraConfig(
                r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"
            ),
        )
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and tuple(t.shape) not in shapes:  # not a weight (or its cast)
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (2, 50))  # 100 tokens: no activation looks like a weight
    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        out = model(input_ids=ids, labels=ids)
    del out
    return sum(seen.values())


@pytest.mark.parametrize(
    ("attn", "dropout", "targets", "mixed"),
    [
        ("sdpa", 0.05, "all-linear", True),
        ("sdpa", 0.0, "all-linear", True),
        ("sdpa", 0.0, ["q_proj", "v_proj"], True),
        ("sdpa", 0.1, ["o_proj", "down_proj"], False),
        ("sdpa", 0.0, "all-linear", False),
        ("eager", 0.05, "all-linear", True),
        ("eager", 0.0, ["q_proj", "v_proj"], False),
    ],
)
def test_activation_formula_matches_autograd(attn: str, dropout: float, targets, mixed: bool) -> None:
    per_layer = _saved_activation_bytes(
        3, attn=attn, dropout=dropout, targets=targets, mixed=mixed
    ) - _saved_activation_bytes(2, attn=attn, dropout=dropout, targets=targets, mixed=mixed)
    shape = ModelShape(
        hidden_size=128,
        num_layers=1,
        num_attention_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=352,
        vocab_size=320,
    )
    predicted = activation_bytes_per_token_per_layer(
        shape,
        seq_len=50,
        compute_bytes=2 if mixed else 4,
        mixed_precision=mixed,
        lora_targets=targets,
        lora_rank=8,
        lora_dropout=dropout,
        attn_implementation=attn,
        dropout_mask_bytes=4,  # CPU dropout keeps its mask in the input dtype (fp32 adapter input); CUDA: bool
    )
    assert per_layer == predicted * 100


QWEN3 = ModelShape.from_config(json.loads((FIXTURES / "qwen3-14b" / "config.json").read_text()))
COMMON = dict(
    shape=QWEN3,
    base_params=14_768_307_200,
    adapter_params=64_225_280,
    trainable_params=64_225_280,
    quantized_params=0,
    quantization="none",
    precision="bf16",
    weight_bytes=2,
    world_size=8,
    micro_batch_size=2,
    max_length=2048,
    gradient_checkpointing=True,
    optimizer="adamw_torch",
    lora_targets="all-linear",
    lora_rank=16,
    lora_dropout=0.05,
)


def _parts(**kwargs: object) -> dict[str, int]:
    return {p.name: p.bytes for p in estimate_memory(MemoryInputs(**{**COMMON, **kwargs})).parts}


def test_memory_sharding_and_offload() -> None:
    ddp, fsdp, zero2 = _parts(strategy="ddp"), _parts(strategy="fsdp"), _parts(strategy="deepspeed-zero2")
    assert ddp["base weights"] == 14_768_307_200 * 2
    assert fsdp["base weights"] == 14_768_307_200 * 2 // 8
    assert zero2["base weights"] == ddp["base weights"]  # ZeRO-2 keeps whole weights
    assert ddp["gradients"] == 64_225_280 * 4 and fsdp["gradients"] == 64_225_280 * 4 // 8
    assert zero2["optimizer state"] == 64_225_280 * 8 // 8 and ddp["optimizer state"] == 64_225_280 * 8
    assert zero2["fp32 master weights"] == 64_225_280 * 4 // 8 and "fp32 master weights" not in ddp
    assert "gathered layer" in fsdp and "gathered layer" not in ddp
    assert ddp["activations"] == fsdp["activations"]  # data parallel: activations are never sharded
    offload = _parts(strategy="deepspeed-zero3", offload_params=True, offload_optimizer=True)
    assert offload["base weights"] == 0 and offload["optimizer state"] == 0
    with pytest.raises(RecipeError, match="parameter offload"):
        _parts(strategy="ddp", offload_params=True)


def test_zero3_windows_in_the_estimate() -> None:
    """DeepSpeed's default window keeps ~5e8 parameters gathered from forward to backward; a window
    of 1e8 keeps 5e7. The optimizer step works on a sub-group with its fp32 gradient and AdamW's
    temporaries (12 bytes an element on CPU): counted where that is more than forward and backward
    held, and sub_group_size bounds it."""
    full = dict(strategy="deepspeed-zero3", method="full", trainable_params=14_768_307_200, adapter_params=0)
    default, window = _parts(**full), _parts(**full, zero3_gathered_params=100_000_000)
    assert default["gathered parameters"] - window["gathered parameters"] == 450_000_000 * 2
    assert "optimizer step" not in default  # GPU, foreach AdamW: 8 bytes x 1e9 < what backward held
    shape = QWEN3
    per_layer = (14_768_307_200 - 2 * shape.vocab_size * shape.hidden_size) / shape.num_layers
    wide = dict(full, zero3_gathered_params=10**11)  # a window wider than the model: what backward uses stays
    assert _parts(**wide)["gathered parameters"] == math.ceil((14_768_307_200 + per_layer) * 2)
    freeze = _parts(**dict(wide, method="freeze", trained_layers=2, backward_layers=2))
    kept = int(per_layer * 2 + shape.vocab_size * shape.hidden_size)  # the backward's layers and the head
    assert freeze["gathered parameters"] == math.ceil((kept + per_layer) * 2)

    cpu = dict(full, precision="fp32", weight_bytes=4, device="cpu", micro_batch_size=1, max_length=128)
    held = sum(
        v
        for k, v in _parts(**cpu).items()
        if k in ("activations", "logits and loss", "gathered parameters", "gradient buckets")
    )
    assert _parts(**cpu)["optimizer step"] == 1_000_000_000 * 12 - held  # a 1e9 sub-group (the default)
    small = _parts(**cpu, zero3_sub_group_size=10_000_000, zero3_gathered_params=0)
    assert "optimizer step" not in small  # 1.2e8 bytes: less than forward and backward held


def test_memory_quantization_checkpointing_optimizer() -> None:
    nf4 = _parts(strategy="single", quantization="nf4", quantized_params=13_212_057_600)
    rest = 14_768_307_200 - 13_212_057_600
    assert nf4["base weights"] == pytest.approx(
        13_212_057_600 * 4.127 / 8 + rest * 4, rel=1e-3
    )  # kbit: rest fp32
    plain = _parts(strategy="single", gradient_checkpointing=False)
    ckpt = _parts(strategy="single")
    assert ckpt["activations"] < plain["activations"] / 10
    assert plain["activations"] == 2 * 2048 * 40 * activation_bytes_per_token_per_layer(
        QWEN3,
        seq_len=2048,
        compute_bytes=2,
        mixed_precision=True,
        lora_targets="all-linear",
        lora_rank=16,
        lora_dropout=0.05,
    )
    assert _parts(strategy="single", optimizer="paged_adamw_8bit")["optimizer state"] == 64_225_280 * 2
    total = estimate_memory(MemoryInputs(**{**COMMON, "strategy": "single"}))
    assert total.total_bytes == sum(ckpt.values())
    assert total.to_dict()["total_gib"] == round(total.total_bytes / GIB, 2)


def test_sharded_qlora_keeps_plain_weights_in_the_model_dtype() -> None:
    """fsdp-qlora and ZeRO-3 skip PEFT's k-bit preparation (distributed/model.py): embeddings, norms
    and head stay 2-byte; a replicated QLoRA base has them in fp32."""
    quantized, rest = 13_212_057_600, 14_768_307_200 - 13_212_057_600
    common = dict(quantization="nf4", quantized_params=quantized)
    for strategy in ("fsdp-qlora", "deepspeed-zero3"):
        assert _parts(strategy=strategy, **common)["base weights"] == pytest.approx(
            (quantized * 4.127 / 8 + rest * 2) / 8, rel=1e-3
        )
    assert _parts(strategy="ddp", **common)["base weights"] == pytest.approx(
        quantized * 4.127 / 8 + rest * 4, rel=1e-3
    )


def _load(**kwargs: object) -> tuple[dict[str, int], dict[str, int]]:
    est = estimate_load_memory(MemoryInputs(**{**COMMON, "procs_per_node": 8, **kwargs}))
    return {p.name: p.bytes for p in est.gpu.parts}, {p.name: p.bytes for p in est.host_per_node.parts}


def test_memory_at_load() -> None:
    full_bf16 = 14_768_307_200 * 2
    embedding = QWEN3.vocab_size * QWEN3.hidden_size * 2
    # bitsandbytes: the whole quantized model on every GPU, whatever shards it afterwards
    quantized, rest = 13_212_057_600, 14_768_307_200 - 13_212_057_600
    gpu, host = _load(strategy="fsdp-qlora", quantization="nf4", quantized_params=quantized)
    assert gpu["base weights at load"] == pytest.approx(quantized * 4.127 / 8 + rest * 2, rel=1e-3)
    assert host == {"checkpoint tensors in flight": 8 * embedding}
    # replicated QLoRA: PEFT's fp32 copies are made on the GPU right after loading
    gpu, _ = _load(strategy="ddp", quantization="nf4", quantized_params=quantized)
    assert gpu["base weights at load"] == pytest.approx(quantized * 4.127 / 8 + rest * 4, rel=1e-3)
    # plain FSDP2: rank 0 reads, the others receive their shards (one copy per node, not 8)
    gpu, host = _load(strategy="fsdp", rank0_loads_weights=True)
    assert gpu["base weights at load"] == full_bf16 // 8 and gpu["tensor in flight"] == embedding
    assert host == {"base weights (rank 0)": full_bf16}
    # without it (FSDP1), and for ddp, every rank reads the whole checkpoint into host RAM
    _, host = _load(strategy="fsdp")
    assert host == {"base weights": 8 * full_bf16}
    gpu, host = _load(strategy="ddp")
    assert gpu["base weights at load"] == full_bf16 and host == {"base weights": 8 * full_bf16}
    # MXFP4 loaded onto the GPU (device_map): only tensors in flight in host RAM
    _, host = _load(strategy="ddp", placed_on_gpu_at_load=True)
    assert host == {"checkpoint tensors in flight": 8 * embedding}


# ----------------------------------------------------------------------------- the plan


def _recipe(**sections: dict) -> R.Recipe:
    raw = {
        "output_dir": "runs/x",
        "model": {"name_or_path": "Qwen/Qwen3-14B", "quantization": "nf4"},
        "peft": {"target_modules": ALL_PROJ},
        "data": {"path": "d.jsonl", "max_length": 1024},
        "train": {
            "epochs": 3,
            "lr": 2e-4,
            "warmup_ratio": 0.03,
            "precision": "bf16",
            "gradient_checkpointing": True,
            "optimizer": "paged_adamw_8bit",
        },
        "batch": {"micro_batch_size": 4, "global_batch_size": 16},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return R.from_dict(raw)


QWEN3_CONFIG = json.loads((FIXTURES / "qwen3-14b" / "config.json").read_text())


def test_plan_json_has_the_contract_keys() -> None:
    plan = build_plan(_recipe(), dataset_rows=1000, model_config=QWEN3_CONFIG, recipe_path="r.yaml")
    json.dumps(plan)  # serialisable as it is
    expected = {
        "world_size": 1,
        "micro_batch_size": 4,
        "grad_accum_steps": 4,
        "global_batch_size": 16,
        "steps_per_epoch": 62,
        "total_steps": 186,
        "warmup_steps": 6,
        "trainable_params": 64_225_280,
        "total_params": 14_832_532_480,
        "dropped_rows_per_epoch": 8,
        "global_batch_tokens": 16 * 1024,
    }
    assert {k: plan[k] for k in expected} == expected
    assert [p for p, _ in plan["lr_schedule"]["points"]] == [0, 6, 46, 93, 139, 185]
    assert plan["memory"]["total_bytes"] > 0 and plan["launch_commands"] == ["tunefleet train r.yaml"]
    text = render_plan(plan)
    assert "micro 4 x accumulation 4 x world 1 = global 16 samples/step" in text
    assert "64,225,280 trainable of 14,832,532,480" in text and "62 steps/epoch" in text


def test_plan_on_several_nodes() -> None:
    plan = build_plan(
        _recipe(batch={"micro_batch_size": 1, "global_batch_size": 64}, parallel={"strategy": "ddp"}),
        nodes=2,
        procs_per_node=4,
        dataset_rows=1000,
        model_config=None,
        recipe_path="r.yaml",
        overrides=["train.max_steps=10"],
    )
    assert (plan["world_size"], plan["grad_accum_steps"], plan["trainable_params"]) == (8, 8, None)
    assert len(plan["launch_commands"]) == 2
    # `tunefleet launch` on each machine, through the one per-node option builder
    assert plan["launch_commands"][1] == (
        'tunefleet launch r.yaml --nnodes 2 --gpus 4 --node-rank 1 --main-address "$MAIN_ADDRESS" '
        "--main-port 29500 --set train.max_steps=10"
    )
    assert "--node-rank 0 " in plan["launch_commands"][0]
    with pytest.raises(RecipeError, match="nearest valid global batches: 48, 72"):
        build_plan(
            _recipe(batch={"micro_batch_size": 4, "global_batch_size": 64}),
            nodes=3,
            procs_per_node=2,
            dataset_rows=1000,
            model_config=None,
        )


def test_plan_warnings() -> None:
    plan = build_plan(
        _recipe(batch={"micro_batch_size": 1, "global_batch_size": 128}, train={"lr_scheduler": "constant"}),
        nodes=1,
        procs_per_node=1,
        dataset_rows=1000,
        model_config=None,
        previous_batch={"global_batch_size": 64},
    )
    text = " | ".join(plan["warnings"])
    assert "128 accumulation steps (> 64)" in text
    assert "constant has no warm-up" in text
    assert "started with a global batch of 64" in text
    same = build_plan(
        _recipe(), dataset_rows=1000, model_config=None, previous_batch={"global_batch_size": 16}
    )
    assert same["warnings"] == []
    plan = build_plan(
        _recipe(parallel={"strategy": "single"}),
        nodes=2,
        procs_per_node=2,
        dataset_rows=None,
        model_config=None,
    )
    assert (
        "refused at launch: parallel.strategy: `single` runs one process, but 4 were asked for"
        in " ".join(plan["warnings"])
    )
    plan = build_plan(_recipe(), nodes=2, procs_per_node=2, dataset_rows=None, model_config=None)
    assert plan["strategy"] == "ddp" and plan["strategy_asked"] == "auto" and plan["warnings"] == []
    assert "parallel.strategy: auto -> ddp (4 processes)" in plan["notes"]
    assert plan["batching"] == {"group_by_length": True, "padding_free": False}  # auto: sdpa is faster padded
    assert plan["steps_per_epoch"] is None and plan["total_steps"] is None
    plan = build_plan(
        _recipe(train={"max_steps": 5}), dataset_rows=None, model_config=QWEN3_CONFIG, gpu_memory_gib=8
    )
    assert (plan["total_steps"], plan["warmup_steps"]) == (5, 1)
    assert any("only 5 optimizer steps" in w for w in plan["warnings"])
    assert any("exceeds 8 GiB" in w for w in plan["warnings"])
    assert any("the model cannot load" in w for w in plan["warnings"])  # 9.2 GiB of nf4 Qwen3-14B


def test_plan_shows_memory_at_load() -> None:
    """FSDP-QLoRA shards in training but loads the whole 4-bit model on every GPU first."""
    recipe = _recipe(parallel={"strategy": "fsdp-qlora"}, train={"optimizer": "adamw_torch"})
    plan = build_plan(recipe, procs_per_node=4, model_config=QWEN3_CONFIG, gpu_memory_gib=9)
    load, train = plan["load_memory"], plan["memory"]
    assert load["gpu"]["total_bytes"] > 9 * GIB > train["total_bytes"] - 4 * GIB
    assert any("the model cannot load (bitsandbytes loads the whole" in w for w in plan["warnings"])
    text = render_plan(plan)
    assert "at load / GPU" in text and "at load / node RAM" in text and "in training (estimate)" in text
    plain = build_plan(
        _recipe(model={"quantization": "none"}, parallel={"strategy": "fsdp"}),
        procs_per_node=4,
        model_config=QWEN3_CONFIG,
    )
    host = plain["load_memory"]["host_per_node"]
    assert [p["name"] for p in host["parts"]] == ["base weights (rank 0)"]


def test_count_dataset_rows(tmp_path: Path) -> None:
    cfg = R.DataConfig
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n{"x": 3}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"x": i} for i in range(7)]))
    assert count_dataset_rows(cfg(path=str(tmp_path / "a.jsonl"))) == (3, None)
    assert count_dataset_rows(cfg(path=str(tmp_path / "b.json"))) == (7, None)
    assert count_dataset_rows(cfg(path="a.jsonl"), base_dir=tmp_path) == (3, None)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": list(range(11))}), tmp_path / "c.parquet")
    assert count_dataset_rows(cfg(path=str(tmp_path / "c.parquet"))) == (11, None)
    rows, why = count_dataset_rows(cfg(path="tatsu-lab/alpaca"))
    assert rows is None and "Hub dataset" in why
    rows, why = count_dataset_rows(cfg(path=str(tmp_path / "missing.jsonl")))
    assert rows is None and "does not exist" in why


def test_find_model_config_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    assert find_model_config(R.ModelConfig(name_or_path=str(FIXTURES / "qwen3-14b"))) == QWEN3_CONFIG
    with pytest.raises(RecipeError, match="without a config.json"):
        find_model_config(R.ModelConfig(name_or_path=str(tmp_path)))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(RecipeError, match="not available offline"):
        find_model_config(R.ModelConfig(name_or_path="Qwen/Qwen3-14B"))
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3-14B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(QWEN3_CONFIG))
    (tmp_path / "hub" / "models--Qwen--Qwen3-14B" / "refs").mkdir()
    (tmp_path / "hub" / "models--Qwen--Qwen3-14B" / "refs" / "main").write_text("abc123")
    assert find_model_config(R.ModelConfig(name_or_path="Qwen/Qwen3-14B")) == QWEN3_CONFIG


def test_make_plan_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"instruction": "i", "output": "o"}) + "\n" for _ in range(100))
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps(
            {
                "output_dir": str(tmp_path / "out"),
                "model": {"name_or_path": "Qwen/Qwen3-14B", "quantization": "nf4"},
                "data": {"path": "train.jsonl", "eval_ratio": 0.1, "max_length": 512},
                "train": {"precision": "bf16"},
                "batch": {"micro_batch_size": 2, "global_batch_size": 8},
            }
        )
    )
    plan = make_plan(
        str(recipe),
        ["train.epochs=2"],
        nodes=1,
        gpus_per_node=2,
        model_config_path=str(FIXTURES / "qwen3-14b"),
    )
    assert (plan["source_rows"], plan["dataset_rows"], plan["eval_rows"]) == (100, 90, 10)
    assert (plan["grad_accum_steps"], plan["steps_per_epoch"], plan["total_steps"]) == (2, 11, 22)
    assert plan["trainable_params"] == 64_225_280
    no_config = make_plan(str(recipe), nodes=1, gpus_per_node=1)  # not in the (empty) cache
    assert no_config["trainable_params"] is None
    assert any("not available offline" in n for n in no_config["notes"])


def test_plan_modules_import_without_torch() -> None:
    code = (
        "import sys, tunefleet.launch.plan, tunefleet.launch.params, tunefleet.launch.memory; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_values_that_run_but_are_not_meant_are_warned_about() -> None:
    """lr 30 and a max_length beyond the model's context used to pass without a word."""
    plan = build_plan(
        _recipe(train={"lr": 30}, data={"path": "d.jsonl", "max_length": 65536}),
        dataset_rows=1000,
        model_config=QWEN3_CONFIG,
    )
    text = " | ".join(plan["warnings"])
    assert "train.lr=30 is far above" in text
    assert (
        f"data.max_length=65536 is beyond the model's context of {QWEN3_CONFIG['max_position_embeddings']:,}"
        in text
    )
    quiet = build_plan(_recipe(), dataset_rows=1000, model_config=QWEN3_CONFIG)
    assert not any("train.lr" in w or "context" in w for w in quiet["warnings"])


def test_library_noise_is_silenced(capfd: pytest.CaptureFixture[str]) -> None:
    """bitsandbytes' kernel-download line and the libraries' deprecation warnings do not reach the user."""
    import logging
    import warnings

    from tunefleet.launch.core.noise import quiet_libraries

    with warnings.catch_warnings(record=True) as caught:
        quiet_libraries()
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
        warnings.warn_explicit(
            "all_gather_into_tensor is deprecated",
            FutureWarning,
            "c10d_logger.py",
            83,
            module="torch.distributed",
        )
        warnings.warn_explicit("a real problem", UserWarning, "x.py", 1, module="tunefleet.launch.plan")
    assert "gemm_4bit_forward" not in capfd.readouterr().err
    assert [str(w.message) for w in caught] == ["a real problem"]  # real warnings still reach the user


# ----------------------------------------------------------------------------- the LoRA variants (seed 003)


def _tiny_gpt_oss_config():
    """A gpt-oss small enough to build for real: its MoE experts are 3-D parameters, not Linear layers."""
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=32,
        tie_word_embeddings=False,
    )


VARIANTS = {
    "rank-alpha-pattern": PeftConfig(
        r=8, rank_pattern={r"layers\.0\.self_attn\.q_proj": 4, "down_proj": 2}, alpha_pattern={"down_proj": 8}
    ),
    "layer-replication": PeftConfig(
        r=8, target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 2]]
    ),
    "trainable-tokens": PeftConfig(r=8, target_modules=["q_proj"], trainable_token_indices=[5, 10, 300]),
    "trainable-tokens-by-module": PeftConfig(
        r=8, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2]}
    ),
    "alora": PeftConfig(r=8, alora_invocation="x"),
    "lora-fa": PeftConfig(r=8, lora_fa=True),
    "eva-rho-1": PeftConfig(r=8, init="eva", eva_rho=1.0),
    "target-parameters": PeftConfig(
        r=4,
        dropout=0.0,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    ),
    "experts-only": PeftConfig(
        r=4, dropout=0.0, target_modules=[], target_parameters=["mlp.experts.down_proj"]
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_counts_equal_peft_on_a_real_model(name: str) -> None:
    """What PEFT itself reports for the adapter a run builds (LoRA-FA: after its optimizer froze A)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_lorafa_optimizer
    from transformers import AutoModelForCausalLM

    peft = VARIANTS[name]
    config = _tiny_gpt_oss_config() if peft.target_parameters else _tiny_llama_config()
    counts = param_counts(config.to_dict(), peft)  # first: layer replication changes the config in place
    plain = param_counts(
        config.to_dict(), PeftConfig(r=peft.r, target_modules=peft.target_modules or ["q_proj"])
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    kwargs = lora_config_kwargs(peft, alora_invocation_tokens=[7, 8] if peft.alora_invocation else None)
    kwargs.pop("eva_config", None)  # EVA's weights need data; the shapes (rho 1) are those of its config
    kwargs["init_lora_weights"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = get_peft_model(model, LoraConfig(**kwargs))
        if peft.lora_fa:
            create_lorafa_optimizer(real, r=peft.r, lora_alpha=peft.alpha, lr=1e-3)
    assert (counts.trainable, counts.total) == real.get_nb_trainable_parameters()
    if name == "lora-fa":  # B only: half of a square-ish adapter, and exactly the lora_B elements
        assert counts.trainable == sum(p.numel() for n, p in real.named_parameters() if "lora_B" in n)
    elif name in ("alora", "eva-rho-1"):
        assert counts.trainable == plain.trainable  # same shapes as plain LoRA
    else:
        assert counts.trainable != plain.trainable


def test_rank_pattern_count_by_hand() -> None:
    """r x (in + out) per adapted projection, with the pattern's ranks (independent of PEFT)."""
    config = _tiny_llama_config().to_dict()
    peft = PeftConfig(
        r=8,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={r"layers\.0\.self_attn\.q_proj": 4, "down_proj": 2},
    )
    h, i = config["hidden_size"], config["intermediate_size"]
    q = h + config["num_attention_heads"] * (h // config["num_attention_heads"])
    want = (4 * q + 8 * q) + 2 * (2 * (i + h))  # q_proj: layer 0 at 4, layer 1 at 8; down_proj at 2 in both
    assert param_counts(config, peft).trainable == want


@pytest.mark.parametrize(
    ("peft", "fragment"),
    [
        (PeftConfig(rank_pattern={"mlp": 4}), "'mlp' matches no adapted module"),
        (
            PeftConfig(target_modules=["q_proj"], alpha_pattern={"down_proj": 4}),
            "'down_proj' matches no adapted",
        ),
        (PeftConfig(dropout=0.0, target_parameters=["mlp.experts.gate_up_proj"]), "matches no parameter"),
        (PeftConfig(trainable_token_indices=[320]), "beyond the input embedding's 320 rows"),
        (PeftConfig(trainable_token_indices={"wte": [1]}), "'wte' matches no module"),
        (PeftConfig(trainable_token_indices={"q_proj": [1]}), "not a token embedding"),
        (PeftConfig(layer_replication=[[0, 3]]), "beyond the model's 2 layers"),
    ],
)
def test_variant_names_and_ranges_must_exist_in_the_model(peft: PeftConfig, fragment: str) -> None:
    """PEFT silently ignores a regex or parameter name that matches nothing (as long as another one
    matches): tunefleet refuses it, naming what the model has."""
    with pytest.raises(RecipeError) as err:
        param_counts(_tiny_llama_config().to_dict(), peft)
    assert fragment in str(err.value)


def test_unknown_target_parameter_names_the_model_matrices() -> None:
    peft = PeftConfig(
        dropout=0.0,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.up_proj"],
    )
    with pytest.raises(RecipeError) as err:
        param_counts(_tiny_gpt_oss_config().to_dict(), peft)
    assert "'mlp.experts.up_proj' matches no parameter" in str(err.value)
    assert "mlp.experts.down_proj" in err.value.fix and "mlp.experts.gate_up_proj" in err.value.fix


def test_gpt_oss_experts_on_the_meta_device() -> None:
    """Seed 000's gpt-oss-20b: attention as the seed trained it, plus the MoE experts it meant to (r x experts rank)."""
    attention = param_counts(FIXTURES / "gpt-oss-20b", PeftConfig(r=16, target_modules=ALL_PROJ[:4]))
    experts = param_counts(
        FIXTURES / "gpt-oss-20b",
        PeftConfig(
            r=16,
            dropout=0.0,
            target_modules=ALL_PROJ[:4],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
    )
    config = json.loads((FIXTURES / "gpt-oss-20b" / "config.json").read_text())
    h, i, e, layers = config["hidden_size"], config["intermediate_size"], config["num_local_experts"], 24
    per_layer = 16 * e * (h + 2 * i) + 16 * e * (i + h)  # gate_up: in h -> out 2i; down: in i -> out h
    assert attention.trainable == 7_962_624  # seed 000's printed count
    assert experts.trainable - attention.trainable == layers * per_layer


# ----------------------------------------------------------------------------- method x strategy (--compare)

LLAMA_8B = FIXTURES / "llama-3.1-8b" / "config.json"


def _llama_recipe(tmp_path: Path, *sets: str) -> R.Recipe:
    """A typical SFT recipe of Llama-3.1-8B: micro batch 4 x 2048 tokens, checkpointing, bf16."""
    return R.load(
        DEMO,
        [
            f"output_dir={tmp_path / 'run'}",
            "model.name_or_path=meta-llama/Llama-3.1-8B",
            "model.dtype=auto",
            "data.max_length=2048",
            "batch.micro_batch_size=4",
            "batch.global_batch_size=32",
            "train.gradient_checkpointing=true",
            "train.precision=bf16",
            "peft.r=16",
            "peft.alpha=32",
            *sets,
        ],
    )


def test_compare_recommends_qlora_on_one_24gb_gpu_and_full_with_sharding_on_8x80(tmp_path: Path) -> None:
    from tunefleet.launch.plan_inputs import compare_rows

    config = json.loads(LLAMA_8B.read_text())
    recipe = _llama_recipe(tmp_path)
    small = compare_rows(recipe, config, 1, 1, 24.0)
    pick = small["rows"][small["recommended"]]
    assert (pick["method"], pick["strategy"]) == ("qlora", "single") and pick["fits"] is True
    assert "peft.method=lora" in pick["set"] and "model.quantization=nf4" in pick["set"]
    assert "the strongest method that fits" in small["why"]
    # every stronger method's rows do not fit there (or need host RAM that was not given)
    assert all(not r["fits"] for r in small["rows"] if r["method"] in ("full", "freeze", "lora"))
    big = compare_rows(recipe, config, 1, 8, 80.0)
    pick = big["rows"][big["recommended"]]
    assert pick["method"] == "full" and pick["strategy"] in ("deepspeed-zero2", "fsdp", "deepspeed-zero3")
    assert pick["trainable_params"] == 8_030_261_248
    # ddp replicates 16 bytes per parameter: it cannot hold a full fine-tune of 8B on 80 GiB
    ddp = next(r for r in big["rows"] if (r["method"], r["strategy"]) == ("full", "ddp"))
    assert ddp["fits"] is False and ddp["peak_gib"] > 120
    methods = {r["method"] for r in big["rows"]}
    assert methods == {"full", "freeze", "lora", "qlora"}
    assert not any(r["strategy"] == "fsdp-qlora" and r["method"] != "qlora" for r in big["rows"])
    assert any("fsdp" in line and "qlora" in line for line in big["refused"])  # plain fsdp + nf4


def test_compare_counts_like_a_run_and_needs_host_ram_for_offload(tmp_path: Path) -> None:
    from tunefleet.launch.params import param_counts
    from tunefleet.launch.plan_inputs import compare_rows

    config = json.loads(LLAMA_8B.read_text())
    table = compare_rows(_llama_recipe(tmp_path), config, 1, 1, 24.0)
    freeze = next(r for r in table["rows"] if r["method"] == "freeze")
    assert "peft.trainable_layers=8" in freeze["set"]  # a quarter of 32 layers
    counted = param_counts(config, R.PeftConfig(method="freeze", trainable_layers=8))
    assert freeze["trainable_params"] == counted.trainable
    offload = [r for r in table["rows"] if r["offload"] != "none"]
    assert offload and all(r["fits"] is not True for r in offload)  # host RAM unknown
    # one 48 GiB GPU in a node with 2 TiB of RAM: full fine-tuning with ZeRO-3 offload fits there
    with_host = compare_rows(_llama_recipe(tmp_path), config, 1, 1, 48.0, host_memory_gib=2048.0)
    full_offload = next(r for r in with_host["rows"] if r["method"] == "full" and r["offload"] != "none")
    assert full_offload["fits"] is True and full_offload["host_gib_per_node"] > 100  # 16 B x 8 B on the host
    assert with_host["rows"][with_host["recommended"]] == full_offload
    small_host = compare_rows(_llama_recipe(tmp_path), config, 1, 1, 48.0, host_memory_gib=64.0)
    assert next(r for r in small_host["rows"] if r == {**full_offload, "fits": False})["fits"] is False


def test_a_recipe_that_does_not_fit_is_told_which_row_does(tmp_path: Path) -> None:
    from tunefleet.launch.plan_inputs import make_plan

    path = tmp_path / "llama.yaml"
    path.write_text(R.dump(_llama_recipe(tmp_path, "peft.method=full", "parallel.strategy=ddp")))
    plan = make_plan(str(path), gpus_per_node=8, model_config_path=str(LLAMA_8B), gpu_memory_gib=80.0)
    told = [w for w in plan["warnings"] if w.startswith("this recipe does not fit; what does:")]
    assert told and "--set peft.method=full" in told[0] and "parallel.strategy=deepspeed-zero2" in told[0]


def test_full_fine_tuning_memory_against_published_figures() -> None:
    """Mixed-precision AdamW full fine-tuning keeps 16 bytes per parameter (ZeRO, Rajbhandari et al.
    2020: fp16 weights and gradients, fp32 master weights and two moments) to 18 (Hugging Face's
    "model memory anatomy": fp32 weights plus a 16-bit copy); seed 004: a 20B model needs 160 GB+ in
    full FP16 fine-tuning, ~45 GB with LoRA (docs/batch-and-plan.md)."""
    config = json.loads(LLAMA_8B.read_text())
    recipe = R.from_dict(
        {"output_dir": "o", "model": {"name_or_path": "m"}, "data": {"path": "d", "max_length": 2048}},
        ["peft.method=full", "parallel.strategy=fsdp", "train.precision=bf16", "train.gradient_checkpointing=true",
         "batch.micro_batch_size=1", "batch.global_batch_size=8"],
    )  # fmt: skip
    plan = build_plan(recipe, nodes=1, procs_per_node=8, model_config=config)
    parts = {p["name"]: p["bytes"] for p in plan["memory"]["parts"]}
    state = parts["model weights"] + parts["gradients"] + parts["optimizer state"]
    per_param = state * 8 / plan["total_params"]
    assert 16 <= per_param <= 18, per_param
    gpt_oss = json.loads((FIXTURES / "gpt-oss-20b" / "config.json").read_text())
    full = R.from_dict(
        {"output_dir": "o", "model": {"name_or_path": "openai/gpt-oss-20b"}, "data": {"path": "d", "max_length": 1024}},
        ["peft.method=full", "model.quantization=mxfp4", "parallel.strategy=fsdp", "train.precision=bf16",
         "train.gradient_checkpointing=true", "batch.micro_batch_size=1", "batch.global_batch_size=4"],
    )  # fmt: skip
    four = build_plan(full, nodes=1, procs_per_node=4, model_config=gpt_oss)
    assert 4 * four["memory"]["total_gib"] * GIB_BYTES / 1e9 >= 160  # "160 GB+" over 4 x A100
    lora = R.from_dict(
        {"output_dir": "o", "model": {"name_or_path": "openai/gpt-oss-20b"}, "data": {"path": "d", "max_length": 1024}},
        ["model.quantization=mxfp4", "model.dtype=bfloat16", "train.precision=bf16", "train.gradient_checkpointing=true",
         "batch.micro_batch_size=1", "batch.global_batch_size=4", "peft.target_modules=[q_proj,k_proj,v_proj,o_proj]"],
    )  # fmt: skip
    one = build_plan(lora, nodes=1, procs_per_node=1, model_config=gpt_oss)
    assert abs(one["memory"]["total_gib"] * GIB_BYTES / 1e9 - 45) <= 0.25 * 45, one["memory"]["total_gib"]


GIB_BYTES = 1024**3
