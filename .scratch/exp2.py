import warnings; warnings.simplefilter("ignore")
from transformers import AutoModelForCausalLM, AutoConfig
from peft import LoraConfig, get_peft_model
from tunefleet.distributed.demo_model import ensure_tiny_llama
cfg = AutoConfig.from_pretrained(ensure_tiny_llama())
m = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj"], trainable_token_indices=[5, 10, 1917]))
for n, p in m.named_parameters():
    if p.requires_grad: print(n, tuple(p.shape))
print(m.get_nb_trainable_parameters())
