import warnings, time, torch, copy
warnings.simplefilter("ignore")
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, get_peft_model, PeftModel
from tunefleet.distributed.demo_model import ensure_tiny_llama
d = ensure_tiny_llama()
from transformers import AutoConfig
cfg = AutoConfig.from_pretrained(d)
tok = AutoTokenizer.from_pretrained(d)
ids = tok("### Instruction:\nSpell the word cat.\n\n### Response:\nC A T", return_tensors="pt")
def base():
    return AutoModelForCausalLM.from_pretrained(d)
def randomize(m):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad: p.add_(torch.randn_like(p) * 0.05)
for name, kw in {


  "tokens": dict(target_modules=["q_proj"], trainable_token_indices=[5, 10, 1917]),
  "rank_pattern": dict(target_modules="all-linear", rank_pattern={"layers.0.self_attn.q_proj": 4, "mlp": 2}, alpha_pattern={"down_proj": 8}),
}.items():
    torch.manual_seed(0)
    m = get_peft_model(base(), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, **kw))
    randomize(m)
    print(name, m.get_nb_trainable_parameters(), m.base_model.model.config.num_hidden_layers)
    m.save_pretrained(f".scratch/ad_{name}")
    with torch.no_grad():
        want = m(**ids).logits
    if name == "replication_fixed":
        layers = m.base_model.model.model.layers
        m.base_model.model.model.layers = torch.nn.ModuleList(copy.deepcopy(l) for l in layers)
        with torch.no_grad():
            print("  after unshare diff", (m(**ids).logits - want).abs().max().item())
    merged = m.merge_and_unload()
    merged.save_pretrained(f".scratch/merged_{name}")
    with torch.no_grad():
        print("  saved reload diff", (AutoModelForCausalLM.from_pretrained(f".scratch/merged_{name}")(**ids).logits - want).abs().max().item())
    with torch.no_grad():
        got = merged(**ids).logits
    print("  merge diff", (want-got).abs().max().item())
    from peft import AutoPeftModelForCausalLM
    re = AutoPeftModelForCausalLM.from_pretrained(f".scratch/ad_{name}")
    with torch.no_grad():
        print("  reload diff", (re(**ids).logits - want).abs().max().item())
    # meta
    with torch.device("meta"):
        mm = AutoModelForCausalLM.from_config(cfg)
        pm = get_peft_model(mm, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, **kw))
        print("  meta", pm.get_nb_trainable_parameters())
