# Sourced by the benchmarks/gpu_*.sh scripts on a lent GPU machine (../shared/gpu/README.md): the carried
# wheels installed once per machine into /tmp/site, the environment the traps there call for, the versions printed.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -e /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade \
    --target /tmp/site .whl/*.whl $(ls .whl/*.tar.gz 2>/dev/null) || exit 1
  touch /tmp/site/.done
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, ray, deepspeed, diffusers, torchao, peft; print('torch', torch.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__, 'torchao', torchao.__version__, 'peft', peft.__version__)"
