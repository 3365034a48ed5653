import warnings, time, torch
warnings.simplefilter("ignore")
from transformers import AutoModelForCausalLM, AutoTokenizer, GptOssConfig
from peft import LoraConfig, get_peft_model, AutoPeftModelForCausalLM
from tunefleet.distributed.demo_model import ensure_tiny_llama
tok = AutoTokenizer.from_pretrained(ensure_tiny_llama())
cfg = GptOssConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, layer_types=["sliding_attention","full_attention"], sliding_window=32, max_position_embeddings=1024, tie_word_embeddings=False, attn_implementation="eager", rope_parameters={"rope_type":"default","rope_theta":10000.0})
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(cfg)
m.save_pretrained(".scratch/tiny-oss"); tok.save_pretrained(".scratch/tiny-oss")
for n, p in m.named_parameters():
    if "layers.0" in n: print(n, tuple(p.shape))
ids = tok("### Instruction:\nSpell the word cat.\n\n### Response:\nC A T", return_tensors="pt")
lc = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj","v_proj"], target_parameters=["mlp.experts.gate_up_proj","mlp.experts.down_proj"])
pm = get_peft_model(AutoModelForCausalLM.from_pretrained(".scratch/tiny-oss"), lc)
print(pm.get_nb_trainable_parameters())
for n, p in pm.named_parameters():
    if p.requires_grad and "layers.0" in n: print(" ", n, tuple(p.shape))
opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
for i in range(5):
    out = pm(**ids, labels=ids["input_ids"])
    out.loss.backward(); opt.step(); opt.zero_grad(); print("loss", out.loss.item())
pm.eval()
with torch.no_grad(): want = pm(**ids).logits
pm.save_pretrained(".scratch/ad_oss")
re = AutoPeftModelForCausalLM.from_pretrained(".scratch/ad_oss")
with torch.no_grad(): print("reload diff", (re(**ids).logits - want).abs().max().item())
mg = pm.merge_and_unload()
with torch.no_grad(): print("merge diff", (mg(**ids).logits - want).abs().max().item())
with torch.device("meta"):
    mm = AutoModelForCausalLM.from_config(cfg)
    print("meta", get_peft_model(mm, lc).get_nb_trainable_parameters())
# names that do not exist
try:
    get_peft_model(AutoModelForCausalLM.from_pretrained(".scratch/tiny-oss"), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.nope"]))
    print("nope accepted")
except Exception as e: print("nope:", type(e).__name__, str(e)[:200])
