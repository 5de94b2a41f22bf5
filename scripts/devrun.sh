#!/bin/bash
# The lent GPU's checks in one call, from the repo root: scripts/devrun.sh prof / final / graphs.
# The CUDA tests, then a profile (prof), the GPU benchmarks (final), or the CUDA-graph step
# (graphs.py) against the eager step and PEFT in parallel processes (graphs). Needs the wheels that the
# device image lacks in .whl/ (bitsandbytes, gguf; see benchmarks.md), carried with the call.
# "final" took about 7 minutes on an H200 (2026-11-29; peft-seq at k=8 needs the 300 s stage).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)"
t0=$(date +%s)
timeout 75 python3 -m pytest -q -n 4 tests/test_cuda.py tests/test_quant.py -k cuda 2>&1 | tee $OUT/cuda_tests.log | tail -25
echo "tests: $(( $(date +%s) - t0 )) s"
if [ "$1" = prof ]; then
  t0=$(date +%s)
  timeout 200 python3 scripts/gpu_prof.py --k 4,8 --profile > $OUT/prof.log 2>&1; echo "rc $?"
  grep -E "^k=|launches|Traceback|Error" $OUT/prof.log
  echo "prof: $(( $(date +%s) - t0 )) s"
fi
if [ "$1" = final ]; then
  t0=$(date +%s)
  timeout 45 python3 scripts/gpu_prof.py --k 4 --modes concat --packing 1 --steps 4 --profile > $OUT/prof.log 2>&1
  grep -E "^k=|launches|Traceback|Error" $OUT/prof.log
  B="python3 bench.py --shape smollm2-135m --dtype bfloat16 --repeats 3"
  timeout 300 $B --k 4,8 --rows 2 --seq 256 --systems ours,peft-parallel,base-only,peft-seq --out $OUT/bench_256.json 2>&1 | grep -v Warn | tee $OUT/bench_256.log | grep -E "^  |^\||Error"
  echo "bench 256: $(( $(date +%s) - t0 )) s"
  timeout 110 $B --k 4 --rows 4 --seq alpaca --systems ours,peft-parallel-packed,base-only,peft-seq-packed --out $OUT/bench_alpaca.json 2>&1 | grep -v Warn | tee $OUT/bench_alpaca.log | grep -E "^  |^\||Error"
  echo "all: $(( $(date +%s) - t0 )) s"
fi
if [ "$1" = graphs ]; then
  t0=$(date +%s)
  timeout 60 python3 scripts/gpu_prof.py --k 4 --modes concat,graphs --packing 1 --steps 4 --profile > $OUT/prof.log 2>&1
  grep -E "^k=|launches|Traceback|Error" $OUT/prof.log
  B="python3 bench.py --shape smollm2-135m --dtype bfloat16 --repeats 3"
  timeout 200 $B --k 4,8 --rows 2 --seq 256 --systems ours,ours-graphs,peft-parallel --out $OUT/bench_256.json 2>&1 | grep -v Warn | tee $OUT/bench_256.log | grep -E "^  |^\||Error"
  echo "bench 256: $(( $(date +%s) - t0 )) s"
  timeout 110 $B --k 4 --rows 4 --seq alpaca --systems ours,ours-graphs,peft-parallel-packed,peft-seq-packed --out $OUT/bench_alpaca.json 2>&1 | grep -v Warn | tee $OUT/bench_alpaca.log | grep -E "^  |^\||Error"
  echo "all: $(( $(date +%s) - t0 )) s"
fi
