"""Real local Ray clusters for tests: `ray start` heads and nodes on loopback with token auth, each with its own temp
dir, ports and token, stopped without touching the session's other Ray."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

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


def stop_cluster(temp_dir: Path) -> None:
    """Stop only this cluster's processes (`ray stop` would also stop the session's other local Ray)."""
    mine = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in arg for arg in process.info["cmdline"] or []):
                mine.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for process in mine:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=15)
    for process in alive:
        process.kill()


@contextlib.contextmanager
def local_cluster(head_cpus: int, node_cpus: tuple[int, ...] = ()) -> Iterator[dict]:
    """A head with `head_cpus` CPUs and one node per `node_cpus`, no GPUs -> {"env" (token auth, RAY_ADDRESS
    unset), "gcs" (host:port for --address / RAY_ADDRESS), "address" (the dashboard, for `ray job`)}."""
    root = Path(tempfile.mkdtemp(prefix="lcr", dir="/tmp"))  # short: Ray's socket paths must stay under 107 bytes
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    gcs, dashboard = free_port(), free_port()
    temp_dir = root / "ray"
    # Own agent ports: the defaults (e.g. 52365) may be taken by the session's other local Ray.
    common = ["--node-ip-address", "127.0.0.1", "--num-gpus", "0", "--disable-usage-stats"]
    try:
        run([RAY, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
             "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
             "--num-cpus", str(head_cpus), "--temp-dir", str(temp_dir), *common], env)
        for cpus in node_cpus:
            run([RAY, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", str(cpus),
                 "--dashboard-agent-listen-port", str(free_port()), *common], env)
        yield {"env": env, "gcs": f"127.0.0.1:{gcs}", "address": f"http://127.0.0.1:{dashboard}"}
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(root, ignore_errors=True)


def submit_job(cluster: dict, script: str, *args: str) -> tuple[str, str]:
    """The README's `ray job submit ... -- python jobs/SCRIPT ARGS`, waited for -> (its `ray job status` text, its log)."""
    job_id = f"test-{script.removesuffix('.py')}-{secrets.token_hex(3)}"
    command = [RAY, "job", "submit", "--address", cluster["address"], "--submission-id", job_id, "--working-dir", ".",
               "--runtime-env", "jobs/runtime_env.yaml", "--", "python", f"jobs/{script}", *args]
    for _ in range(10):  # a fresh head's job agent takes a few seconds to register
        result = subprocess.run(command, env=cluster["env"], cwd=REPO, capture_output=True, text=True, timeout=900)
        if "No available agent" not in result.stderr:
            break
        time.sleep(2)
    status = run([RAY, "job", "status", "--address", cluster["address"], job_id], cluster["env"])
    logs = run([RAY, "job", "logs", "--address", cluster["address"], job_id], cluster["env"]).stdout
    return status.stdout + status.stderr, logs  # Ray's CLI logger writes to stderr
