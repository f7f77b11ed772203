"""A node lost mid-run, then the job stopped: a `ray job submit` training job on a two-node local cluster (`ray start`
twice on loopback) loses the node that hosts one of its workers (every process of it SIGKILLed, as a machine goes),
finishes the interrupted steps on what remains, is stopped with `ray job stop`, and resubmitted: it ends as the
uninterrupted run did. Real: Ray, Ray Train's restart, Ray Jobs, DeepSpeed (gloo). Simulated: the machine (the node's
processes are killed; its "host" stays up)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from longcat_ray.export import LORA_FILE
from tests.conftest import EVERY, STEPS
from tests.ray_cluster import RAY, kill_node, local_cluster, node_processes, submit_job
from tests.run_logs import committed, rewinds, samples_log

pytestmark = pytest.mark.slow


def wait_until(ready, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, f"still waiting after {timeout} s for {what}"
        time.sleep(0.1)


def test_a_lost_node_then_a_stopped_job_and_the_run_ends_as_if_neither_happened(reference, tiny, tmp_path):
    """A head with 4 CPUs and a node with 2; the reference run's config (2 workers) placed SPREAD, so one worker lands
    on the node. After the step-8 checkpoint the node is lost: Ray Train rewinds to that checkpoint and trains on,
    both workers now on the head, whose 4 CPUs their bundles and readers fill exactly (no reader starved). After the next checkpoint, `ray job stop`;
    the same `ray job submit` again resumes from a checkpoint, not from scratch. The run ends as the uninterrupted
    reference did: the same samples at every step (the last time each step ran) and the same LoRA."""
    cached, _ = reference
    raw = json.loads(tiny.config.read_text())
    out = tmp_path / "out"
    raw.update({"--output_dir": str(out), "--max_train_steps": STEPS, "--checkpointing_steps": EVERY, "--lora_alpha": 8,
                "--validation_steps": 0, "--max_failures": 2, "--placement_strategy": "SPREAD"})
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    args, job = ("--config", str(config)), "test-node-loss"
    with local_cluster(4, (2,)) as cluster:
        node = cluster["nodes"][0]
        submit_job(cluster, "train.py", *args, job_id=job, wait=False)
        wait_until(lambda: committed(out) >= 1, "the step-8 checkpoint")
        assert any("RayTrainWorker" in " ".join(p.cmdline()) for p in node_processes(node)), "SPREAD put no worker there"
        kill_node(node)
        wait_until(lambda: rewinds(out, 0) >= 1 and rewinds(out, 1) >= 1 and committed(out) >= 2,
                   "both workers restarted from the checkpoint and the next one recorded")
        stop = subprocess.run([RAY, "job", "stop", "--address", cluster["address"], job], env=cluster["env"],
                              capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0, stop.stderr[-2000:]
        first_run = {rank: [line["micro_step"] for line in samples_log(out, rank)] for rank in (0, 1)}
        assert max(first_run[0]) < STEPS - 1, "the job ended before the stop reached it"
        status, logs = submit_job(cluster, "train.py", *args, job_id=job + "-again", timeout=600)
        assert "succeeded" in status and f"trained {STEPS} steps" in logs, f"{status}\n{logs[-3000:]}"
    for rank in (0, 1):
        steps = [line["micro_step"] for line in samples_log(out, rank)]
        assert steps.count(0) == 1, steps  # never from scratch
        resumed_from = steps[len(first_run[rank])]  # the second job's first step: a recorded checkpoint's
        assert resumed_from % EVERY == 0 and 2 * EVERY <= resumed_from <= max(first_run[rank]) + 1, (resumed_from, steps)
        last_runs = {line["micro_step"]: line for line in samples_log(out, rank)}
        assert list(last_runs.values()) == samples_log(cached.train.output_dir, rank)
    final, straight = load_file(out / LORA_FILE), load_file(f"{cached.train.output_dir}/{LORA_FILE}")
    for key in straight:
        torch.testing.assert_close(final[key], straight[key], atol=1e-5, rtol=1e-4)
