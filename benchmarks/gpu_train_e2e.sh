#!/usr/bin/env bash
# One device call (../shared/gpu/README.md): install the carried wheels (once per machine), the GPU-only tests,
# then benchmarks/train_e2e.py with the given arguments. Everything lands under $OUT.
#   bash benchmarks/gpu_train_e2e.sh --rows plain,fast,fast_fp8   (the eager baseline runs first, same call)
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -e /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade \
    --target /tmp/site .whl/*.whl .whl/*.tar.gz || exit 1
  touch /tmp/site/.done
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, ray, deepspeed, diffusers, torchao, peft; print('torch', torch.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__, 'torchao', torchao.__version__, 'peft', peft.__version__)"
if [ -z "${SKIP_GPU_TESTS:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider tests/model/test_attention.py tests/model/test_transformer.py -k "gpu or cudnn" 2>&1 | tail -4 | tee $OUT/gpu_tests.log
fi
python3 -m benchmarks.train_e2e "$@" > $OUT/train_e2e.log 2>&1
rc=$?
grep -E '^\{"row"|^wrote|Error|error|Traceback|^step ' $OUT/train_e2e.log | grep -v "^\[" | tail -40
grep -E '"row"|step [0-9]+/' $OUT/train_e2e.log | tail -30
exit $rc
