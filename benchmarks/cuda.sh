#!/usr/bin/env bash
# The GPU checks on a CUDA machine, in one call: the CUDA tests, then the speed
# benchmark on the GPU (writes results/speed_cuda.md and results/scaling_cuda.md;
# about 8 minutes on an H100, most of it starting a process per measurement), then,
# with SUITE_S set, the whole suite with device="auto" left to resolve to CUDA in
# the tests that do not pin the CPU. Logs and tables are copied to $OUT when it is
# set; pytest runs verbose, so a log cut off by its time limit still names every
# failure so far. SPEED_ARGS overrides the benchmark's arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/sktda-cuda}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, sklearn, skorch, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), '| sklearn', sklearn.__version__, '| skorch', skorch.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__)"
timeout "${CUDA_TESTS_S:-90}" python3 -m pytest -v -rf -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.log" | grep -E "FAILED|ERROR|passed|failed"
(cd benchmarks && timeout "${SPEED_S:-480}" python3 speed.py --device cuda ${SPEED_ARGS:---n 20000 --vmap-n 64 --mlp-sizes 100000 1000000 --cnn-sizes 100000} 2>&1 | tee "$out/speed.log")
cp benchmarks/results/speed_cuda.md benchmarks/results/scaling_cuda.md "$out/" 2>/dev/null
if [ -n "${SUITE_S:-}" ]; then
    timeout "$SUITE_S" python3 -m pytest -v -rf --tb=short -p no:cacheprovider tests 2>&1 | tee "$out/suite.log" | grep -E "FAILED|ERROR|passed|failed"
fi
