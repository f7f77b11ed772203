"""Connecting to Ray: a running cluster when there is one (RAY_ADDRESS, `ray job submit`), else a local one."""

from __future__ import annotations

import logging
import os
import sys

from longcat_ray import verbose

# Found on the H100 hosts (DESIGN.md §4): NVLink multicast paths fail there; every process gets these.
PROCESS_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
               "TOKENIZERS_PARALLELISM": "false",
               # Ray Train's print patch logs each print of a training worker and, where Ray has replaced the worker's
               # sys.stdout (it does), prints it too: every line reached the driver twice
               "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def missing_job_env() -> dict[str, str]:
    """PROCESS_ENV less what a submitting job's runtime env already sets (Ray refuses a driver runtime env that
    repeats a job's keys, so jobs submitted with jobs/runtime_env.yaml pass through untouched)."""
    import json

    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in PROCESS_ENV.items() if k not in taken}


def init_ray(address: str | None = None, quiet: bool = True, min_local_cpus: int = 4) -> None:
    """ray.init once, passing the process environment every worker needs.

    `address` (else RAY_ADDRESS, else "auto"): "auto" joins the cluster `ray start` runs on this machine when there
    is one (a head kept up for the dashboard, a cluster node, a `ray job submit` driver) and otherwise starts a local
    Ray with at least `min_local_cpus` logical CPUs (on a 2-core box two CPU training workers would otherwise leave
    none for the Ray Data tasks that feed them); any other value is the cluster to join. One line on stderr says
    which it was."""
    import ray

    if ray.is_initialized():
        return
    for key, value in PROCESS_ENV.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    target, fix = address, "correct --address / RAY_ADDRESS, or unset both to run on a local Ray"
    if address == "auto":
        os.environ.pop("RAY_ADDRESS", None)  # ray.init would read it again, and "auto" joins any Ray process it finds
        target, fix = started_cluster(), "`ray stop` clears the record of a cluster that died, then run again"
        # "auto" (now with the recorded address found first) is also how ray.init picks up a local cluster's token auth
        address = "auto" if target else None
    env = missing_job_env()
    # Ray's own INFO lines ("Connecting to...", "Started a local Ray instance") say what the line below says
    common = {"runtime_env": {"env_vars": env} if env else None,
              "logging_level": logging.INFO if verbose() else logging.WARNING}
    if address is None:
        context = ray.init(num_cpus=max(os.cpu_count() or 1, min_local_cpus), **common)
        how = "started a local Ray"
    else:
        try:
            check_reachable(target)  # ray.init retries a dead address for minutes without a word
            context = ray.init(address=address, **common)
        except ConnectionError as err:
            raise ConnectionError(f"no Ray cluster answers at {target!r} ({err}). Fix: start it (`ray start --head`), "
                                  f"or {fix}") from None
        how = f"joined the running cluster at {ray.get_runtime_context().gcs_address}"
    total = ray.cluster_resources()
    url = context.dashboard_url  # host:port, or empty without a dashboard
    dashboard = f"; dashboard http://{url.split('://')[-1]}" if url else ""
    print(f"ray: {how} ({total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs){dashboard}", file=sys.stderr,
          flush=True)
    if quiet:
        ray.data.DataContext.get_current().enable_progress_bars = False


def started_cluster() -> str | None:
    """The address `ray start` recorded on this machine (default temp dir), None when none runs (`ray stop` clears it).
    A Ray that another program started with ray.init is not joined: it ends with that program."""
    from ray._private.utils import read_ray_address

    return read_ray_address()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ConnectionError unless host:port (a head's GCS address; other forms pass) accepts a TCP connection."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"nothing listens at {address} ({err.strerror or err})") from None


def accelerator_key(accelerator_type: str) -> str:
    """The resource Ray gives each GPU node for its GPU model (detected on the node; inferred from the instance type
    by Ray's AWS autoscaler): `accelerator_type:H100`."""
    return f"accelerator_type:{accelerator_type}"


def accelerator_resource(accelerator_type: str | None) -> dict[str, float]:
    """What pins a task or actor to a GPU model: a tiny ask of its `accelerator_key`, as Ray Train's
    `ScalingConfig.accelerator_type` does."""
    return {accelerator_key(accelerator_type): 0.001} if accelerator_type else {}


def gpus_up(accelerator_type: str | None = None) -> int:
    """GPUs on the cluster's live nodes now; with `accelerator_type`, only those of that model (an autoscaler may
    add more later: none of its node types count before they start)."""
    import ray

    if not accelerator_type:
        return int(ray.cluster_resources().get("GPU", 0))
    key = accelerator_key(accelerator_type)
    return int(sum(n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive") and key in n["Resources"]))
