"""`ray job submit` against a real two-node local cluster (`ray start --head` + `ray start --address` on
loopback): the tiny cache, train and validate jobs exactly as the README shows them, with the training
workers placed on both nodes."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = pytest.mark.slow


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


@pytest.fixture(scope="module")
def cluster():
    """A head (3 CPUs) and a second node (2 CPUs) on loopback, token auth with a token of its own."""
    root = Path(tempfile.mkdtemp(prefix="lcr", dir="/tmp"))  # short: Ray's socket paths must stay under 107 bytes
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    gcs, dashboard = free_port(), free_port()
    temp_dir = root / "ray"
    # Own agent ports: the defaults (e.g. 52365) may be taken by the session's other local Ray.
    common = ["--node-ip-address", "127.0.0.1", "--num-gpus", "0", "--disable-usage-stats"]
    run([RAY, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", "3", "--temp-dir", str(temp_dir), *common], env)
    try:
        run([RAY, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "2",
             "--dashboard-agent-listen-port", str(free_port()), *common], env)
        yield {"env": env, "address": f"http://127.0.0.1:{dashboard}"}
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(root, ignore_errors=True)


def job_config(tiny_root: Path) -> Path:
    """The tiny config, 4 steps on 2 workers that must sit on different nodes."""
    path = tiny_root / "config" / "config.json"
    config = json.loads(path.read_text())
    config.update({"--max_train_steps": 4, "--checkpointing_steps": 2, "--validation_steps": 0,
                   "--num_workers": 2, "--placement_strategy": "STRICT_SPREAD"})
    path.write_text(json.dumps(config, indent=2))
    return path


def submit(cluster: dict, script: str, *args: str) -> str:
    """The README's command; returns the job's log after checking it SUCCEEDED."""
    job_id = f"test-{script.removesuffix('.py')}-{secrets.token_hex(3)}"
    command = [RAY, "job", "submit", "--address", cluster["address"], "--submission-id", job_id, "--working-dir", ".",
               "--runtime-env", "jobs/runtime_env.yaml", "--", "python", f"jobs/{script}", *args]
    for _ in range(10):  # a fresh head's job agent takes a few seconds to register
        result = subprocess.run(command, env=cluster["env"], cwd=REPO, capture_output=True, text=True, timeout=900)
        if "No available agent" not in result.stderr:
            break
        time.sleep(2)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    status = run([RAY, "job", "status", "--address", cluster["address"], job_id], cluster["env"])
    status = status.stdout + status.stderr  # Ray's CLI logger writes to stderr
    logs = run([RAY, "job", "logs", "--address", cluster["address"], job_id], cluster["env"]).stdout
    assert f"Job '{job_id}' succeeded" in status, f"{status}\n{logs[-4000:]}"
    return logs


def train_worker_nodes(cluster: dict) -> set[str]:
    listed = run([RAY, "list", "actors", "--address", cluster["address"], "--filter", "class_name=RayTrainWorker",
                  "--format", "json", "--detail", "--limit", "1000"], cluster["env"]).stdout
    return {actor["node_id"] for actor in json.loads(listed)}


def test_cache_train_validate_jobs_on_two_nodes(cluster, tmp_path):
    from longcat_ray.export import LORA_FILE
    from longcat_ray.tiny import make_tiny

    tiny = make_tiny(tmp_path / "tiny", pairs=4, seed=0)
    config = job_config(tmp_path / "tiny")
    logs = submit(cluster, "cache.py", "--config", str(config))
    assert "encoded 4" in logs, logs[-2000:]
    logs = submit(cluster, "train.py", "--config", str(config))
    assert "trained 4 steps" in logs and "reused 4" in logs, logs[-2000:]
    assert len(train_worker_nodes(cluster)) == 2  # STRICT_SPREAD put one worker on each node
    assert (Path(tiny.root) / "output" / LORA_FILE).stat().st_size > 0
    submit(cluster, "validate.py", "--config", str(config), "--validation_resolution", "64x64",
           "--validation_num_inference_steps", "2")
    grids = list((Path(tiny.root) / "output" / "validation" / "cli").glob("*.png"))
    assert len(grids) == 4, grids
