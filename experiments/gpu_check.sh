#!/usr/bin/env bash
# The project's checks on one CUDA GPU, in one command and one report file (docs/performance.md,
# "On a GPU"). Under 8 minutes was the aim on one H100 or H200; each part has its own time limit.
#
#     bash experiments/gpu_check.sh [REPORT]        # default REPORT: gpu_check_report.txt
#
# 1. the suite (test_all.py) on the GPU machine: the CUDA tests run, the CPU tests say so
# 2. experiments/bench.py --device cuda, fp32 and bf16, at batch 16 and 128 (GPT-2 small shape)
# 3. a 50-step `ppo_rlhf.py --tiny --device cuda`, fp32 and bf16
# 4. `torchrun --nproc_per_node 1 ppo_rlhf.py --tiny --device cuda --fsdp` for 5 steps: FSDP2 over
#    NCCL, with the memory line (measured / planned bytes, and the allocator's peak)
# Run from the repository root, in the environment of requirements.txt.
set -uo pipefail
report="${1:-gpu_check_report.txt}"
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "experiments/gpu_check.sh: this machine has no CUDA GPU (torch.cuda.is_available() is False): run it on one that has"
    exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out="$(mktemp -d)"
part() {  # part TITLE SECONDS COMMAND...: run it, keep its last lines and its time in the report
    local title="$1" limit="$2"; shift 2
    local start=$SECONDS
    echo "== $title" | tee -a "$report"
    timeout "$limit" "$@" > "$out/part.log" 2>&1
    local code=$?
    tail -n 25 "$out/part.log" >> "$report"
    echo "-- exit $code after $((SECONDS - start)) s" | tee -a "$report"
}
{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null)"
    python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
} > "$report"
part "suite" 300 python -m pytest -q -x test_all.py
for dtype in fp32 bf16; do
    for batch in 16 128; do
        part "bench gpt2 $dtype batch $batch" 120 python -m experiments.bench --device cuda --dtype "$dtype" --batch-size "$batch" --iters 5
    done
done
for dtype in fp32 bf16; do
    part "tiny 50 steps $dtype" 120 python ppo_rlhf.py --tiny --device cuda --dtype "$dtype" --output-dir "$out/tiny-$dtype"
done
part "torchrun 1 process --fsdp, 5 steps" 120 python -m torch.distributed.run --standalone --nproc_per_node 1 \
    ppo_rlhf.py --tiny --device cuda --fsdp --steps 5 --eval-prompts 0 --output-dir "$out/fsdp"
grep -h "memory on rank 0" "$out/part.log" >> "$report"
echo "report: $report"
