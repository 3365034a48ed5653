"""Generate the bundled demo data in `recipes/data/` (deterministic: same bytes on every run).

    python tools/make_demo_data.py            # rewrite recipes/data/{alpaca_demo,chat_demo}.jsonl, corpus.txt
    python tools/make_demo_data.py --check    # exit 1 if the files on disk differ from what would be written

`alpaca_demo.jsonl` (the data of `recipes/demo.yaml`) holds facts the tiny demo model can learn
in about a minute on a CPU, in a few fixed answer formats: capitals, spelling, plurals, opposites,
each asked once plainly and (but opposites) once more with the subject in the input. Its first rows
are DEMO_PROMPTS, the prompts the demo's `samples.jsonl` and the README show. `chat_demo.jsonl`
holds harder small synthetic tasks (reverse the words, add numbers, uppercase, sort letters, count
words, even/odd, ...) as conversations, for the chat-format tests. `corpus.txt` (the text the demo
tokenizer of `tunefleet.distributed.demo_model` is trained on) is derived from the two JSONL files
plus some generic English sentences and the usual prompt scaffolding (Alpaca headers, chat roles).

Changing this script changes `corpus.txt`, which changes the hash of the demo model's cache
directory: the next `ensure_tiny_llama()` builds a new model.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "recipes" / "data"
SEED = 20240611
N_CHAT = 200

WORDS = [
    "apple",
    "river",
    "green",
    "house",
    "music",
    "light",
    "stone",
    "cloud",
    "table",
    "bread",
    "chair",
    "water",
    "paper",
    "smile",
    "train",
    "horse",
    "ocean",
    "plant",
    "sugar",
    "tiger",
    "lemon",
    "piano",
    "robot",
    "candle",
    "forest",
    "garden",
    "window",
    "rabbit",
    "pencil",
    "silver",
    "yellow",
    "orange",
    "purple",
    "summer",
    "winter",
    "spring",
    "dragon",
    "planet",
    "bottle",
    "basket",
    "blue",
    "red",
    "cat",
    "dog",
    "sun",
    "moon",
    "star",
    "tree",
    "fish",
    "bird",
    "book",
    "door",
    "road",
    "rain",
    "snow",
    "wind",
    "fire",
    "milk",
    "rice",
    "salt",
]
SHORT_WORDS = [w for w in WORDS if 3 <= len(w) <= 6]

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Mexico": "Mexico City",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Russia": "Moscow",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "Indonesia": "Jakarta",
    "the Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Switzerland": "Bern",
    "Cuba": "Havana",
    "Nigeria": "Abuja",
    "Morocco": "Rabat",
    "New Zealand": "Wellington",
    "Iceland": "Reykjavik",
}

PLURALS = {
    "cat": "cats",
    "dog": "dogs",
    "box": "boxes",
    "child": "children",
    "mouse": "mice",
    "city": "cities",
    "leaf": "leaves",
    "tooth": "teeth",
    "foot": "feet",
    "man": "men",
    "woman": "women",
    "bus": "buses",
    "baby": "babies",
    "knife": "knives",
    "sheep": "sheep",
    "fish": "fish",
    "goose": "geese",
    "tomato": "tomatoes",
    "church": "churches",
    "wolf": "wolves",
    "day": "days",
    "key": "keys",
    "book": "books",
    "person": "people",
    "potato": "potatoes",
    "glass": "glasses",
    "story": "stories",
    "hero": "heroes",
    "ox": "oxen",
    "apple": "apples",
    "house": "houses",
    "party": "parties",
    "wish": "wishes",
    "toy": "toys",
    "lady": "ladies",
}

OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "open": "closed",
    "early": "late",
    "full": "empty",
    "hard": "soft",
    "left": "right",
    "win": "lose",
    "strong": "weak",
    "rich": "poor",
    "high": "low",
    "near": "far",
    "wet": "dry",
    "loud": "quiet",
    "first": "last",
    "young": "old",
    "day": "night",
    "true": "false",
    "inside": "outside",
    "push": "pull",
    "buy": "sell",
}

GENERIC_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model can learn simple patterns from a few hundred examples.",
    "Training a language model means predicting the next token again and again.",
    "The weather was cold and windy, so we stayed inside and read a book.",
    "She opened the window and looked at the garden full of flowers.",
    "Every morning he walks to the station and takes the train to work.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The sun rises in the east and sets in the west.",
    "Please answer the question in one short sentence.",
    "Thank you for your help, that was exactly what I needed.",
    "I am not sure about that, but I can try to explain what I know.",
    "Here is a short summary of the main points.",
    "The meeting starts at nine and ends before lunch.",
    "Good answers are short, clear and correct.",
    "Numbers can be added, subtracted, multiplied and divided.",
    "A sentence is made of words, and a word is made of letters.",
    "The library is open from Monday to Friday.",
    "They planted three trees near the old stone bridge.",
    "My favourite colours are blue, green and yellow.",
    "The cat slept on the warm chair all afternoon.",
    "Can you tell me the way to the nearest station?",
    "Yes, of course. Walk straight ahead and turn left at the bank.",
    "No, I do not think that is right.",
    "Learning a new language takes time and practice.",
    "The children played in the park until it started to rain.",
    "He wrote a letter to his friend who lives in another city.",
    "We need bread, milk, eggs and rice from the shop.",
    "The train was late because of the snow.",
    "Music, art and science are taught at the school.",
    "This is a test. This is only a test.",
    "The answer is correct.",
    "Let me think step by step.",
    "First, read the question. Then, write the answer.",
    "The model was trained with a low learning rate for a few hundred steps.",
    "Fine-tuning adapts a pretrained model to a new task.",
    "A tokenizer splits text into tokens and maps each token to an id.",
    "The loss goes down as the model learns.",
    "It is a sunny day, and the sky is clear and blue.",
    "The old man and the young boy went fishing on the lake.",
    "Write a short poem about the sea.",
    "The sea is wide and deep, and the waves never sleep.",
    "What time is it? It is half past seven.",
    "Hello! How can I help you today?",
    "Goodbye, and have a nice day.",
    "The recipe needs two cups of flour, one egg and some sugar.",
    "Computers store numbers as bits, which are zeros and ones.",
    "The capital city is usually the seat of the government.",
    "An even number can be divided by two without a remainder.",
    "An odd number leaves a remainder of one when divided by two.",
    "Most English nouns form the plural by adding the letter s.",
]

ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one short sentence.",
    "You are a friendly tutor who gives short, correct answers.",
    "You are a helpful assistant that follows instructions exactly.",
]

Task = Callable[[random.Random], tuple[str, str, str]]


def _pick_words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


# --- tasks with an input -------------------------------------------------------------------


def task_reverse(rng: random.Random) -> tuple[str, str, str]:
    words = _pick_words(rng, 3, 6)
    instr = rng.choice(
        ["Reverse the order of the words.", "Reverse the words.", "Write these words in reverse order."]
    )
    return instr, " ".join(words), " ".join(reversed(words))


def task_uppercase(rng: random.Random) -> tuple[str, str, str]:
    words = _pick_words(rng, 2, 5)
    instr = rng.choice(
        ["Convert the text to uppercase.", "Convert to uppercase.", "Write this in capital letters."]
    )
    text = " ".join(words)
    return instr, text, text.upper()


def task_sort_letters(rng: random.Random) -> tuple[str, str, str]:
    letters = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(4, 7))
    instr = rng.choice(["Sort these letters in alphabetical order.", "Sort these letters."])
    return instr, " ".join(letters), " ".join(sorted(letters))


def task_count_words(rng: random.Random) -> tuple[str, str, str]:
    words = _pick_words(rng, 2, 9)
    instr = rng.choice(["Count the words.", "How many words are in this text?"])
    return instr, " ".join(words), f"There are {len(words)} words."


def task_add_list(rng: random.Random) -> tuple[str, str, str]:
    nums = [rng.randint(1, 50) for _ in range(rng.randint(2, 4))]
    instr = rng.choice(["Add the numbers.", "What is the sum of these numbers?"])
    return instr, ", ".join(map(str, nums)), f"{' + '.join(map(str, nums))} = {sum(nums)}"


# --- tasks without an input ----------------------------------------------------------------


def task_capital(rng: random.Random) -> tuple[str, str, str]:
    country, city = rng.choice(sorted(CAPITALS.items()))
    instr = rng.choice([f"What is the capital of {country}?", f"Name the capital city of {country}."])
    return instr, "", f"The capital of {country} is {city}."


def task_plural(rng: random.Random) -> tuple[str, str, str]:
    word, plural = rng.choice(sorted(PLURALS.items()))
    instr = rng.choice([f"Give the plural of {word}.", f"What is the plural of the word {word}?"])
    return instr, "", f"The plural of {word} is {plural}."


def task_even(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(0, 199)
    instr = rng.choice([f"Answer yes or no: is {n} even?", f"Is {n} an even number? Answer yes or no."])
    return instr, "", "Yes." if n % 2 == 0 else "No."


def task_opposite(rng: random.Random) -> tuple[str, str, str]:
    word, opp = rng.choice(sorted(OPPOSITES.items()))
    if rng.random() < 0.5:
        word, opp = opp, word
    instr = rng.choice([f"What is the opposite of {word}?", f"Give the opposite of the word {word}."])
    return instr, "", f"The opposite of {word} is {opp}."


def task_add_inline(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    instr = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}."])
    return instr, "", f"{a} + {b} = {a + b}"


def task_first_letter(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return f"What is the first letter of the word {word}?", "", f"The first letter of {word} is {word[0]}."


def task_spell(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(SHORT_WORDS)
    return f"Spell the word {word}.", "", "-".join(word.upper())


def task_bigger(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(1, 1000), 2)
    return f"Which number is bigger, {a} or {b}?", "", f"{max(a, b)} is bigger than {min(a, b)}."


# The chat demo's tasks (a third of them take an input).
WITH_INPUT: list[Task] = [task_reverse, task_uppercase, task_sort_letters, task_count_words, task_add_list]
WITHOUT_INPUT: list[Task] = [
    task_capital,
    task_plural,
    task_even,
    task_opposite,
    task_add_inline,
    task_first_letter,
    task_spell,
    task_bigger,
]


# --- the alpaca demo: facts to memorise, in a few fixed answer formats ------------------------

DEMO_COUNTRIES = [
    "Australia", "Brazil", "Canada", "China", "Cuba", "Egypt", "France", "Germany", "Greece", "Iceland",
    "India", "Ireland", "Italy", "Japan", "Kenya", "Mexico", "Norway", "Peru", "Russia", "Spain",
]  # fmt: skip
SPELL_WORDS = [
    "cat", "dog", "sun", "moon", "star", "tree", "fish", "bird", "book", "door",
    "rain", "snow", "milk", "salt", "apple", "river", "green", "house", "light", "stone",
]  # fmt: skip
DEMO_PLURALS = [
    "mouse", "child", "tooth", "foot", "man", "woman", "goose", "sheep",
    "knife", "leaf", "city", "baby", "box", "bus", "person", "ox",
]  # fmt: skip
DEMO_OPPOSITES = [
    "hot", "big", "up", "fast", "happy", "open", "full", "wet", "early", "strong", "near", "young",
]  # fmt: skip
"""The facts of the alpaca demo, a subset of the tables above: few enough (136 rows) that the tiny
model learns every one of them in about a minute on a CPU."""

DEMO_PROMPTS = [
    "Spell the word cat.",
    "What is the capital of France?",
    "What is the opposite of hot?",
    "What is the plural of mouse?",
]
"""The first rows of the alpaca demo, in this order: the prompts `samples.jsonl` shows at the end of
`make demo`, and the README's `tunefleet generate --compare-base` example."""


def _spelled(word: str) -> str:
    return "-".join(word.upper())


def alpaca_facts() -> list[dict[str, str]]:
    """Every row of the alpaca demo, unordered: each fact once without an input and (capitals,
    spelling, plurals) once more with the subject in the input, so the model sees each fact twice
    and picks up both prompt shapes. Opposites are asked both ways round."""
    rows = []

    def add(instruction: str, inp: str, output: str) -> None:
        rows.append({"instruction": instruction, "input": inp, "output": output})

    for country in DEMO_COUNTRIES:
        city = CAPITALS[country]
        add(f"What is the capital of {country}?", "", f"The capital of {country} is {city}.")
        add("Name the capital city of this country.", country, f"The capital of {country} is {city}.")
    for word in SPELL_WORDS:
        add(f"Spell the word {word}.", "", _spelled(word))
        add("Spell this word.", word, _spelled(word))
    for word in DEMO_PLURALS:
        plural = PLURALS[word]
        add(f"What is the plural of {word}?", "", f"The plural of {word} is {plural}.")
        add("Give the plural of this word.", word, f"The plural of {word} is {plural}.")
    for word in DEMO_OPPOSITES:
        opposite = OPPOSITES[word]
        add(f"What is the opposite of {word}?", "", f"The opposite of {word} is {opposite}.")
        add(f"What is the opposite of {opposite}?", "", f"The opposite of {opposite} is {word}.")
    return rows


def make_alpaca(rng: random.Random) -> list[dict[str, str]]:
    """The facts shuffled, with DEMO_PROMPTS' rows first (the rows `samples.jsonl` shows)."""
    rows = alpaca_facts()
    first = {row["instruction"]: row for row in rows if row["instruction"] in DEMO_PROMPTS}
    rest = [row for row in rows if row["instruction"] not in first]
    rng.shuffle(rest)
    return [first[prompt] for prompt in DEMO_PROMPTS] + rest


def _user_text(instr: str, inp: str) -> str:
    return f"{instr}\n\n{inp}" if inp else instr


def make_chat(rng: random.Random, n: int = N_CHAT) -> list[dict[str, list[dict[str, str]]]]:
    tasks = WITH_INPUT + WITHOUT_INPUT
    rows = []
    for i in range(n):
        messages: list[dict[str, str]] = []
        if i % 2 == 0:  # exactly half with a system prompt
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(rng.choice([1, 1, 2, 2, 3])):
            instr, inp, out = rng.choice(tasks)(rng)
            messages.append({"role": "user", "content": _user_text(instr, inp)})
            messages.append({"role": "assistant", "content": out})
        rows.append({"messages": messages})
    rng.shuffle(rows)
    return rows


def make_corpus(alpaca: list[dict[str, str]], chat: list[dict]) -> str:
    lines: list[str] = []
    lines += GENERIC_SENTENCES
    lines += [ALPACA_HEADER, ALPACA_HEADER_INPUT, "### Instruction:", "### Input:", "### Response:"]
    lines += ["system", "user", "assistant", "System:", "User:", "Assistant:"]
    lines += "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789".split()
    for row in alpaca:
        lines.append(f"### Instruction:\n{row['instruction']}")
        if row["input"]:
            lines.append(f"### Input:\n{row['input']}")
        lines.append(f"### Response:\n{row['output']}")
    for row in chat:
        for m in row["messages"]:
            lines.append(f"{m['role']}\n\n{m['content']}")
    lines += GENERIC_SENTENCES
    return "\n".join(lines) + "\n"


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def render() -> dict[str, str]:
    """File name -> exact text content of every bundled data file."""
    alpaca = make_alpaca(random.Random(SEED))
    chat = make_chat(random.Random(SEED + 1))
    return {
        "alpaca_demo.jsonl": _jsonl(alpaca),
        "chat_demo.jsonl": _jsonl(chat),
        "corpus.txt": make_corpus(alpaca, chat),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    ap.add_argument("--out", type=Path, default=DATA_DIR, help=f"output directory (default: {DATA_DIR})")
    args = ap.parse_args(argv)
    files = render()
    stale = []
    for name, text in files.items():
        path = args.out / name
        if args.check:
            if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
                stale.append(name)
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text.encode("utf-8"))
            print(f"wrote {path} ({len(text.encode('utf-8'))} bytes)")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python tools/make_demo_data.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
