"""The built-in offline demo model: `tunefleet:tiny-llama`.

A Llama-architecture causal LM small enough to fine-tune on a laptop CPU in seconds, plus a
Llama-3-style tokenizer, both built locally (no network, no Hub): the tokenizer is a byte-level
BPE trained with `tokenizers` on the bundled `recipes/data/corpus.txt`, the model is randomly
initialised from a fixed seed. Every build is bit-for-bit identical.

`ensure_tiny_llama()` returns a directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load like any Hub checkpoint; it is built once and cached in
`$TUNEFLEET_CACHE` (or `~/.cache/tunefleet`) under `tiny-llama-<hash>`, where the hash covers
`BUILD_VERSION`, the build settings and the corpus, so changing any of them builds a new one.

Tokenizer behaviour (mirrors Llama 3; callers rely on it):

* special tokens `<|begin_of_text|>` (bos), `<|eot_id|>` (eos: end of turn),
  `<|start_header_id|>`, `<|end_header_id|>`; each is a single token. There is NO pad token:
  the trainer sets pad = eos.
* `tokenizer(text)` prepends bos (`add_bos_token=True`, a `TemplateProcessing` post-processor)
  and appends no eos; `tokenizer(text, add_special_tokens=False)` adds nothing.
* the chat template (Llama-3 style, without `{% generation %}` markers on purpose) writes the
  bos itself; `apply_chat_template(..., tokenize=True)` tokenizes with
  `add_special_tokens=False`, so there is exactly one bos. Tokenizing the rendered string
  yourself with `tokenizer(text)` would give two: pass `add_special_tokens=False`.
* `padding_side="right"`, `model_max_length=1024`.

Caveat (transformers 5): `save_pretrained` drops `add_bos_token` from tokenizer_config.json
when a tokenizer.json exists, so a *loaded* tokenizer reports `add_bos_token == False` although
it does add bos (the post-processor in tokenizer.json does). Do not trust that flag; and setting
`tokenizer.add_eos_token = True` on a loaded tokenizer rebuilds the post-processor from the
flags and silently drops the bos (set `add_bos_token = True` too, or load with
`AutoTokenizer.from_pretrained(path, add_bos_token=True)`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

TINY_LLAMA_ID = "tunefleet:tiny-llama"

BUILD_VERSION = "1"
"""Bump when the build changes in a way the settings below do not capture."""

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|eot_id|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
SPECIAL_TOKENS = [BOS_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOS_TOKEN]
"""Appended after the BPE vocabulary, in this order (like Llama 3, they take the last ids)."""

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
"""Llama-3 style. Deliberately without `{% generation %}` markers (no assistant masks)."""

# Llama 3's pre-tokenizer split: contractions, words with one leading non-letter, numbers in
# groups of 1-3 digits, punctuation runs, newlines, spaces.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

VOCAB_SIZE = 2000
"""Target size including the special tokens (the BPE trainer stops early on a too-small corpus)."""

MODEL_MAX_LENGTH = 1024
SEED = 1234
LM_HEAD_INIT_STD = 0.1
"""The output head is drawn wider than the other weights (`initializer_range` 0.02). A LoRA
fine-tune leaves the head frozen, and the head's scale (with the final norm, which fixes the
hidden state's length at sqrt(hidden_size)) bounds how sure the model can become: at 0.02 a LoRA
run barely leaves ln(vocab). At 0.1 the untrained loss is still about ln(vocab) (~8.2 at hidden
size 128) and a confident answer is within reach."""
MODEL_SETTINGS: dict[str, Any] = {
    # 128 wide rather than 64: at 64 the frozen head (norm 8 hidden states x rows of norm 0.8, against
    # 2000 rows) caps the probability of any token near 0.2, so the loss cannot go below ~1.6 whatever
    # LoRA learns. The step time on a CPU is the same at this size (overheads dominate).
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 352,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

CORPUS_FILE = "corpus.txt"
MARKER_FILE = "tunefleet_demo.json"
"""Written last into a finished build; a cache directory without it is not trusted."""


def demo_data_path(name: str) -> Path:
    """Path of a bundled data file in `tunefleet.recipes` (`recipes/data/<name>`)."""
    return Path(str(resources.files("tunefleet.recipes").joinpath("data", name)))


def resolve_name_or_path(name_or_path: str) -> str:
    """`TINY_LLAMA_ID` -> the local directory of the built demo model; anything else unchanged."""
    if name_or_path == TINY_LLAMA_ID:
        return str(ensure_tiny_llama())
    return name_or_path


def use_one_thread() -> None:
    """Train and generate with the demo model on one intra-op thread, unless OMP_NUM_THREADS says
    otherwise: its matrices are too small for threads to pay, and on a busy CPU the threads fight
    for the cores (measured on a shared 2-core machine: 72-113 ms per step on one thread, 240-810 ms
    on two)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    torch.set_num_threads(1)


def default_cache_dir() -> Path:
    """`$TUNEFLEET_CACHE`, or `~/.cache/tunefleet`."""
    env = os.environ.get("TUNEFLEET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tunefleet"


def build_hash() -> str:
    """Short hash of everything the build depends on: version, settings, template, corpus."""
    h = hashlib.sha256()
    settings = {
        "build_version": BUILD_VERSION,
        "special_tokens": SPECIAL_TOKENS,
        "chat_template": CHAT_TEMPLATE,
        "regex": PRETOKENIZE_REGEX,
        "vocab_size": VOCAB_SIZE,
        "model_max_length": MODEL_MAX_LENGTH,
        "seed": SEED,
        "lm_head_init_std": LM_HEAD_INIT_STD,
        "model": MODEL_SETTINGS,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(b"\0")
    h.update(demo_data_path(CORPUS_FILE).read_bytes())
    return h.hexdigest()[:12]


def ensure_tiny_llama(cache_dir: str | Path | None = None) -> Path:
    """Return a local directory holding the demo model and tokenizer, building it if missing.

    `cache_dir` is the cache root (default: `default_cache_dir()`); the model lives in its
    subdirectory `tiny-llama-<build_hash()>`. The build writes into a temporary directory next
    to it and renames it into place, so concurrent callers (e.g. several ranks) never see a
    half-written model: the first rename wins and the others use that directory.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"tiny-llama-{build_hash()}"
    if (target / MARKER_FILE).is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    except OSError as exc:
        from tunefleet.launch.core.errors import TunefleetError

        raise TunefleetError(
            f"the demo model is built into {root} (TUNEFLEET_CACHE, else ~/.cache/tunefleet), which cannot be "
            f"written: {exc.strerror or exc}",
            "set TUNEFLEET_CACHE to a directory you can write, e.g. TUNEFLEET_CACHE=$HOME/.cache/tunefleet",
        ) from None
    try:
        _build(tmp)
        for f in tmp.iterdir():  # mkdtemp makes 0700, safetensors writes 0600: a shared cache
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / MARKER_FILE).is_file():  # not a lost race
                _replace_unfinished(target, tmp)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _replace_unfinished(target: Path, new: Path) -> None:
    """`target` exists but is no finished build (made by hand, copied half): swap `new` in."""
    aside = target.with_name(f".{target.name}.unfinished-{os.getpid()}")
    with contextlib.suppress(OSError):
        os.rename(target, aside)
    try:
        os.rename(new, target)
    except OSError:
        if not (target / MARKER_FILE).is_file():
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


# --- the build ----------------------------------------------------------------------------


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _train_bpe():
    """The raw `tokenizers.Tokenizer` (byte-level BPE on the corpus, special tokens appended)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    corpus = demo_data_path(CORPUS_FILE).read_text(encoding="utf-8")
    # Single-threaded: the corpus is tiny, the result does not depend on it (checked), and a
    # process that used the tokenizers thread pool warns when it later forks (DataLoader, map).
    with _env("TOKENIZERS_PARALLELISM", "false"):
        tok.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _build(out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import (
        AutoModelForCausalLM,
        GenerationConfig,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    with _env("TOKENIZERS_PARALLELISM", "false"):
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_train_bpe(),
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            extra_special_tokens=[START_HEADER_TOKEN, END_HEADER_TOKEN],
            add_bos_token=True,  # post-processor: tokenizer(text) -> [bos, ...] like Llama 3
            add_eos_token=False,
            padding_side="right",
            model_max_length=MODEL_MAX_LENGTH,
            clean_up_tokenization_spaces=False,
            chat_template=CHAT_TEMPLATE,
        )
    bos_id = int(tokenizer.convert_tokens_to_ids(BOS_TOKEN))  # type: ignore[arg-type]
    eos_id = int(tokenizer.convert_tokens_to_ids(EOS_TOKEN))  # type: ignore[arg-type]

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
        **MODEL_SETTINGS,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            model.lm_head.weight.normal_(mean=0.0, std=LM_HEAD_INIT_STD)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,  # no pad token: generate() pads with eos instead of warning about it
    )

    # What `model.save_pretrained(out)` writes, minus its side effects: it imports deepspeed
    # (via accelerate's unwrap_model; slow, and deepspeed logs a warning on import) and shows a
    # progress bar. Plain Llama state dict, no shared tensors (embeddings are not tied).
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    marker = {
        "id": TINY_LLAMA_ID,
        "build_version": BUILD_VERSION,
        "build_hash": build_hash(),
        "vocab_size": len(tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
