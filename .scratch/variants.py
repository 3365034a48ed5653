import sys, time, json, traceback
from pathlib import Path
from tests.test_train import quick
from tunefleet.distributed import sft
V = {
 "eva": ["peft.init=eva"],
 "loraplus": ["peft.loraplus_lr_ratio=16"],
 "lorafa": ["peft.lora_fa=true"],
 "alora": ['peft.alora_invocation="### Response:\\n"'],
 "patterns": ["peft.rank_pattern={'layers\\.0\\.self_attn\\.q_proj': 4, 'mlp\\..*': 8}", "peft.alpha_pattern={down_proj: 8}"],
 "replication": ["peft.layer_replication=[[0,2],[1,2]]"],
 "tokens": ["peft.trainable_token_indices=[5,10,1917]"],
}
names = sys.argv[1:] or list(V)
for name in names:
    out = Path(f"runs/v-{name}")
    t = time.time()
    try:
        rc = sft.run(quick(out, "data.limit=64", "train.max_steps=4", *V[name]), overwrite=True)
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        print("RESULT", name, rc, [round(r["loss"], 3) for r in rows if "loss" in r], round(time.time() - t), flush=True)
    except Exception as e:
        traceback.print_exc()
        print("RESULT", name, "FAILED", type(e).__name__, str(e)[:500], flush=True)
