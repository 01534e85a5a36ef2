#!/usr/bin/env bash
# The GPU check: one script, one device (H100/H200), at most about 8 minutes, no network.
#   bash bench/gpu_check.sh        # writes bench/results/gpu_*.json, one summary line per figure
# Without CUDA it prints one line and exits 0 within seconds.
#
# 1. training: the trainer's own IRIS step on a random Qwen2.5-3B-shaped model (RMSprop, global
#    batch 64, micro-batch 8, length-sorted micro-batches, bf16 autocast, gradient checkpointing),
#    both ways: graphs kept (--scoring-pass never) and the scoring pass (always), against padded
#    and packed SFT steps: tokens/s, MFU, each step's peak memory above its start against
#    trainer.graph_memory's estimate, what --scoring-pass auto would decide, padding, ratios;
# 2. generation: vLLM against transformers tokens/s through generation.generate (where vLLM imports);
# 3. end to end: one iteration of run_iris.py on a tiny model with each generator.
set -u
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device on this machine; nothing measured (exit 0)"
    exit 0
fi
mkdir -p bench/results
failed=0
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    if ! timeout "$limit" "$@" 2>&1 | tee "bench/results/gpu_${name}.log" | grep -E "^(training|gpu|opponent|generation|end to end)"; then
        echo "gpu_check: $name FAILED or produced no summary; see bench/results/gpu_${name}.log"
        failed=1
    fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /'
# 4 steps (kept graphs, scoring pass, padded SFT, packed SFT) x (1 warm-up + 2 timed) of ~70k tokens: ~1 min at 40% MFU
step training 180 python bench/throughput.py --device cuda --model-config bench/configs/qwen2.5-3b-shaped.json --steps 2 \
    --checkpointing on
step generation 150 python bench/gpu_generation.py --prompts 256 --max-new-tokens 128

# 3. one end-to-end iteration per generator: a tiny checkpoint, the toy data, the real CLI.
tiny=$(mktemp -d)
python -c "from iris_ref.tiny import save_tiny_checkpoint; save_tiny_checkpoint('$tiny/model')"
for generator in hf vllm; do
    out="$tiny/run-$generator"
    start=$(date +%s)
    limit=$([ "$generator" = vllm ] && echo 90 || echo 45)  # step limits add up to 7.75 minutes
    if timeout "$limit" python run_iris.py --model "$tiny/model" --dataset iris_ref/toy_data/train.jsonl \
        --eval-dataset iris_ref/toy_data/heldout.jsonl --config tiny --iters 1 --num-samples 256 \
        --eval-num-samples 64 --generator "$generator" --output-dir "$out" > "bench/results/gpu_e2e_$generator.log" 2>&1; then
        echo "end to end ($generator): one iteration in $(( $(date +%s) - start )) s, $(python -c "import json; s=json.load(open('$out/summary.json')); e=s['iterations'][-1]; print(f\"held-out NLL {e.get('heldout_nll', float('nan')):.4f}, peak memory {e.get('peak_memory_mb', 0):.0f} MB\")")"
    else
        echo "end to end ($generator): FAILED, see bench/results/gpu_e2e_$generator.log"
        failed=1
    fi
done
exit $failed
