"""Real local Ray clusters for tests: `ray start` heads and nodes on loopback with token auth, each with its own temp
dir, ports and token, stopped without touching the session's other Ray."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from tests.conftest import TEST_RAY_ENV

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} -> {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def processes_under(root: int, name: str) -> list[psutil.Process]:
    """Descendants of process `root` whose command line contains `name` (a Ray worker's title): a test finds its own
    Ray's workers, never those of another Ray on the machine (a neighbour's test, a user's cluster)."""
    found = []
    for process in psutil.Process(root).children(recursive=True):
        try:
            if name in " ".join(process.cmdline()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


NODE_MARKER = "LCR_TEST_NODE"  # in the environment of a `local_cluster` node's `ray start`, so of all its processes


def node_processes(marker: str) -> list[psutil.Process]:
    """Every process of the node `marker` names (its raylet, log monitor, agents and workers)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(NODE_MARKER) == marker:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill(processes: list[psutil.Process]) -> None:
    """SIGKILL to all of them at once, then wait for them to go."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=30)


def kill_node(marker: str) -> None:
    """The node lost as a machine is lost: every one of its processes killed at once, nothing shut down cleanly."""
    processes = node_processes(marker)
    assert processes, f"no process of node {marker}"
    kill(processes)


def stop_cluster(temp_dir: Path) -> None:
    """Stop only this cluster's processes (`ray stop` would also stop the session's other local Ray), at once: SIGKILL,
    as `ray stop --force` does (a test cluster keeps nothing; on SIGTERM its GCS and raylets took over 15 s)."""
    mine = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in arg for arg in process.info["cmdline"] or []):
                mine.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    kill(mine)


def fake_autoscaler(config: dict, gcs: int, v2: bool, root: Path) -> tuple[list[str], dict]:
    """Ray's own autoscaler (v1 or v2) over its fake multi-node provider: worker nodes are raylets on this machine,
    started and stopped by the autoscaler as it would start cloud instances -> (`ray start --head` args, env).
    `config` is an autoscaler config (`available_node_types`, `head_node_type`, `idle_timeout_minutes`, ...)."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FAKE_HEAD_NODE_TYPE

    config = {**config, "cluster_name": "fake", "auth": {}, "docker": {}, "max_workers": config.get("max_workers", 8)}
    # "external" naming the fake provider's class (tests/fake_nodes.py: one runtime-env folder per node): type
    # fake_multinode would read the provider's example.yaml for defaults, which Ray's wheel does not ship
    config["provider"] = {"type": "external", "module": "tests.fake_nodes.FakeNodesWithOwnDisks",
                          "use_node_id_as_ip": True, "disable_node_updaters": True,
                          "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs}",
                          **({"launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID} if v2 else {})}
    types = dict(config["available_node_types"])
    types[FAKE_HEAD_NODE_TYPE] = {**types.pop(config["head_node_type"]), "max_workers": 0}  # the provider's head type
    config.update(available_node_types=types, head_node_type=FAKE_HEAD_NODE_TYPE)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "rsync_exclude", "rsync_filter",
                "cluster_synced_files"):
        config[key] = []
    config.update(file_mounts={}, file_mounts_sync_continuously=False)
    path = root / "autoscaler.json"
    path.write_text(json.dumps(config))
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "PYTHONPATH": str(REPO)}  # the provider
    if v2:
        env.update(RAY_enable_autoscaler_v2="1", RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
                   RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID)
    return [f"--autoscaling-config={path}"], env


@contextlib.contextmanager
def local_cluster(head_cpus: int, node_cpus: tuple[int, ...] = (), autoscaler: dict | None = None,
                  v2: bool = False) -> Iterator[dict]:
    """A head with `head_cpus` CPUs and one node per `node_cpus`, no GPUs -> {"env" (token auth, RAY_ADDRESS
    unset), "gcs" (host:port for --address / RAY_ADDRESS), "address" (the dashboard, for `ray job`)}. With
    `autoscaler` (a config, see `fake_autoscaler`): Ray's autoscaler adds and removes the worker nodes."""
    root = Path(tempfile.mkdtemp(prefix="lcr", dir="/tmp"))  # short: Ray's socket paths must stay under 107 bytes
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({key: os.environ[key] for key in TEST_RAY_ENV})  # its controllers poll and its workers stay warm as the session's
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    gcs, dashboard = free_port(), free_port()
    temp_dir = root / "ray"
    head_args, head_env = fake_autoscaler(autoscaler, gcs, v2, root) if autoscaler else ([], {})
    # Own agent ports: the defaults (e.g. 52365) may be taken by the session's other local Ray.
    common = ["--node-ip-address", "127.0.0.1", "--num-gpus", "0", "--disable-usage-stats"]
    try:
        run([RAY, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
             "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
             "--num-cpus", str(head_cpus), "--temp-dir", str(temp_dir), *common, *head_args], {**env, **head_env})
        markers = [f"{root.name}-node{index}" for index in range(len(node_cpus))]
        for cpus, marker in zip(node_cpus, markers):  # every process of the node inherits its marker (kill_node)
            run([RAY, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", str(cpus),
                 "--dashboard-agent-listen-port", str(free_port()), *common], {**env, NODE_MARKER: marker})
        yield {"env": env, "gcs": f"127.0.0.1:{gcs}", "address": f"http://127.0.0.1:{dashboard}",
               "logs": temp_dir / "session_latest" / "logs", "nodes": markers}
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(root, ignore_errors=True)


def submit_job(cluster: dict, script: str, *args: str, timeout: float = 900, job_id: str | None = None,
               wait: bool = True) -> tuple[str, str]:
    """The README's `ray job submit ... -- python jobs/SCRIPT ARGS`, waited for (at most `timeout` s: a job that waits
    for resources nothing will add fails the test) -> (its `ray job status` text, its log). `wait=False`: returns once
    the job is submitted (`--no-wait`), with its status and log so far."""
    job_id = job_id or f"test-{script.removesuffix('.py')}-{secrets.token_hex(3)}"
    command = [RAY, "job", "submit", "--address", cluster["address"], "--submission-id", job_id, "--working-dir", ".",
               "--runtime-env", "jobs/runtime_env.yaml", *([] if wait else ["--no-wait"]), "--", "python",
               f"jobs/{script}", *args]
    for _ in range(10):  # a fresh head's job agent takes a few seconds to register
        result = subprocess.run(command, env=cluster["env"], cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in result.stderr:
            break
        time.sleep(2)
    status = run([RAY, "job", "status", "--address", cluster["address"], job_id], cluster["env"])
    logs = run([RAY, "job", "logs", "--address", cluster["address"], job_id], cluster["env"]).stdout
    return status.stdout + status.stderr, logs  # Ray's CLI logger writes to stderr
