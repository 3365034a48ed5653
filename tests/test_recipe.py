"""The recipe schema: unknown keys, types, impossible values, overrides, shipped recipes."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from tunefleet.launch.core import recipe as R
from tunefleet.launch.core.errors import RecipeError

RECIPES = sorted(Path(str(resources.files("tunefleet.recipes"))).glob("*.yaml"))

MINIMAL = {"output_dir": "out", "model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}}


def build(**changes: object) -> R.Recipe:
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for key, value in changes.items():
        section, _, name = key.partition("__")
        raw.setdefault(section, {})[name] = value
    return R.from_dict(raw)


def test_shipped_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert "demo.yaml" in names
    assert len(RECIPES) >= 5, names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_loads_and_starts_with_its_command(path: Path) -> None:
    recipe = R.load(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# tunefleet ") and path.name in first, first
    # the resolved dump reloads to the same recipe
    assert R.from_dict(yaml.safe_load(R.dump(recipe))) == recipe


def test_defaults_are_safe() -> None:
    r = build()
    assert r.model.trust_remote_code is False
    assert r.model.quantization == "none"
    assert r.peft.target_modules == "all-linear"
    assert r.data.completion_only_loss is True


def test_unknown_key_suggests_closest() -> None:
    with pytest.raises(RecipeError) as err:
        build(peft__rank=8)
    msg = str(err.value)
    assert "peft.rank" in msg and "did you mean peft.r?" in msg
    assert "valid keys in peft:" in msg and "target_modules" in msg


def test_unknown_section_suggests_closest() -> None:
    raw = dict(MINIMAL, trian={"lr": 1e-4})
    with pytest.raises(RecipeError, match="did you mean train"):
        R.from_dict(raw)


def test_missing_required_key() -> None:
    with pytest.raises(RecipeError, match="model.name_or_path"):
        R.from_dict({"output_dir": "o", "model": {}, "data": {"path": "x"}})


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("peft__r", "sixteen", "peft.r: expected int"),
        ("peft__r", 1.5, "peft.r: expected int"),
        ("train__lr", "fast", "train.lr: expected float"),
        ("model__trust_remote_code", "yes", "expected bool"),
        ("data__format", "alpacca", "did you mean 'alpaca'"),
        ("model__quantization", "nf5", "is not one of"),
        ("peft__target_modules", "q_proj", "peft.target_modules"),
        ("peft__target_modules", [1, 2], "peft.target_modules"),
    ],
)
def test_wrong_types(key: str, value: object, fragment: str) -> None:
    with pytest.raises(RecipeError) as err:
        build(**{key: value})
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("peft__r", 0, "peft.r: must be > 0"),
        ("peft__dropout", 1.0, "peft.dropout"),
        ("train__lr", -1.0, "train.lr"),
        ("train__max_steps", 0, "train.max_steps"),
        ("train__warmup_ratio", 1.5, "train.warmup_ratio"),
        ("batch__micro_batch_size", 0, "batch.micro_batch_size"),
        ("batch__global_batch_size", 10, "not a multiple"),
        ("data__eval_ratio", 1.0, "data.eval_ratio"),
        ("checkpoint__keep_last", 0, "checkpoint.keep_last"),
    ],
)
def test_impossible_values(key: str, value: object, fragment: str) -> None:
    changes = {key: value}
    if key == "batch__global_batch_size":
        changes["batch__micro_batch_size"] = 4
    with pytest.raises(RecipeError) as err:
        build(**changes)
    assert fragment in str(err.value)


def test_incompatible_init_and_quantization() -> None:
    with pytest.raises(RecipeError, match="loftq"):
        build(peft__init="loftq", model__quantization="nf4")
    with pytest.raises(RecipeError, match="pissa"):
        build(peft__init="pissa", model__quantization="nf4")
    assert build(peft__init="pissa").peft.init == "pissa"


def test_overrides_are_typed_like_yaml() -> None:
    r = R.from_dict(
        MINIMAL,
        [
            "peft.r=8",
            "train.lr=1e-4",
            "peft.target_modules=[q_proj, v_proj]",
            "model.trust_remote_code=true",
            "data.limit=null",
            "train.epochs=2",
        ],
    )
    assert r.peft.r == 8 and isinstance(r.peft.r, int)
    assert r.train.lr == pytest.approx(1e-4)
    assert r.peft.target_modules == ["q_proj", "v_proj"]
    assert r.model.trust_remote_code is True
    assert r.train.epochs == 2.0 and isinstance(r.train.epochs, float)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("peft.rank=8", "did you mean peft.r?"),
        ("peft.r=eight", "expected int"),
        ("peft.r", "expected section.key=value"),
        ("peft..r=1", "not a dotted key"),
        ("output_dir.x=1", "is not a section"),
    ],
)
def test_bad_overrides(override: str, fragment: str) -> None:
    with pytest.raises(RecipeError) as err:
        R.from_dict(MINIMAL, [override])
    assert fragment in str(err.value)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        R.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        R.load(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(dict(MINIMAL, peft={"rank": 4})))
    with pytest.raises(RecipeError, match=r"wrong\.yaml: unknown recipe key 'peft.rank'"):
        R.load(wrong)


def test_data_path_relative_to_recipe(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text("{}\n")
    f = tmp_path / "r.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "output_dir": "o",
                "model": {"name_or_path": "m"},
                "data": {"path": "data/x.jsonl", "eval_path": "org/some-dataset"},
            }
        )
    )
    r = R.load(f)
    assert r.data.path == str((tmp_path / "data" / "x.jsonl").resolve())
    assert r.data.eval_path == "org/some-dataset"  # not a file next to the recipe: left as written


def test_fingerprint_stable_and_sensitive() -> None:
    a, b = build(), build()
    assert R.fingerprint(a) == R.fingerprint(b)
    assert R.fingerprint(a) != R.fingerprint(build(peft__r=8))
    assert R.fingerprint(a, ["model.name_or_path"]) == R.fingerprint(build(peft__r=8), ["model.name_or_path"])


def test_launcher_modules_do_not_import_torch() -> None:
    code = (
        "import sys, tunefleet.launch.cli, tunefleet.launch.core.recipe, tunefleet.slurm; "
        "tunefleet.launch.cli.build_parser(); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- the LoRA variants (seed 003)


def test_lora_variant_keys_are_typed() -> None:
    r = R.from_dict(
        MINIMAL,
        [
            "peft.init=eva",
            "peft.eva_rho=1",
            "peft.rank_pattern={'layers\\.0\\.self_attn\\.q_proj': 4, down_proj: 8}",
            "peft.alpha_pattern={down_proj: 8}",
            "peft.layer_replication=[[0, 2], [1, 2]]",
            "peft.trainable_token_indices={embed_tokens: [5, 10]}",
            "peft.target_modules=[]",
            "peft.target_parameters=[mlp.experts.gate_up_proj]",
            "peft.dropout=0",
            'peft.alora_invocation="### Response:\\n"',
            "peft.loraplus_lr_ratio=16",
        ],
    )
    p = r.peft
    assert p.rank_pattern == {r"layers\.0\.self_attn\.q_proj": 4, "down_proj": 8}
    assert p.alpha_pattern == {"down_proj": 8.0} and isinstance(p.alpha_pattern["down_proj"], float)
    assert p.layer_replication == [[0, 2], [1, 2]] and p.trainable_token_indices == {"embed_tokens": [5, 10]}
    assert p.alora_invocation == "### Response:\n" and p.loraplus_lr_ratio == 16.0 and p.eva_rho == 1.0
    assert R.from_dict(yaml.safe_load(R.dump(r))) == r  # the resolved dump reloads
    assert build(peft__trainable_token_indices=[5, 10]).peft.trainable_token_indices == [5, 10]


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"peft__rank_pattern": {"q_proj": "four"}}, "expected mapping of str to int"),
        ({"peft__rank_pattern": ["q_proj", 4]}, "peft.rank_pattern: expected mapping of str to int"),
        ({"peft__rank_pattern": {"q_proj": 0}}, "must be > 0"),
        ({"peft__rank_pattern": {"q_proj(": 4}}, "is not a regular expression"),
        ({"peft__alpha_pattern": {}}, "peft.alpha_pattern: is empty"),
        ({"peft__layer_replication": [[2, 1]]}, "0 <= start < end"),
        ({"peft__layer_replication": [[0, 1, 2]]}, "0 <= start < end"),
        ({"peft__trainable_token_indices": [5, 5]}, "distinct"),
        ({"peft__trainable_token_indices": []}, "is empty"),
        ({"peft__target_parameters": [""]}, "empty name"),
        ({"peft__target_modules": []}, "peft.target_modules: is an empty list"),
        ({"peft__alora_invocation": " "}, "peft.alora_invocation: is empty"),
        ({"peft__eva_rho": 2.0}, "only peft.init=eva reads it"),
        ({"peft__init": "eva", "peft__eva_rho": 0.5}, "must be >= 1"),
        ({"peft__loraplus_lr_ratio": 0}, "peft.loraplus_lr_ratio: must be > 0"),
        ({"peft__lora_fa": True, "peft__loraplus_lr_ratio": 16}, "each build the optimizer"),
        ({"peft__lora_fa": True, "train__optimizer": "sgd"}, "would replace train.optimizer='sgd'"),
        ({"peft__lora_fa": True, "peft__method": "dora"}, "DoRA's magnitude vectors"),
    ],
)
def test_lora_variant_values_are_checked(changes: dict, fragment: str) -> None:
    with pytest.raises(RecipeError) as err:
        build(**changes)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "change",
    [
        "peft.init=eva",
        "peft.loraplus_lr_ratio=16",
        "peft.lora_fa=true",
        "peft.alora_invocation=go",
        "peft.rank_pattern={q_proj: 4}",
        "peft.alpha_pattern={q_proj: 4}",
        "peft.layer_replication=[[0, 1]]",
        "peft.trainable_token_indices=[1]",
        "peft.target_parameters=[mlp.experts.down_proj]",
    ],
)
def test_changing_a_lora_variant_on_resume_changes_the_training(change: str) -> None:
    base = ["peft.dropout=0"]  # peft.target_parameters needs it
    saved = R.to_dict(R.from_dict(MINIMAL, base))
    breaking, harmless = R.resume_diff(saved, R.from_dict(MINIMAL, [*base, change]))
    assert len(breaking) == 1 and breaking[0].startswith(change.split("=")[0] + ":") and not harmless


def test_keys_added_since_a_checkpoint_was_written_are_no_change_at_their_default() -> None:
    """A checkpoint written before a key existed lacks it; at its default it trains as before."""
    saved = R.to_dict(R.from_dict(MINIMAL))
    for key in ("lora_fa", "loraplus_lr_ratio", "rank_pattern"):
        del saved["peft"][key]
    assert R.resume_diff(saved, R.from_dict(MINIMAL)) == ([], [])
    breaking, _ = R.resume_diff(saved, R.from_dict(MINIMAL, ["peft.lora_fa=true"]))
    assert breaking == ["peft.lora_fa: None -> True"]
