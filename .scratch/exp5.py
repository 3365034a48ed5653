import warnings; warnings.simplefilter("ignore")
from transformers import AutoTokenizer
from tunefleet.distributed.demo_model import ensure_tiny_llama
from tunefleet.distributed import data as data_mod
import json
tok = AutoTokenizer.from_pretrained(ensure_tiny_llama())
for s in ["### Response:\n", "### Response:", "\n### Response:\n", "Response:"]:
    t = tok.encode(s, add_special_tokens=False)
    print(repr(s), t, [tok.decode([i]) for i in t])
row = json.loads(open("recipes/data/alpaca_demo.jsonl").readline())
ex = data_mod.tokenize_example(row, fmt="alpaca", tokenizer=tok, max_length=256)
ids = ex["input_ids"]; print([tok.decode([i]) for i in ids][:60])
first = next(i for i, l in enumerate(ex["labels"]) if l != -100); print("first label", first, repr(tok.decode(ids[first-4:first+1])))
