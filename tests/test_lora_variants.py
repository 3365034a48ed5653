"""The LoRA variants of seed 003, each trained for real on CPU (a few steps of the demo model, or of a
tiny gpt-oss for its MoE experts): the loss falls; the final adapter loads with
`AutoPeftModelForCausalLM`, reproduces the run's own last evaluation loss and carries the setting
(the shapes it saved, its config); `tunefleet merge` gives logits equal to base+adapter where PEFT
can merge, and refuses Activated LoRA.

EVA (with its 2-process run) is in tests/test_eva.py; LoRA+ and LoRA-FA (optimizers, with resume on
another world size) in tests/test_lora_optimizers.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_train import quick
from tunefleet.distributed import sft
from tunefleet.distributed.alora import last_occurrence
from tunefleet.distributed.merge import MERGE_INFO, merge
from tunefleet.launch.core.errors import TunefleetError

pytestmark = pytest.mark.slow

STEPS = 4
SHORT = [
    "data.limit=80",
    "data.eval_ratio=0.1",  # 8 eval rows, 72 train rows
    f"train.max_steps={STEPS}",
    "train.warmup_ratio=0",
    "peft.r=16",  # the shapes and scalings below are for r=16, alpha=32 (the demo trains r=64)
    "peft.alpha=32",
]


def train(out: Path, *extra: str) -> Path:
    """A short run; what `tunefleet plan` counted (plan.json) is what the run's PEFT model has."""
    assert sft.run(quick(out, *SHORT, *extra)) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["trainable_params"] == plan["in_effect"]["trainable_params"], plan["in_effect"]
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_loss_falls(out: Path) -> None:
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.1, losses


def adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def adapter_config(out: Path) -> dict:
    return json.loads((out / "final" / "adapter_config.json").read_text())


def eval_loss(model, out: Path) -> float:
    """The evaluation loss as the trainer computes it (batches of the micro batch size, in order;
    each batch's token mean, weighted by its samples; MoE models: + the router loss), of `model`
    over the run's eval split."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tunefleet.distributed.prepare import make_cache
    from tunefleet.launch.core import recipe as R

    recipe = R.load(out / "recipe.yaml")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    data = make_cache(recipe, tokenizer, show=False)
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    micro = recipe.batch.micro_batch_size
    # TRL adds an MoE model's router load-balancing loss (x its config's coefficient), as the model does
    moe = {"output_router_logits": True} if hasattr(model.config, "output_router_logits") else {}
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data.eval), micro):
            rows = [data.eval[i] for i in range(start, min(start + micro, len(data.eval)))]
            total += float(model(**collate(rows), **moe).loss) * len(rows)
            n += len(rows)
    return total / n


def assert_reload_reproduces_the_run(out: Path):  # type: ignore[no-untyped-def]
    """The final adapter, loaded the way seed 003 loads it, scores the eval split as the run did at
    its last step: what was trained is what was saved (PiSSA-like inits, replicated layers and
    trainable tokens all change the model beyond A and B)."""
    from peft import AutoPeftModelForCausalLM

    last = [r["eval_loss"] for r in metrics(out) if r.get("eval_loss") is not None][-1]
    model = AutoPeftModelForCausalLM.from_pretrained(out / "final")
    assert eval_loss(model, out) == pytest.approx(last, abs=1e-5)
    return model


def assert_merge_equal(out: Path, tmp: Path) -> Path:
    """`tunefleet merge`: the merged model's logits equal base+adapter's (checked by merge on its
    probe, and here on another prompt after reloading the saved merged model)."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = merge(out, tmp / "merged")
    assert result.max_logit_diff is not None and result.max_logit_diff < 1e-4, result
    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged").eval()
    reference = AutoPeftModelForCausalLM.from_pretrained(out / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp / "merged")
    ids = tokenizer("### Instruction:\nName a colour.\n\n### Response:\n", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, reference(**ids).logits, atol=1e-4, rtol=1e-4)
    return tmp / "merged"


# ----------------------------------------------------------------------------- per-layer rank and alpha


def test_rank_and_alpha_patterns(tmp_path: Path) -> None:
    out = train(
        tmp_path / "run",
        r"peft.rank_pattern={'layers\.0\.self_attn\.q_proj': 4, 'mlp\..*': 8}",
        "peft.alpha_pattern={down_proj: 8}",
    )
    assert_loss_falls(out)
    shapes = adapter_shapes(out / "final")
    prefix = "base_model.model.model.layers"
    assert shapes[f"{prefix}.0.self_attn.q_proj.lora_A.weight"][0] == 4
    assert shapes[f"{prefix}.1.self_attn.q_proj.lora_A.weight"][0] == 16  # peft.r
    assert {
        shapes[f"{prefix}.{i}.mlp.{m}.lora_A.weight"][0] for i in (0, 1) for m in ("gate_proj", "down_proj")
    } == {8}
    config = adapter_config(out)
    assert config["alpha_pattern"] == {"down_proj": 8}
    model = assert_reload_reproduces_the_run(out)
    down = model.base_model.model.model.layers[0].mlp.down_proj
    assert (
        down.scaling["default"] == 8 / 8
        and model.base_model.model.model.layers[0].mlp.up_proj.scaling["default"] == 32 / 8
    )
    assert_merge_equal(out, tmp_path)


# ----------------------------------------------------------------------------- layer replication


def test_layer_replication(tmp_path: Path) -> None:
    out = train(tmp_path / "run", "peft.layer_replication=[[0, 2], [1, 2]]")
    assert_loss_falls(out)
    assert adapter_config(out)["layer_replication"] == [[0, 2], [1, 2]]
    shapes = adapter_shapes(out / "final")
    assert {k.split(".")[4] for k in shapes} == {"0", "1", "2"}  # an adapter on each of the three layers
    model = assert_reload_reproduces_the_run(out)
    layers = model.base_model.model.model.layers
    assert (
        len(layers) == 3
        and layers[2].mlp.down_proj.base_layer.weight is layers[1].mlp.down_proj.base_layer.weight
    )
    merged = assert_merge_equal(out, tmp_path)
    info = json.loads((merged / MERGE_INFO).read_text())
    assert json.loads((merged / "config.json").read_text())["num_hidden_layers"] == 3
    assert any("layer replication: 1 decoder layer" in n for n in info["notes"]), info


# ----------------------------------------------------------------------------- trainable token embeddings


def test_trainable_token_indices(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefleet.distributed.demo_model import ensure_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_llama())
    tokens = tokenizer(" Response:\n###", add_special_tokens=False)["input_ids"]  # in every alpaca prompt
    assert [tokenizer.decode([t]) for t in tokens] == [" Response", ":\n", "###"]
    out = train(tmp_path / "run", f"peft.trainable_token_indices={tokens}")
    assert_loss_falls(out)
    hidden = json.loads((ensure_tiny_llama() / "config.json").read_text())["hidden_size"]
    shapes = adapter_shapes(out / "final")
    assert shapes["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] == (3, hidden)
    model = assert_reload_reproduces_the_run(out)
    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_llama())
    ids = torch.tensor([[*tokens, 300]])
    with torch.no_grad():
        got, want = model.get_input_embeddings()(ids), base.get_input_embeddings()(ids)
    assert all(not torch.equal(got[0, i], want[0, i]) for i in range(3))  # the listed rows were trained
    assert torch.equal(got[0, 3], want[0, 3])  # and no other
    assert_merge_equal(out, tmp_path)


# ----------------------------------------------------------------------------- Activated LoRA


def test_activated_lora(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefleet.distributed.demo_model import ensure_tiny_llama

    out = train(tmp_path / "run", 'peft.alora_invocation="### Response:\\n"')
    assert_loss_falls(out)
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    invocation = tokenizer("### Response:\n", add_special_tokens=False)["input_ids"]
    assert adapter_config(out)["alora_invocation_tokens"] == invocation
    model = assert_reload_reproduces_the_run(out)
    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_llama()).eval()
    plain = tokenizer("### Instruction:\nName a colour.\n\n", return_tensors="pt")
    invoked = tokenizer("### Instruction:\nName a colour.\n\n### Response:\nred", return_tensors="pt")
    start = last_occurrence(invoked["input_ids"][0].tolist(), invocation)
    assert start is not None and start > 0
    with torch.no_grad():
        torch.testing.assert_close(model(**plain).logits, base(**plain).logits)  # no invocation: the base
        got, want = model(**invoked).logits, base(**invoked).logits
    torch.testing.assert_close(got[:, :start], want[:, :start])  # before the invocation: the base
    assert (got[:, start:] - want[:, start:]).abs().max() > 1e-3  # from it on: the adapter
    with pytest.raises(TunefleetError, match="which no merged weight can do"):
        merge(out, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_activated_lora_invocation_missing_from_the_data_is_refused(tmp_path: Path) -> None:
    """Tokenised alone, 'Response:' is not the tokens it is inside the prompt (' Response', ':\\n')."""
    from tunefleet.launch.core.errors import DataError

    with pytest.raises(DataError, match=r"does not occur before the first trained token in 72 of 72"):
        sft.run(quick(tmp_path / "run", *SHORT, "peft.alora_invocation='Response:'"))
    assert not (tmp_path / "run" / "final").exists()


# ----------------------------------------------------------------------------- MoE experts (target_parameters)


@pytest.fixture(scope="module")
def tiny_gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gpt-oss small enough for a CPU (the demo tokenizer): its experts are 3-D parameters."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GptOssConfig

    from tunefleet.distributed.demo_model import ensure_tiny_llama

    path = tmp_path_factory.mktemp("tiny-gpt-oss")
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_llama())
    config = GptOssConfig(
        vocab_size=len(tokenizer),
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
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_target_parameters_train_the_moe_experts(tmp_path: Path, tiny_gpt_oss: Path) -> None:
    out = train(
        tmp_path / "run",
        f"model.name_or_path={tiny_gpt_oss}",
        "model.attn_implementation=eager",
        "peft.target_modules=[q_proj, v_proj]",
        "peft.target_parameters=[mlp.experts.gate_up_proj, mlp.experts.down_proj]",
        "peft.dropout=0",
        "peft.r=4",
        "train.lr=1e-2",
    )
    assert_loss_falls(out)
    assert sorted(adapter_config(out)["target_parameters"]) == [
        "mlp.experts.down_proj",
        "mlp.experts.gate_up_proj",
    ]
    shapes = adapter_shapes(out / "final")
    experts = {k: v for k, v in shapes.items() if ".mlp.experts." in k}
    assert len(experts) == 2 * 2 * 2  # 2 layers x (gate_up, down) x (A, B)
    assert all(4 * 4 in shape for shape in experts.values())  # rank r x experts
    assert (out / "samples.jsonl").is_file()  # generation with TRL's router logits on (an MoE) works
    assert_reload_reproduces_the_run(out)
    assert_merge_equal(out, tmp_path)


def test_activated_lora_cannot_see_samples_packed_into_one_row(tiny_model_dir: Path) -> None:
    """Why aLoRA refuses `batch.padding_free: true`: PEFT finds one invocation per row (the last), so in
    a packed row the adapter acts from the last sample's invocation on, never on the samples before."""
    import torch
    from peft.tuners.lora.variants import calculate_alora_offsets
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tunefleet.distributed import data as data_mod
    from tunefleet.launch.core.recipe import PeftConfig
    from tunefleet.launch.params import lora_config_kwargs

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token  # as the trainer sets it
    invocation = tokenizer("### Response:\n", add_special_tokens=False)["input_ids"]
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("red", "blue")]
    examples = [data_mod.tokenize_example(r, fmt="alpaca", tokenizer=tokenizer, max_length=64) for r in rows]
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
    from peft import LoraConfig

    config = {"default": LoraConfig(**lora_config_kwargs(PeftConfig(alora_invocation="x"), invocation))}

    def active(batch: dict) -> list[list[bool]]:
        ids = batch["input_ids"]
        offsets = calculate_alora_offsets(config, "default", ids)
        return [[pos >= ids.shape[1] - o for pos in range(ids.shape[1])] for o in offsets]

    first_answer = len(examples[0]["input_ids"]) - 2  # 'red' and eos: the first sample's trained tokens
    assert all(active(padded)[0][first_answer : len(examples[0]["input_ids"])])  # padded: on for each sample
    row = active(packed)[0]
    assert not any(row[first_answer : len(examples[0]["input_ids"])])  # packed: off for the first sample
    assert torch.equal(
        packed["input_ids"][0, : len(examples[0]["input_ids"])], torch.tensor(examples[0]["input_ids"])
    )
