"""Connecting to Ray: a running cluster when there is one (RAY_ADDRESS, `ray job submit`), else a local one."""

from __future__ import annotations

import os

# Found on the H100 hosts (DESIGN.md §4): NVLink multicast paths fail there; every process gets these.
PROCESS_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def missing_job_env() -> dict[str, str]:
    """PROCESS_ENV less what a submitting job's runtime env already sets (Ray refuses a driver runtime env that
    repeats a job's keys, so jobs submitted with jobs/runtime_env.yaml pass through untouched)."""
    import json

    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in PROCESS_ENV.items() if k not in taken}


def init_ray(address: str | None = None, quiet: bool = True) -> None:
    """ray.init once, passing the process environment every worker needs."""
    import ray

    if ray.is_initialized():
        return
    for key, value in PROCESS_ENV.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS")
    # A local Ray gets at least 4 logical CPUs: on a 2-core box two CPU training workers would otherwise
    # leave none for the Ray Data tasks that feed them.
    local = {} if address else {"num_cpus": max(os.cpu_count() or 1, 4)}
    env = missing_job_env()
    ray.init(address=address, runtime_env={"env_vars": env} if env else None, **local)
    if quiet:
        ray.data.DataContext.get_current().enable_progress_bars = False
