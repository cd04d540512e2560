#!/usr/bin/env bash
# The GPU checks, in one call on a CUDA machine: the CUDA tests, the speed benchmark
# on the GPU (writes results/speed_cuda.md and results/scaling_cuda.md), then the
# whole test suite with device="auto" resolving to CUDA. Logs and tables are copied
# to $OUT when it is set. Sizes: SPEED_ARGS overrides the benchmark's arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/sktda-cuda}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, sklearn, skorch, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), '| sklearn', sklearn.__version__, '| skorch', skorch.__version__, '| peft', peft.__version__, '| transformers', transformers.__version__)"
timeout "${CUDA_TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.log"
(cd benchmarks && timeout "${SPEED_S:-240}" python3 speed.py --device cuda ${SPEED_ARGS:---n 20000 --mlp-sizes 100000 1000000 --cnn-sizes 100000} 2>&1 | tee "$out/speed.log")
cp benchmarks/results/speed_cuda.md benchmarks/results/scaling_cuda.md "$out/" 2>/dev/null
timeout "${SUITE_S:-150}" python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -60 > "$out/suite.log"
tail -40 "$out/suite.log"
