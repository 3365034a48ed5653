#!/bin/bash
# every LoRA variant under FSDP2 (CPU layer), ZeRO-3, ZeRO-2 (optimizers) and a 4-bit base
cd /work/wt-lora
COMMON=(--set data.limit=64 --set train.max_steps=3 --set train.save_steps=2 --set train.logging_steps=1 --set batch.micro_batch_size=4 --set batch.global_batch_size=8 --set data.max_length=128)
declare -A V
V[eva]="peft.init=eva|peft.r=4"
V[loraplus]="peft.loraplus_lr_ratio=16"
V[lorafa]="peft.lora_fa=true"
V[alora]='peft.alora_invocation="### Response:\n"'
V[patterns]="peft.rank_pattern={q_proj: 4, down_proj: 8}|peft.alpha_pattern={down_proj: 8}"
V[replication]="peft.layer_replication=[[0,2],[1,2]]"
V[tokens]="peft.trainable_token_indices=[5,10,1917]"
V[params]="model.name_or_path=$PWD/runs/tiny-oss|model.attn_implementation=eager|peft.target_modules=[q_proj,v_proj]|peft.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]"
for combo in "$@"; do
  name=${combo%%:*}; mode=${combo##*:}
  sets=()
  IFS='|' read -ra parts <<< "${V[$name]}"
  for p in "${parts[@]}"; do sets+=(--set "$p"); done
  out=runs/compat/$name-$mode
  case $mode in
    fsdp) cmd=(.venv/bin/tunefleet launch recipes/demo.yaml --nproc 2 --set parallel.strategy=fsdp) ;;
    zero3) cmd=(.venv/bin/tunefleet launch recipes/demo.yaml --nproc 2 --set parallel.strategy=deepspeed-zero3) ;;
    zero2) cmd=(.venv/bin/tunefleet launch recipes/demo.yaml --nproc 2 --set parallel.strategy=deepspeed-zero2) ;;
    ddp) cmd=(.venv/bin/tunefleet launch recipes/demo.yaml --nproc 2) ;;
    single) cmd=(.venv/bin/tunefleet train recipes/demo.yaml) ;;
    nf4) cmd=(.venv/bin/tunefleet train recipes/demo.yaml --set model.quantization=nf4 --set model.dtype=bfloat16 --set model.compute_dtype=bfloat16) ;;
  esac
  start=$(date +%s)
  timeout 900 "${cmd[@]}" "${COMMON[@]}" "${sets[@]}" --set output_dir=$out --overwrite > runs/compat-$name-$mode.log 2>&1
  rc=$?
  echo "MATRIX $name $mode rc=$rc $(( $(date +%s) - start ))s losses=$(python3 -c "
import json,sys
try: print([round(json.loads(l)['loss'],4) for l in open('$out/metrics.jsonl') if 'loss' in l])
except Exception as e: print('-')
")" | tee -a runs/matrix.txt
done
