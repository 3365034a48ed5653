import warnings, torch; warnings.simplefilter("ignore")
from pathlib import Path
from peft import AutoPeftModelForCausalLM
from tests.test_lora_variants import eval_loss, metrics
out = Path("/tmp/pytest-of-root/pytest-88/test_target_parameters_train_t0/run")
print("run", [r["eval_loss"] for r in metrics(out) if r.get("eval_loss") is not None])
for attn in (None, "eager", "sdpa"):
    kw = {"attn_implementation": attn} if attn else {}
    m = AutoPeftModelForCausalLM.from_pretrained(out / "final", **kw)
    print(attn, m.config._attn_implementation, eval_loss(m, out))
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(out / "final")
m = AutoPeftModelForCausalLM.from_pretrained(out / "final", attn_implementation="eager")
ids = tok("### Instruction:\nSay hi.\n\n### Response:\n", return_tensors="pt")
try:
    print(m.generate(**ids, max_new_tokens=5, do_sample=False))
except Exception as e:
    import traceback; traceback.print_exc()
