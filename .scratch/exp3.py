import warnings, time, torch
warnings.simplefilter("ignore")
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, get_peft_model, AutoPeftModelForCausalLM
from tunefleet.distributed.demo_model import ensure_tiny_llama
d = ensure_tiny_llama()
tok = AutoTokenizer.from_pretrained(d)
ids = tok("### Instruction:\nSpell the word cat.\n\n### Response:\nC A T", return_tensors="pt")
for init, extra in [("pissa", {}), ("olora", {})]:
    torch.manual_seed(0)
    t = time.time()
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(d), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=init, **extra))
    print(init, "init s", time.time() - t)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad: p.add_(torch.randn_like(p) * 0.05)
        want = m(**ids).logits
    m.save_pretrained(f".scratch/ad_{init}")
    re = AutoPeftModelForCausalLM.from_pretrained(f".scratch/ad_{init}")
    with torch.no_grad():
        print("  reload diff", (re(**ids).logits - want).abs().max().item())
    merged = m.merge_and_unload()
    with torch.no_grad():
        print("  merge diff", (merged(**ids).logits - want).abs().max().item())
