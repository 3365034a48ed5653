import time, warnings; warnings.simplefilter("ignore")
from pathlib import Path
from tests.test_train import quick
from tunefleet.distributed import model as model_mod, eva, sft
from tunefleet.distributed.prepare import load_or_tokenize
from tunefleet.launch.preflight import preflight, batch_plan
from tunefleet.launch.core.hardware import Hardware
from tunefleet.launch.core.args import StartOptions
import sys
r = quick(Path("runs/evadiag"), "data.limit=64", "peft.init=eva", *sys.argv[1:])
prec = model_mod.resolve_precision(r)
path = model_mod.resolve_model_path(r.model)
tok = model_mod.load_tokenizer(path, r.model)
data = load_or_tokenize(r, tok)
from tunefleet.launch.core.batch import plan_batch, plan_schedule
bp = plan_batch(micro_batch_size=r.batch.micro_batch_size, global_batch_size=r.batch.global_batch_size, max_length=r.data.max_length, world_size=1)
sch = plan_schedule(dataset_rows=len(data.train), global_batch_size=bp.global_batch_size, epochs=1, max_steps=-1, warmup_ratio=0)
m = model_mod.apply_peft(model_mod.load_model(path, r, prec), r)
mbs = eva.first_micro_batches(len(data.train), batch=bp, steps_per_epoch=sch.steps_per_epoch, seed=42)
need = eva.components_needed(m)
kept = eva.eva_batches(data.train, mbs, need)
print("micro batches", len(mbs), "needed", need, "kept", len(kept))
import peft.tuners.lora.eva as E
n = {"fwd": 0}
orig = E.forward_fn_dict
def counting(model, inputs):
    n["fwd"] += 1
    if n["fwd"] % 20 == 0: print("forwards", n["fwd"], time.time() - t0, flush=True)
    return orig(model, inputs)
t0 = time.time()
from torch.utils.data import DataLoader
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
loader = DataLoader(data.train, batch_sampler=kept, collate_fn=DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))
sd = E.get_eva_state_dict(m, loader, forward_fn=counting, gather_distributed_inputs=False, show_progress_bar=False)
print("done", n, time.time() - t0, {k: v.shape[0] for k, v in sd.items()})
