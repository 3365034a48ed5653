import warnings, torch; warnings.simplefilter("ignore")
from pathlib import Path
from peft import AutoPeftModelForCausalLM
from tests.test_lora_variants import eval_loss, metrics
out = Path("/tmp/pytest-of-root/pytest-88/test_target_parameters_train_t0/run")
m = AutoPeftModelForCausalLM.from_pretrained(out / "final")
m.config.use_cache = False
print("no cache", eval_loss(m, out))
m.base_model.model.config.use_cache = False
print("no cache base", eval_loss(m, out))
