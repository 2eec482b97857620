#!/usr/bin/env bash
# The GPU checks of the phased-engine and overlap issues, as one script for a lent GPU machine (see docs/benchmarks.md):
# world size 1 on NCCL, DeepSeek-V2-Lite layer shapes (hidden 2048, expert FFN 1408, 64 experts, top-6),
# 16,384 tokens routed by the trace's layer 12, bf16.
#   bash launch/gpu_checks.sh [TRACE] [RESULTS_DIR]
# Needs torch with CUDA, numpy, pyyaml, pytest, tqdm (installs nothing). Every step has its own time limit
# and log, so one failing step does not hide the others' results.
set -u
TRACE=${1:-../shared/traces/deepseek_v2_lite_prefill_dev.npz}
RES=${2:-${OUT:-out/gpu_checks}}
mkdir -p "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python || command -v python3)}
SHAPES=(--hidden-size 2048 --ffn-hidden-size 1408)

step() {  # step NAME LIMIT_S CMD...: run CMD, log to RES/NAME.log, keep going on failure
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$RES/steps.txt"
  tail -n 40 "$RES/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), \
torch.cuda.get_device_capability(), 'grouped_mm', hasattr(torch, '_grouped_mm'))"; } >"$RES/machine.txt" 2>&1
cat "$RES/machine.txt"

# CUDA tests: local experts (bf16 grouped path vs float64); then the layer on NCCL (every dispatcher vs
# float64, micro-batches in flight, the pipelined layer's split backward, also with every collective held
# back on the GPU). Test names are printed (-v); a test that hangs past 120 s dumps every thread's stack,
# the autograd device thread's included, and at 150 s pytest-timeout (where installed; its thread method
# also ends a main thread blocked in the autograd engine) stops the run, else the step's limit does.
step pytest_experts 180 $PY -m pytest -q -p no:cacheprovider tests/test_experts.py
step pytest_cuda_layer 360 $PY -m pytest -v -p no:cacheprovider -o faulthandler_timeout=120 \
  -o timeout=150 -o timeout_method=thread tests/test_cuda_layer.py
# Grouped-GEMM experts alone: 16,384 tokens x top-6 rows, uniform over the 64 experts.
step bench_experts 180 $PY -m c2r_comm bench-experts --device cuda --dtype bfloat16 --rows 98304 \
  --num-experts 64 "${SHAPES[@]}" --iters 20 --warmup 3 --json "$RES/bench_experts.json"
# The layer per dispatcher: fwd+bwd, phases (experts alone on the trace's rows; dispatch + combine), profile.
for d in dedup alltoall hierarchical; do
  step "bench_$d" 240 $PY -m c2r_comm bench --topology 1x1 --device cuda --dtype bfloat16 "${SHAPES[@]}" \
    --tokens-per-rank 16384 --trace "$TRACE" --layer 12 --dispatcher "$d" --iters 20 --warmup-iters 3 \
    --phases --json "$RES/bench_$d.json" --profile "$RES/profile"
done
rm -f "$RES"/profile/*.json  # Chrome traces are large; the tables say where time goes
# The overlap scheduler on NCCL (issue 11): C = 2 at world size 1 against the serial layer of the same run
# (its CUDA tests, tests/test_cuda_layer.py::test_pipelined_layer_*, ran in the step pytest_cuda_layer).
step bench_overlap_c2 240 $PY -m c2r_comm bench --topology 1x1 --device cuda --dtype bfloat16 "${SHAPES[@]}" \
  --tokens-per-rank 16384 --trace "$TRACE" --layer 12 --dispatcher dedup --iters 20 --warmup-iters 3 \
  --overlap-degree 2 --json "$RES/bench_overlap_c2.json"
cat "$RES/steps.txt"
