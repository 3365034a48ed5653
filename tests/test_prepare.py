"""Data preparation that scales, and says what it drops and cuts.

* The batched, multi-process path gives exactly the per-row reference's ids and labels, row by
  row: on the bundled demo data, on generated long-tailed alpaca and multi-turn chat rows, and
  with the chat templates tests/test_data.py builds (Llama-3, ChatML/Qwen2.5, Phi-3, gpt-oss-like,
  {% generation %} markers, Qwen3-like templates that rewrite earlier turns), and it really takes
  its fast route (template runs and tokenised characters per row do not grow with the turns).
* A huge row is tokenised from a prefix: the same first max_length ids, little time and memory.
* Truncated and dropped rows are counted with their reason; warnings when most answers are cut
  or a quarter are empty; `tunefleet prepare`, `tunefleet plan`, the run summary and plan.json say so.
* Progress: a bar on a terminal, a few lines in a log.
* One rank tokenises, the others wait (real processes), with a clear error when it fails or stalls.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import random
import re
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest

from tests.test_data import ALL_KINDS, QWEN3_LIKE_GENERATION_TEMPLATE, WORDS, make_tokenizer
from tunefleet.distributed import data as D
from tunefleet.distributed import prepare as prep
from tunefleet.distributed.data import parallel
from tunefleet.distributed.data.batched import Batcher
from tunefleet.distributed.data.counts import Tally
from tunefleet.distributed.data.progress import RowProgress
from tunefleet.launch import prep_report
from tunefleet.launch.core import recipe as R
from tunefleet.launch.core.errors import DataError, RecipeError
from tunefleet.launch.core.recipe import DataConfig

DEMO = Path(str(resources.files("tunefleet.recipes"))) / "demo.yaml"
DEMO_DATA = DEMO.parent / "data"

# a Qwen3-style template that looks into the contents ('</think>' in content, empty user turns)
INSPECTING_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.last %}{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- content + '<|im_end|>\\n' }}"
    "{%- elif message.content %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# rewrites every answer (upper case; the {% generation %} blocks give the spans): no skeleton can
# stand for it, every row takes the reference
UPPER_TEMPLATE = QWEN3_LIKE_GENERATION_TEMPLATE.replace(
    "message.content + '<|im_end|>'", "message.content | upper + '<|im_end|>'"
)


def tokenizer(kind: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if kind == "tiny":
        from tunefleet.distributed.demo_model import ensure_tiny_llama

        return AutoTokenizer.from_pretrained(ensure_tiny_llama())
    if kind in ("inspecting", "upper"):
        base = make_tokenizer("qwen25")
        template = INSPECTING_TEMPLATE if kind == "inspecting" else UPPER_TEMPLATE
        return PreTrainedTokenizerFast(
            tokenizer_object=base.backend_tokenizer, eos_token="<|im_end|>", chat_template=template
        )
    return make_tokenizer(kind)


# ----------------------------------------------------------------------------- generated rows

ODD = [
    "",
    " ",
    "\n\nlead",
    "trail \n",
    "</think>",
    "<think>x</think>\n\nok",
    "<|im_end|>",
    "ä ö",
    '"q"',
    "\\",
]


def _text(rng: random.Random) -> str:
    """Long-tailed lengths (median ~10 words, some hundreds), now and then an odd piece."""
    n = min(600, max(1, int(rng.lognormvariate(2.3, 1.0))))
    text = " ".join(rng.choices(WORDS, k=n))
    if rng.random() < 0.15:
        text = rng.choice(ODD) + text if rng.random() < 0.5 else text + rng.choice(ODD)
    return text


def chat_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = [{"role": "system", "content": _text(rng)}] if rng.random() < 0.3 else []
        for _ in range(min(8, 1 + int(rng.expovariate(0.5)))):
            question = "" if rng.random() < 0.05 else _text(rng)  # the inspecting template branches on it
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": _text(rng)}]
        rows.append({"messages": turns})
    return rows


def alpaca_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "instruction": _text(rng),
            "input": _text(rng) if rng.random() < 0.4 else "",
            "output": ("\n" if rng.random() < 0.1 else "") + _text(rng),
        }
        for _ in range(n)
    ]


def batched(rows, cfg, tok, *, chunk: int = 50) -> tuple[list[dict], dict, list[str]]:
    b, tally, out = Batcher(tok, cfg), Tally(), []
    for start in range(0, len(rows), chunk):
        out += b.rows(rows[start : start + chunk], start + 1, "gen.jsonl", tally)
    return out, tally.to_dict(), b.notes


def _same(rows, cfg, tok) -> dict:
    """The batched path equals the reference row by row (and in its counts); returns its counts.
    A row the reference refuses (a template that rewrites an answer beyond finding) is refused by
    the batched path with the same error."""
    good = []
    for row in rows:
        try:
            D.tokenize_example(
                row,
                fmt=cfg.format,
                tokenizer=tok,
                max_length=cfg.max_length,
                completion_only_loss=cfg.completion_only_loss,
                where="gen.jsonl row 1",
            )
            good.append(row)
        except DataError as exc:
            with pytest.raises(DataError) as info:
                batched([row], cfg, tok)
            assert str(info.value) == str(exc)
    assert len(good) >= len(rows) // 2
    rows = good
    want, want_stats = D.build_dataset(rows, cfg=cfg, tokenizer=tok, where="gen.jsonl")
    got, got_stats, notes = batched(rows, cfg, tok)
    assert len(got) == len(want)
    for n, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"example {n} differs"
    assert {k: v for k, v in got_stats.items() if k != "reference_rows"} == {
        k: v for k, v in want_stats.items() if k != "reference_rows"
    }
    assert notes == []  # no process had to turn the batched path off
    return got_stats


# ----------------------------------------------------------------------------- the same result


@pytest.mark.parametrize("kind", [*ALL_KINDS, "tiny", "inspecting", "upper"])
def test_batched_equals_the_reference_on_generated_chat(kind: str) -> None:
    tok = tokenizer(kind)
    rows = chat_rows(60, seed=len(kind))
    for max_length in (64, 4096):
        stats = _same(rows, DataConfig(path="x", format="messages", max_length=max_length), tok)
        if kind == "upper":
            assert stats["reference_rows"] == len(rows)  # proven unusable: every row the reference's
        elif kind == "inspecting":  # rows whose contents change the template's branches
            assert 0 < stats["reference_rows"] < stats["rows"]
        else:
            assert stats["reference_rows"] == 0  # the fast route, not a fallback, gave these
    _same(rows[:20], DataConfig(path="x", format="messages", completion_only_loss=False), tok)


@pytest.mark.parametrize("kind", ["llama3", "qwen25", "gptoss", "tiny"])
def test_batched_equals_the_reference_on_generated_alpaca(kind: str) -> None:
    tok = tokenizer(kind)
    rows = alpaca_rows(120, seed=3)
    for max_length in (32, 4096):
        _same(rows, DataConfig(path="x", format="alpaca", max_length=max_length), tok)
    _same(rows[:30], DataConfig(path="x", format="alpaca", completion_only_loss=False), tok)
    pc = [{"prompt": r["instruction"], "completion": r["output"]} for r in rows[:30]]
    _same(pc, DataConfig(path="x", format="prompt-completion"), tok)
    text = [{"text": r["output"] or "x"} for r in rows[:30]]
    _same(text, DataConfig(path="x", format="text", max_length=48), tok)


@pytest.mark.parametrize("kind", ["tiny", "llama3", "qwen25"])
def test_demo_data_on_two_processes_equals_the_reference(kind: str, tmp_path: Path) -> None:
    """The bundled demo data through the whole build (2 forked workers, Arrow shards, memory-mapped
    back): the reference's examples in the reference's order."""
    tok = tokenizer(kind)
    for name, fmt in (("alpaca_demo.jsonl", "alpaca"), ("chat_demo.jsonl", "messages")):
        rows = D.load_rows(str(DEMO_DATA / name))
        cfg = DataConfig(path=name, format=fmt, max_length=40)
        want, want_stats = D.build_dataset(rows, cfg=cfg, tokenizer=tok, where=name)
        built = parallel.build(rows, cfg=cfg, tokenizer=tok, where=name, out_dir=tmp_path / fmt, procs=2)
        dataset = parallel.load(tmp_path / fmt, built.shards)
        assert len(built.shards) > 1 and built.procs == 2
        assert dataset.to_list() == want
        assert built.stats == {**want_stats, "reference_rows": built.stats["reference_rows"]}
        assert built.stats["reference_rows"] == 0 and built.notes == []
        assert all(Path(f["filename"]).parent == tmp_path / fmt for f in dataset.cache_files)  # mapped


def test_first_bad_row_is_reported_as_the_reference_reports_it(tmp_path: Path) -> None:
    tok = tokenizer("tiny")
    rows = alpaca_rows(300, seed=5)
    rows[201] = {"instruction": "x", "output": 3}
    rows[250] = {"instruction": "x"}
    with pytest.raises(DataError, match=r"gen\.jsonl row 202: 'output' must be a string"):
        parallel.build(
            rows, cfg=DataConfig(path="x"), tokenizer=tok, where="gen.jsonl", out_dir=tmp_path, procs=2
        )


@pytest.mark.timeout(120)
def test_a_failed_build_ends_its_workers_whatever_sigterm_did_in_the_parent(tmp_path: Path) -> None:
    """A parent whose SIGTERM only sets a flag (a training run's handler, as a test or a notebook
    that trained in-process leaves it) forks workers that must still die when the pool is
    terminated after a bad row: the CI run once hung here for an hour. The hang is a race (a
    worker left waiting for the pool's queue lock), so the build runs several times; before the
    fix this reproduction hung within three."""
    import signal

    seen: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, _frame: seen.append(signum))
    try:
        tok = tokenizer("tiny")
        rows = alpaca_rows(300, seed=5)
        rows[201] = {"instruction": "x", "output": 3}
        for attempt in range(8):
            with pytest.raises(DataError, match=r"row 202"):
                parallel.build(
                    rows,
                    cfg=DataConfig(path="x"),
                    tokenizer=tok,
                    where="gen.jsonl",
                    out_dir=tmp_path / str(attempt),
                    procs=2,
                )
    finally:
        signal.signal(signal.SIGTERM, before)
    assert multiprocessing.active_children() == []
    assert seen == []  # the parent itself was sent nothing


def test_template_runs_and_tokenised_characters_do_not_grow_with_the_turns(monkeypatch) -> None:
    """O(turns): after a shape's first rows, one template run per row; the tokenizer sees each
    conversation about once, not once per answer boundary as the reference does."""
    import jinja2

    tok = tokenizer("tiny")
    rng = random.Random(7)
    rows = [  # one shape: 12 exchanges each, different contents
        {
            "messages": [
                {"role": role, "content": _text(rng)} for _ in range(12) for role in ("user", "assistant")
            ]
        }
        for _ in range(10)
    ]
    runs = {"n": 0}
    real_render, real_generate = jinja2.Template.render, jinja2.Template.generate

    def counting(real):
        def wrapped(self, *args, **kwargs):
            runs["n"] += 1
            return real(self, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(jinja2.Template, "render", counting(real_render))
    monkeypatch.setattr(jinja2.Template, "generate", counting(real_generate))
    encoded = {"chars": 0}
    backend_type = type(tok.backend_tokenizer)
    real_batch = backend_type.encode_batch

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __setattr__(self, name, value):
            if name == "inner":
                object.__setattr__(self, name, value)
            else:
                setattr(self.inner, name, value)

        def encode_batch(self, texts, **kwargs):
            encoded["chars"] += sum(len(t) for t in texts)
            return real_batch(self.inner, texts, **kwargs)

    cfg = DataConfig(path="x", format="messages", max_length=100_000)
    b = Batcher(tok, cfg)
    b.encoder.backend = Counting(tok.backend_tokenizer)
    b.checked_rows = 10**6  # this test counts the fast route alone (the first-row check is tested above)
    tally = Tally()
    b.rows(rows[:3], 1, "x", tally)  # builds the shape (O(turns) runs, once) and checks 2 rows
    runs["n"], encoded["chars"] = 0, 0
    b.rows(rows[3:], 4, "x", tally)
    assert runs["n"] == len(rows) - 3  # one template run per row, with 24 turns each
    text = tok.apply_chat_template(rows[3]["messages"], tokenize=False)
    assert encoded["chars"] < 1.2 * len(text) * (len(rows) - 3)
    runs["n"] = 0
    D.build_dataset(rows[:1], cfg=cfg, tokenizer=tok, where="x")
    assert runs["n"] >= 2 * 12 + 1  # the reference: two runs per assistant turn, plus the whole


# ----------------------------------------------------------------------------- a huge row


def test_huge_row_first_tokens_equal_the_full_tokenisation() -> None:
    """A 2 MB single-line answer: the ids and labels are the first max_length of the whole row's
    reference tokenisation, though only a prefix of the text was tokenised."""
    tok = tokenizer("tiny")
    rng = random.Random(0)
    row = {"instruction": "Say it all.", "input": "", "output": " ".join(rng.choices(WORDS, k=330_000))}
    assert len(row["output"]) > 2_000_000
    full = D.tokenize_example(row, fmt="alpaca", tokenizer=tok, max_length=10**9)  # every token
    cfg = DataConfig(path="x", format="alpaca", max_length=256)
    for build in (D.build_dataset, lambda rows, **kw: batched(rows, kw["cfg"], kw["tokenizer"])[:2]):
        started = time.monotonic()
        examples, stats = build([row], cfg=cfg, tokenizer=tok, where="huge.jsonl")
        assert time.monotonic() - started < 20
        assert examples[0]["input_ids"] == full["input_ids"][:256]
        assert examples[0]["labels"] == full["labels"][:256]
        assert stats["bounded_rows"] == 1 and stats["truncated"] == 1 and stats["answer_cut"] == 1


@pytest.mark.slow
def test_huge_row_time_and_memory_stay_small(tmp_path: Path) -> None:
    """`tunefleet prepare` on a 50 MB single-line row (before: 2 minutes and 8.9 GB, cut to 256
    tokens): a few seconds of tokenising and the memory of the text itself."""
    rng = random.Random(1)
    data = tmp_path / "huge.jsonl"
    output = " ".join(rng.choices(WORDS, k=8_300_000))
    data.write_text(json.dumps({"instruction": "All of it.", "output": output}) + "\n")
    assert data.stat().st_size > 50_000_000
    del output
    code = (
        "import json, resource, sys, time\n"
        "from tunefleet.distributed import prepare as prep\n"
        "from tunefleet.launch.core import recipe as R\n"
        f"r = R.load({str(DEMO)!r}, ['output_dir={tmp_path / 'run'}', 'data.path={data}', 'data.max_length=256'])\n"
        "t = time.monotonic(); res = prep.prepare(r, show=False); s = time.monotonic() - t\n"
        "print(json.dumps({'s': s, 'rss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
        " 'stats': res.stats}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["stats"]["bounded_rows"] == 1 and result["stats"]["examples"] == 1
    assert result["rss_kib"] < 1.5 * 2**20, result  # under 1.5 GiB, interpreter and libraries included
    assert result["s"] < 120, result  # loading the tokenizer and hashing 50 MB included


# ----------------------------------------------------------------------------- what was dropped and cut


def test_drops_and_cuts_are_counted_with_their_reasons() -> None:
    tok = tokenizer("tiny")
    long = " ".join(WORDS[:60])
    rows = [
        {"instruction": "Short.", "output": "Fine."},  # kept whole
        {"instruction": long * 2, "output": "Lost."},  # the prompt fills max_length: dropped
        {"instruction": "Tell.", "output": long},  # answer cut
        {"instruction": "Nothing.", "output": "   "},  # an empty answer (trained on eos only)
    ]
    cfg = DataConfig(path="x", format="alpaca", max_length=40)
    examples, stats = D.build_dataset(rows, cfg=cfg, tokenizer=tok, where="x")
    assert len(examples) == 3 and stats["examples"] == 3 and stats["rows"] == 4
    assert stats["dropped_truncated"] == 1 and stats["answer_cut"] == 1 and stats["truncated"] == 2
    assert stats["answers"] == 4 and stats["empty_answers"] == 1
    assert prep_report.dropped(stats) == {"no answer token left after truncation": 1}
    assert prep_report.truncated(stats, "alpaca") == {"answer cut at data.max_length": 1}
    lines = dict(prep_report.lines(stats, max_length=40, fmt="alpaca"))
    assert lines["dropped"] == "1 row(s): 1 no answer token left after truncation at data.max_length=40"
    assert lines["truncated"] == "1 row(s): 1 answer cut at data.max_length=40"
    warnings = prep_report.warnings(stats, max_length=40, fmt="alpaca")
    assert len(warnings) == 1 and "1 of 4 answers (25%) are empty" in warnings[0]  # a quarter: warned
    assert prep_report.warnings({**stats, "empty_answers": 0}, max_length=40, fmt="alpaca") == []


def test_most_answers_cut_is_a_warning_not_an_error() -> None:
    tok = tokenizer("tiny")
    long = " ".join(WORDS[:60])
    rows = [{"instruction": "Tell.", "output": long}] * 3 + [{"instruction": "Short.", "output": "Fine."}]
    stats = D.build_dataset(rows, cfg=DataConfig(path="x", max_length=30), tokenizer=tok, where="x")[1]
    (warning,) = prep_report.warnings(stats, max_length=30, fmt="alpaca")
    assert warning.startswith("most answers are cut: 3 of 4 rows (75%)") and "data.max_length=30" in warning
    stats = D.build_dataset(rows[2:], cfg=DataConfig(path="x", max_length=30), tokenizer=tok, where="x")[1]
    assert prep_report.warnings(stats, max_length=30, fmt="alpaca") == []  # 1 of 2: not most


def _data_file(tmp_path: Path) -> Path:
    long = " ".join(WORDS[:60])
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(20)]
    rows += [{"instruction": long * 2, "output": "x"}] * 3 + [{"instruction": "Go.", "output": long}] * 2
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepare_and_plan_report_drops_and_cuts(tmp_path: Path, capsys, tiny_model_dir: Path) -> None:
    from tunefleet.launch import cli
    from tunefleet.launch.plan_inputs import make_plan

    data = _data_file(tmp_path)
    sets = [f"output_dir={tmp_path / 'run'}", f"data.path={data}", "data.max_length=40"]
    before = make_plan(str(DEMO), sets)
    assert before["data_preparation"] is None and before["dataset_rows"] == 25
    assert any("tunefleet prepare RECIPE" in n for n in before["notes"])
    assert cli.main(["prepare", str(DEMO), *[x for s in sets for x in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "tokenised: 22 training examples from 25 rows" in out
    assert "dropped: 3 row(s): 3 no answer token left after truncation at data.max_length=40" in out
    assert "truncated: 2 row(s): 2 answer cut at data.max_length=40" in out
    plan = make_plan(str(DEMO), sets)  # the planner finds the prepared counts: examples, not rows
    assert plan["dataset_rows"] == 22 and plan["data_counted"] == "examples"
    prepared = plan["data_preparation"]
    assert prepared["dropped"] == {"no answer token left after truncation": 3}
    assert prepared["truncated"] == {"answer cut at data.max_length": 2}
    from tunefleet.launch.plan import render_plan

    assert "3 row(s): 3 no answer token left after truncation" in render_plan(plan)
    # other data settings: the counts no longer apply
    assert make_plan(str(DEMO), [*sets, "data.max_length=64"])["data_preparation"] is None


@pytest.mark.slow
def test_run_summary_and_plan_json_report_drops_and_cuts(
    tmp_path: Path, capsys, tiny_model_dir: Path
) -> None:
    from tunefleet.distributed import sft

    data = _data_file(tmp_path)
    out = tmp_path / "run"
    recipe = R.load(
        DEMO,
        [
            f"output_dir={out}",
            f"data.path={data}",
            "data.max_length=40",
            "train.max_steps=1",
            "batch.micro_batch_size=4",
        ],
    )
    assert sft.run(recipe) == 0
    printed = " ".join(re.sub(r"[│┃]", " ", capsys.readouterr().out).split())  # the table, unwrapped
    assert "tokenised 25 rows into the cache" in printed
    assert "3 no answer token left after truncation at data.max_length=40" in printed
    plan = json.loads((out / "plan.json").read_text())
    assert plan["data_preparation"]["dropped"] == {"no answer token left after truncation": 3}
    assert plan["data_preparation"]["truncated"] == {"answer cut at data.max_length": 2}
    assert plan["dataset_rows"] == 22 and plan["in_effect"]["train_examples"] == 22


# ----------------------------------------------------------------------------- progress


def test_progress_in_a_log_is_a_few_lines(monkeypatch) -> None:
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    stream = io.StringIO()
    with RowProgress(100_000, "tokenising train", stream=stream) as p:
        for done in range(0, 100_001, 500):
            p.update(done)
    lines = stream.getvalue().splitlines()
    assert 2 <= len(lines) <= 5
    assert (
        "rows/s" in lines[0]
        and "ETA" in lines[0]
        and lines[-1].startswith("tokenising train: 100,000 rows in")
    )
    quiet = io.StringIO()
    with RowProgress(100, "tokenising train", stream=quiet) as p:  # small: nothing
        p.update(100)
    assert quiet.getvalue() == ""


def test_progress_on_a_terminal_is_a_bar(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats the stream as a terminal
    stream = io.StringIO()
    rows = alpaca_rows(300, seed=2)
    display = RowProgress(len(rows), "tokenising train", stream=stream, min_rows=0)
    parallel.build(
        rows,
        cfg=DataConfig(path="x"),
        tokenizer=tokenizer("tiny"),
        where="x",
        out_dir=tmp_path,
        procs=2,
        display=display,
    )
    shown = stream.getvalue()
    assert "tokenising train" in shown and "300/300" in shown and "/s)" in shown and "ETA" in shown


# ----------------------------------------------------------------------------- one rank tokenises


def _recipe(tmp_path: Path, data: Path, *extra: str) -> R.Recipe:
    return R.load(DEMO, [f"output_dir={tmp_path / 'run'}", f"data.path={data}", "data.max_length=64", *extra])


def _rank(tmp_path: str, data: str, main: bool, queue) -> None:
    from tunefleet.distributed import model as model_mod

    recipe = _recipe(Path(tmp_path), Path(data))
    tok = model_mod.load_tokenizer(model_mod.resolve_model_path(recipe.model), recipe.model)
    try:
        got = prep.load_or_prepare(recipe, tok, main=main, world_size=2, show=False)
        queue.put((main, got.built is not None, got.train.to_list()))
    except DataError as exc:
        queue.put((main, "error", str(exc)))


def _two_ranks(tmp_path: Path, data: Path) -> dict:
    ctx = multiprocessing.get_context("spawn")  # two fresh processes, as two ranks are
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_rank, args=(str(tmp_path), str(data), main, queue)) for main in (False, True)
    ]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        main, built, value = queue.get(timeout=300)
        results[main] = (built, value)
    for p in procs:
        p.join(timeout=60)
    return results


@pytest.mark.slow
def test_the_first_rank_tokenises_and_the_other_waits(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = _data_file(tmp_path)
    results = _two_ranks(tmp_path, data)
    assert results[True][0] is True and results[False][0] is False  # built by rank 0 only
    assert results[True][1] == results[False][1] and len(results[True][1]) == 22


@pytest.mark.slow
def test_the_waiting_rank_stops_when_the_first_fails(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    results = _two_ranks(tmp_path, data)
    assert results[True][0] == "error" and "bad.jsonl row 2" in results[True][1]
    assert results[False][0] == "error"
    assert "the first rank could not tokenise the data" in results[False][1]
    assert "bad.jsonl row 2" in results[False][1]


def test_a_rank_waits_with_a_timeout(tmp_path: Path, monkeypatch, tiny_model_dir: Path) -> None:
    from tunefleet.distributed import model as model_mod

    recipe = _recipe(tmp_path, _data_file(tmp_path))
    tok = model_mod.load_tokenizer(str(tiny_model_dir), recipe.model)
    monkeypatch.setenv("TUNEFLEET_PREPARE_WAIT_S", "1")
    started = time.monotonic()
    with pytest.raises(DataError) as info:
        prep.wait_for_cache(recipe, tok, poll_s=0.1)  # no first rank at all
    assert time.monotonic() - started < 10
    assert "without any sign of progress" in info.value.problem
    assert "tunefleet prepare" in info.value.fix and "share" in info.value.fix


# ----------------------------------------------------------------------------- data.num_proc


def test_num_proc_key(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tunefleet.distributed import model as model_mod

    with pytest.raises(RecipeError, match="data.num_proc"):
        R.load(DEMO, ["output_dir=x", "data.num_proc=0"])
    data = _data_file(tmp_path)
    one, three = _recipe(tmp_path, data, "data.num_proc=1"), _recipe(tmp_path, data, "data.num_proc=3")
    tok = model_mod.load_tokenizer(str(tiny_model_dir), one.model)
    assert prep.fingerprint(one, tok)[0] == prep.fingerprint(three, tok)[0]  # same tokens, same cache
    breaking, harmless = R.resume_diff(R.to_dict(one), three)
    assert breaking == [] and any("data.num_proc" in h for h in harmless)
    assert parallel.default_procs(500, None) == 1  # too few rows to start processes for
    assert parallel.default_procs(10**6, None) == min(parallel.available_cpus(), parallel.MAX_AUTO_PROCS)
    assert parallel.default_procs(500, 3) == 3 and parallel.default_procs(2, 8) == 2


def test_overwrite_keeps_the_cache(tmp_path: Path) -> None:
    from tunefleet.launch.core import rundir

    out = tmp_path / "run"
    (out / ".cache" / "tokenized-abc").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    moved = rundir.move_aside(out)
    prep.keep_cache(moved, out)
    assert (out / ".cache" / "tokenized-abc").is_dir() and (moved / "metrics.jsonl").is_file()


def _metaspace_tokenizer(scheme: str):
    """A SentencePiece-like BPE (spaces as ▁, prepended per the scheme) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.test_data import QWEN25_TEMPLATE, SPECIALS, _corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(prepend_scheme=scheme)
    tok.train_from_iterator(
        _corpus(), trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False)
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN25_TEMPLATE
    )


@pytest.mark.parametrize("scheme", ["first", "always"])
def test_prefixes_from_special_tokens_only_where_the_tokenizer_allows(scheme: str) -> None:
    """A Metaspace pre-tokenizer that prepends only at the very start of a text: a part after a
    special token cannot be tokenised on its own, so whole prefixes are (and the result is the
    reference's either way)."""
    from tunefleet.distributed.data.batched import Encoder

    tok = _metaspace_tokenizer(scheme)
    assert bool(Encoder(tok).anchor_ids) == (scheme == "always")
    _same(chat_rows(40, seed=11), DataConfig(path="x", format="messages", max_length=4096), tok)


def test_the_first_rows_check_catches_a_wrong_fast_path(monkeypatch) -> None:
    """Planted bug: prefixes from special tokens for a tokenizer where that is wrong. Unchecked,
    the ids differ; the check of each process's first rows turns the batched path off, says so,
    and the result is the reference's."""
    from tunefleet.distributed.data import batched as B

    tok = _metaspace_tokenizer("first")
    monkeypatch.setattr(B, "_anchor_ids", lambda t, b: frozenset(b.get_added_tokens_decoder()))
    rows, cfg = chat_rows(40, seed=11), DataConfig(path="x", format="messages", max_length=4096)
    want, _ = D.build_dataset(rows, cfg=cfg, tokenizer=tok, where="gen.jsonl")
    unchecked = Batcher(tok, cfg)
    unchecked.checked_rows = B.CHECK_ROWS
    assert unchecked.rows(rows, 1, "gen.jsonl", Tally()) != want
    got, stats, notes = batched(rows, cfg, tok)
    assert got == want and stats["reference_rows"] > 0
    assert notes and "batched tokenisation turned off" in notes[0]


# ----------------------------------------------------------------------------- data.mixture

ALPACA, CHAT = DEMO_DATA / "alpaca_demo.jsonl", DEMO_DATA / "chat_demo.jsonl"


def _mixture(tmp_path: Path, alpaca: Path = ALPACA, chat: Path = CHAT, *extra: str) -> R.Recipe:
    """The demo recipe over a mixture of alpaca rows (first 40) and chat rows (first 30), 2:1."""
    return R.load(
        DEMO,
        [
            f"output_dir={tmp_path / 'run'}",
            "data.path=",
            f"data.mixture=[{{path: {alpaca}, weight: 2, limit: 40}}, "
            f"{{path: {chat}, format: messages, limit: 30}}]",
            *extra,
        ],
    )


def test_a_mixture_is_tokenised_source_by_source_in_its_own_format(tmp_path: Path) -> None:
    """Each source is tokenised with its own format (as the reference tokenises it alone), laid end
    to end in the cache; its example counts are in meta.json for the sampler; data.eval_ratio holds
    out the first rows of every source."""
    tok = tokenizer("tiny")
    recipe = _mixture(tmp_path, ALPACA, CHAT, "data.eval_ratio=0.1")
    made = prep.make_cache(recipe, tok, show=False)
    want_train, want_eval = [], []
    for source, limit in zip(R.data_sources(recipe.data), (40, 30), strict=True):
        rows = D.load_rows(source.data.path, limit=limit)
        train, held_out = D.split_eval(rows, 0.1)
        want_train += D.build_dataset(train, cfg=source.data, tokenizer=tok, where="x")[0]
        want_eval += D.build_dataset(held_out, cfg=source.data, tokenizer=tok, where="x")[0]
    assert made.train.to_list() == want_train and made.eval.to_list() == want_eval
    assert made.source_examples == [36, 27] and made.eval_row_count == 4 + 3
    assert [s["format"] for s in made.train_sources] == ["alpaca", "messages"]
    assert made.train_stats["rows"] == 63 and made.rows[0] == D.load_rows(str(ALPACA))[4]  # first source
    again = prep.load_cache(made.cache_dir)  # what the other ranks and later runs read
    assert again is not None and again.source_examples == [36, 27]


def test_a_bad_mixture_source_is_named(tmp_path: Path) -> None:
    empty, no_answers = tmp_path / "empty.jsonl", tmp_path / "no_answers.jsonl"
    empty.write_text("\n")
    no_answers.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"data.mixture\[1\].path: '.*empty.jsonl' holds no rows"):
        prep._read_splits(_mixture(tmp_path, ALPACA, empty).data)
    with pytest.raises(
        DataError, match=r"data.mixture\[0\].path: data file '.*missing.jsonl' does not exist"
    ):
        prep._read_splits(_mixture(tmp_path, tmp_path / "missing.jsonl", CHAT).data)
    with pytest.raises(DataError, match="no_answers.jsonl row 1: .*no assistant turn"):
        prep.make_cache(_mixture(tmp_path, ALPACA, no_answers), tokenizer("tiny"), show=False)
    with pytest.raises(DataError, match=r"data.mixture\[1\].path=.*: data.eval_ratio=0.1 of 1 rows"):
        prep._read_splits(_mixture(tmp_path, ALPACA, no_answers, "data.eval_ratio=0.1").data)


def test_the_data_fingerprint_covers_every_source(tmp_path: Path) -> None:
    """Changing one source's bytes changes the fingerprint a resume is checked against (and the
    cache key); the weights are a recipe change (refused on resume by the recipe diff), not a data
    one. A single data.path keeps the fingerprint it had before mixtures existed."""
    import hashlib

    from tunefleet.launch.core.data_identity import data_fingerprint, hash_source

    chat = tmp_path / "chat.jsonl"
    chat.write_bytes(CHAT.read_bytes())
    recipe = _mixture(tmp_path, ALPACA, chat)
    before = data_fingerprint(recipe.data)
    tok = tokenizer("tiny")
    key = prep.fingerprint(recipe, tok)[0]
    assert data_fingerprint(_mixture(tmp_path, ALPACA, chat, "data.max_length=64").data) == before
    reweighted = R.load(
        DEMO, ["output_dir=x", "data.path=", f"data.mixture=[{{path: {ALPACA}}}, {{path: {chat}}}]"]
    )
    assert data_fingerprint(reweighted.data) == before
    assert data_fingerprint(_mixture(tmp_path, chat, ALPACA).data) != before  # the order of the sources
    chat.write_bytes(CHAT.read_bytes().replace(b"Bangkok", b"Bangkoq"))
    assert data_fingerprint(recipe.data) != before and prep.fingerprint(recipe, tok)[0] != key
    single = R.load(DEMO, ["output_dir=x"])
    h = hashlib.sha256()
    hash_source(h, single.data.path, "train")
    assert data_fingerprint(single.data) == h.hexdigest()[:16]


def test_plan_shows_each_source_before_and_after_prepare(
    tmp_path: Path, capsys, tiny_model_dir: Path
) -> None:
    """`tunefleet plan`: rows per source (after its limit and hold-out), weight, the samples and the
    share of each epoch; after `tunefleet prepare`, examples per source."""
    from tunefleet.launch.plan import render_plan
    from tunefleet.launch.plan_inputs import make_plan

    sets = [
        f"output_dir={tmp_path / 'run'}",
        "data.path=",
        f"data.mixture=[{{path: {ALPACA}, weight: 3}}, {{path: {CHAT}, format: messages, limit: 40}}]",
        "data.eval_ratio=0.1",
        "data.max_length=48",
    ]
    plan = make_plan(str(DEMO), sets)
    assert plan["source_rows"] == 136 + 200 and plan["eval_rows"] == 13 + 4  # before the limit
    assert plan["dataset_rows"] == 123 + 36 == sum(m["samples_per_epoch"] for m in plan["mixture"])
    first, second = plan["mixture"]
    assert (first["rows"], first["weight_share"], first["samples_per_epoch"]) == (123, 0.75, 119)
    assert (second["rows"], second["samples_per_epoch"], second["passes_per_epoch"]) == (36, 40, 1.11)
    assert second["share"] == round(40 / 159, 4) and second["format"] == "messages"
    text = render_plan(plan)
    shown = f"{CHAT} (messages): 36 rows, weight 1 -> 25.2% of each epoch (40 samples, 1.11 passes)"
    assert re.search(rf"\n  data\.mixture\[1\] +{re.escape(shown)}\n", text), text
    from tunefleet.launch import cli

    assert cli.main(["prepare", str(DEMO), *[x for s in sets for x in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert f"  data.mixture[0]: {ALPACA} (alpaca): 123 rows -> 123 examples\n" in out
    assert f"  data.mixture[1]: {CHAT} (messages): 36 rows -> " in out
    after = make_plan(str(DEMO), sets)
    examples = [m["rows"] for m in after["mixture"]]
    assert after["data_counted"] == "examples" and sum(examples) == after["dataset_rows"]
    assert examples[0] == 123 and examples[1] < 36  # chat rows lose every answer token at 48 tokens
    assert "examples, weight 1" in render_plan(after)
    heavy = make_plan(str(DEMO), [*sets[:2], sets[2].replace("limit: 40", "limit: 10, weight: 20")])
    assert any("data.mixture[1] (" in w and "times per epoch" in w for w in heavy["warnings"])


# ----------------------------------------------------------------------------- a damaged cache


@pytest.mark.parametrize("damage", ["rewritten", "truncated", "missing", "torn-meta"])
def test_a_damaged_cache_is_found_and_made_again(
    damage: str, tmp_path: Path, capsys, tiny_model_dir: Path
) -> None:
    """Token ids rewritten in place (same size), a truncated or missing shard, a torn meta.json:
    the checksums of meta.json catch each, no rank maps it, and the first rank tokenises again,
    saying so; the new cache holds what the first did."""
    from tunefleet.distributed import model as model_mod

    recipe = _recipe(tmp_path, _data_file(tmp_path))
    tok = model_mod.load_tokenizer(model_mod.resolve_model_path(recipe.model), recipe.model)
    first = prep.make_cache(recipe, tok, show=False)
    want, path = first.train.to_list(), first.cache_dir
    del first
    meta = json.loads((path / prep.META_FILE).read_text())
    shard = path / "train" / meta["train_shards"][0]
    assert (
        prep.cache_problem(path) is None
        and meta["checksums"][f"train/{meta['train_shards'][0]}"]["bytes"] > 0
    )
    blob = shard.read_bytes()
    if damage == "rewritten":  # one token id changed in place, same size: only the checksum can tell
        import pyarrow as pa

        table = pa.ipc.open_stream(blob).read_all()
        ids = table.column("input_ids").to_pylist()
        ids[0][0] = (ids[0][0] + 1) % 100
        column = pa.array(ids, table.schema.field("input_ids").type)
        table = table.set_column(table.schema.get_field_index("input_ids"), "input_ids", column)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        rewritten = sink.getvalue().to_pybytes()
        assert len(rewritten) == len(blob) and rewritten != blob
        shard.write_bytes(rewritten)
    elif damage == "truncated":
        shard.write_bytes(blob[: len(blob) // 2])
    elif damage == "missing":
        shard.unlink()
    else:
        text = (path / prep.META_FILE).read_text()
        (path / prep.META_FILE).write_text(text[: len(text) // 2])
    assert prep.cache_problem(path) is not None
    assert prep.load_cache(path) is None  # no rank maps it (the waiting ones keep waiting)
    capsys.readouterr()
    again = prep.make_cache(recipe, tok, show=False)
    assert f"note: the tokenised cache {path} is damaged (" in capsys.readouterr().out
    assert again.built is not None and again.train.to_list() == want
    assert prep.cache_problem(path) is None


@pytest.mark.slow
def test_prepare_killed_midway_then_rerun_gives_the_same_cache(tmp_path: Path, tiny_model_dir: Path) -> None:
    """SIGKILL while `tunefleet prepare` tokenises (its progress file is there): no cache is
    visible, and the rerun removes the killed build's temporary directory and makes the cache an
    uninterrupted prepare makes."""
    import signal
    import subprocess
    import sys
    import time

    rows = alpaca_rows(8_000, seed=3)
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = [f"data.path={data}", "data.max_length=64", "data.num_proc=1"]

    def prepare(out: Path) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "tunefleet.launch.cli",
            "prepare",
            str(DEMO),
            "--set",
            f"output_dir={out}",
        ]
        return argv + [x for s in sets for x in ("--set", s)]

    out = tmp_path / "killed"
    proc = subprocess.Popen(prepare(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((out / ".cache").glob(".tokenized-*.tmp-*/train/*")):  # tokenising, shards appearing
        assert proc.poll() is None, "prepare ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    cache = out / ".cache"
    assert not [p for p in cache.iterdir() if p.name.startswith("tokenized-")]  # nothing half-visible
    assert list(cache.glob(".tokenized-*.tmp-*"))  # the killed build's leftovers
    from tunefleet.launch import cli

    assert cli.main(prepare(out)[3:]) == 0  # the rerun (in this process: the same command)
    assert not list(cache.glob(".tokenized-*.tmp-*"))
    fresh = tmp_path / "fresh"
    assert cli.main(prepare(fresh)[3:]) == 0
    (a,) = [p for p in cache.iterdir() if p.name.startswith("tokenized-")]
    (b,) = [p for p in (fresh / ".cache").iterdir() if p.name.startswith("tokenized-")]
    assert a.name == b.name
    assert (
        json.loads((a / "meta.json").read_text())["checksums"]
        == json.loads((b / "meta.json").read_text())["checksums"]
    )
