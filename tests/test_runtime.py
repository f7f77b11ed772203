"""Reaching Ray (runtime.init_ray through the CLI) and planning a run's resources on a cluster that already runs, or
is small: each ends in a working run or one clear line, never a traceback or a silent wait."""

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.ray_cluster import REPO, free_port, local_cluster, submit_job
from tests.run_logs import ray_info_lines

CLI = str(Path(sys.executable).parent / "longcat-ray")


def cli(args: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`longcat-ray ARGS`; `timeout` only stops a hang from hanging the suite."""
    return subprocess.run([CLI, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_an_address_nobody_answers_is_one_line(tiny):
    port = free_port()  # free now: nothing listens there
    done = cli(["cache", "--config", str(tiny.config), "--address", f"127.0.0.1:{port}"], timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"no Ray cluster answers at '127.0.0.1:{port}'" in done.stderr and "ray start --head" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def two_cpu_head():
    """`ray start --head --num-cpus 2`, the README's token auth: the cluster a user keeps up on a small box."""
    with local_cluster(2) as running:
        yield running


def short_config(tiny_root: Path, out: Path) -> Path:
    """The tiny preset's config, 2 steps, output under `out`."""
    config = json.loads((tiny_root / "config" / "config.json").read_text())
    config.update({"--max_train_steps": 2, "--checkpointing_steps": 2, "--validation_steps": 0, "--output_dir": str(out)})
    path = out.parent / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


@pytest.mark.slow
def test_commands_join_a_running_head_and_plan_for_its_cpus(two_cpu_head, tmp_path):
    """On a 2-CPU head, two CPU training workers would hold both CPUs and starve their Ray Data readers (a hang
    before): `train` is refused at once with the fix named, from the CLI and as a `ray job submit` job. (Workers
    whose bundles and readers fill a node's CPUs exactly do train: tests/test_node_loss.py's run after the node is
    lost.) Every command joins the running cluster instead of failing on it, and prints none of Ray's INFO lines
    unless LONGCAT_RAY_VERBOSE=1."""
    from longcat_ray.tiny import make_tiny

    tiny = make_tiny(tmp_path / "tiny", pairs=4, seed=0)
    config = short_config(tiny.root, tmp_path / "out")
    env = {**two_cpu_head["env"], "RAY_ADDRESS": two_cpu_head["gcs"]}
    cached = cli(["cache", "--config", str(config)], env)
    assert cached.returncode == 0, cached.stderr[-3000:]
    port = two_cpu_head["gcs"].rsplit(":", 1)[1]  # the host is the node's own IP as the GCS reports it
    assert "ray: joined the running cluster at " in cached.stderr and f":{port} (2 CPUs, 0 GPUs)" in cached.stderr
    assert not ray_info_lines(cached.stdout + cached.stderr), cached.stderr[-3000:]  # quiet by default
    refused = cli(["train", "--config", str(config)], {**env, "LONGCAT_RAY_VERBOSE": "1"}, timeout=300)
    assert refused.returncode == 3, refused.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in refused.stderr  # verbose: Ray's INFO lines show
    assert "CPU 4 needed, 2 in the cluster" in refused.stderr and "--workers" in refused.stderr
    assert "Traceback" not in refused.stderr
    status, logs = submit_job(two_cpu_head, "train.py", "--config", str(config))  # the same plan as a Ray job
    assert "failed" in status and "CPU 4 needed, 2 in the cluster" in logs and "Traceback" not in logs, f"{status}\n{logs}"


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    """Polls GET url until it answers 200; fails if the server exits first or `timeout` passes (a hang guard)."""
    deadline = time.time() + timeout
    while time.time() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"{url} never answered (server exit code {server.poll()})")


@pytest.mark.slow
def test_serve_joins_a_running_head(two_cpu_head, tiny):
    """The first thing issue 16 saw: `longcat-ray serve` beside a running `ray start --head` died with "num_cpus and
    num_gpus must not be provided". Now it deploys on that cluster, answers, and stops cleanly on SIGTERM."""
    port = free_port()
    env = {**two_cpu_head["env"], "RAY_ADDRESS": two_cpu_head["gcs"]}
    server = subprocess.Popen([CLI, "serve", "--model", str(tiny.model), "--port", str(port)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = [], []  # read as they come: a full pipe would stall the server
    readers = [threading.Thread(target=lines.extend, args=(stream,), daemon=True)
               for lines, stream in ((out, server.stdout), (err, server.stderr))]
    for reader in readers:
        reader.start()
    try:
        # the "serving ..." line comes when serve.run returns; /healthz may answer a little earlier
        deadline = time.time() + 600
        while not any("serving " in line for line in out) and server.poll() is None and time.time() < deadline:
            time.sleep(1)
        wait_healthy(f"http://127.0.0.1:{port}/healthz", server, timeout=60)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=180)
        for reader in readers:
            reader.join(timeout=30)
    out, err = "".join(out), "".join(err)
    assert server.returncode == 0, err[-3000:]
    assert "ray: joined the running cluster at " in err and "(2 CPUs, 0 GPUs)" in err, err[-3000:]
    assert f"serving {tiny.model} at http://127.0.0.1:{port}/" in out
