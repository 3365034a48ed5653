import warnings, torch; warnings.simplefilter("ignore")
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from peft import LoraConfig, get_peft_model
tok = AutoTokenizer.from_pretrained("runs/tiny-oss")
m = AutoModelForCausalLM.from_pretrained("runs/tiny-oss")
pm = get_peft_model(m, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
pm.eval()
a = tok("### Instruction:\nSay hi.\n\n### Response:\n")["input_ids"]
b = tok("### Instruction:\nName two colours of the sky at night.\n\n### Response:\n")["input_ids"]
w = max(len(a), len(b)); pad = tok.eos_token_id
ids = torch.tensor([[pad]*(w-len(x)) + x for x in (a, b)]); mask = torch.tensor([[0]*(w-len(x)) + [1]*len(x) for x in (a, b)])
cfg = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=[pad], pad_token_id=pad, use_cache=True)
for name, model in (("base", m), ("peft", pm)):
    try:
        print(name, model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg).shape)
    except Exception as e:
        import traceback; traceback.print_exc(limit=-4)
pm.config.output_router_logits = True
try:
    print("router logits on", pm.generate(input_ids=ids, attention_mask=mask, generation_config=cfg).shape)
except Exception as e:
    print("router logits on:", type(e).__name__, e)
