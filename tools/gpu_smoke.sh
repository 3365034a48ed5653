#!/usr/bin/env bash
# First contact with a GPU: the GPU-only tests, then short `tunefleet launch --gpus 1` runs of the
# paths that have never run on a GPU, each with its exit code, the sharding recorded in plan.json
# and the peak GPU memory the run recorded (torch.cuda.max_memory_allocated, after loading and at
# the end). About ten minutes on one GPU with the locally built tiny demo model; nothing is
# downloaded.
#
#   tools/gpu_smoke.sh                      # from the repository root, .venv with a CUDA torch
#   PYTHON=/path/to/python RUN_TIMEOUT_S=300 SMOKE_DIR=runs/gpu-smoke tools/gpu_smoke.sh
#
# A failing or hanging run (timeout per run) is reported and the next one runs; the exit code is
# the number of failed steps (0: all passed). The runs are the ones tests/test_gpu.py checks
# (SMOKE_RUNS there; tests/test_gpu_smoke_script.py keeps the two lists equal).
set -u

cd "$(dirname "$0")/.." || exit 1
PYTHON="${PYTHON:-.venv/bin/python}"
SMOKE_DIR="${SMOKE_DIR:-runs/gpu-smoke}"
RUN_TIMEOUT_S="${RUN_TIMEOUT_S:-300}"
PYTEST_TIMEOUT_S="${PYTEST_TIMEOUT_S:-900}"
RECIPE="recipes/demo.yaml"
# short runs: 4 optimizer steps, a checkpoint at step 2 (the save path of each strategy), bf16
# unless a case says otherwise (model.dtype follows the precision)
COMMON=(
  train.max_steps=4 train.logging_steps=1 train.save_steps=2 train.warmup_ratio=0
  data.limit=64 data.max_length=128 batch.micro_batch_size=4 batch.global_batch_size=8
  train.precision=bf16 model.dtype=auto
)

mkdir -p "$SMOKE_DIR"
failed=0
summary=()

report() {  # name, exit code, output dir: one summary line from the run's plan.json
  local line
  line="$("$PYTHON" - "$1" "$2" "$3/plan.json" <<'PY'
import json, sys
name, rc, path = sys.argv[1:4]
try:
    plan = json.load(open(path))
except (OSError, ValueError):
    plan = {}
effect = plan.get("in_effect", {})
estimate = (plan.get("memory") or {}).get("total_gib")
sharding = effect.get("sharding", {})
kind = sharding.get("kind", "?")
if "sharded_params" in sharding:
    kind += f" ({sharding['sharded_params']}/{sharding['params']} params sharded)"
elif "partitioned_params" in sharding:
    kind += f" ({sharding['partitioned_params']}/{sharding['params']} params partitioned)"
def gib(key):
    value = effect.get(key)
    return "?" if value is None else f"{value:.2f} GiB"
print(f"{name:<16} exit {rc:>3}  sharding {kind:<44} peak GPU after load {gib('gpu_peak_after_load_gib'):>10}, "
      f"at the end {gib('gpu_peak_gib'):>10}"
      + (f" (estimate {estimate:.2f} GiB, {100 * (estimate - effect['gpu_peak_gib']) / effect['gpu_peak_gib']:+.0f}%)"
         if estimate and effect.get("gpu_peak_gib") else "")
      + f"  trainable {','.join(effect.get('trainable_dtypes', [])) or '?'}"
      f"  weights {effect.get('model_dtype', '?')}")
PY
)"
  echo "$line"
  summary+=("$line")
}

run_case() {  # name, then the case's --set values
  local name="$1"
  shift
  local out="$SMOKE_DIR/$name"
  local args=()
  local value
  for value in "${COMMON[@]}" "$@"; do args+=(--set "$value"); done
  echo "=== $name: $*"
  timeout --kill-after=30 "$RUN_TIMEOUT_S" "$PYTHON" -m tunefleet.launch.cli launch "$RECIPE" --gpus 1 \
    --overwrite --set "output_dir=$out" "${args[@]}" >"$SMOKE_DIR/$name.log" 2>&1
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    failed=$((failed + 1))
    echo "--- $name failed (exit $rc; 124: timed out after ${RUN_TIMEOUT_S} s); last lines of $SMOKE_DIR/$name.log:"
    grep -v "gemm_4bit" "$SMOKE_DIR/$name.log" | tail -n 15
  fi
  report "$name" "$rc" "$out"
}

echo "=== nvidia-smi"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

echo "=== pytest -m gpu"
timeout --kill-after=30 "$PYTEST_TIMEOUT_S" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py \
  >"$SMOKE_DIR/pytest-gpu.log" 2>&1
pytest_rc=$?
tail -n 25 "$SMOKE_DIR/pytest-gpu.log"
if [ "$pytest_rc" -ne 0 ]; then failed=$((failed + 1)); fi
summary+=("pytest -m gpu    exit $pytest_rc")

# SMOKE_RUNS: name, then the --set values (tests/test_gpu.py has the same list)
run_case fsdp-qlora parallel.strategy=fsdp-qlora model.quantization=nf4 train.optimizer=adamw_torch
run_case fsdp-qdora parallel.strategy=fsdp-qlora model.quantization=nf4 train.optimizer=adamw_torch peft.method=dora
run_case fsdp1 parallel.strategy=fsdp parallel.fsdp_version=1
run_case fsdp2-ckpt parallel.strategy=fsdp train.gradient_checkpointing=true
run_case zero3-qlora parallel.strategy=deepspeed-zero3 model.quantization=nf4
run_case zero3-offload parallel.strategy=deepspeed-zero3 parallel.offload=optimizer train.optimizer=adamw_torch
run_case fp16-qlora model.quantization=nf4 train.precision=fp16
run_case full-fsdp2 parallel.strategy=fsdp peft.method=full train.lr=1e-4
run_case full-zero3 parallel.strategy=deepspeed-zero3 peft.method=full train.lr=1e-4
run_case freeze-fsdp2 parallel.strategy=fsdp peft.method=freeze peft.trainable_layers=1 train.lr=1e-4
run_case freeze-zero3 parallel.strategy=deepspeed-zero3 peft.method=freeze peft.trainable_layers=1 train.lr=1e-4

echo
echo "=== summary ($failed failed)"
printf '%s\n' "${summary[@]}"
exit "$failed"
