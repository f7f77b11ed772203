"""`ray job submit` on clusters Ray's own autoscaler grows and shrinks: the node types of cluster/aws.yaml (autoscaler
v1, what `ray up` runs) and of cluster/kuberay/raycluster.yaml (autoscaler v2, what its autoscalerOptions ask for),
read from the files the way Ray reads them, run on Ray's fake multi-node provider (every "node" a raylet on this
machine, started and stopped by the autoscaler as it would start cloud instances).

Real: the autoscaler and its decisions, the node types' resources (the AWS provider's inference from the instance
types, against moto's EC2 instance-type data; KubeRay's reading of the RayCluster), Ray's scheduling, the jobs. Simulated:
the nodes' hardware. CPUs and memory are scaled down to fit a 2-core machine; `GPU` and `accelerator_type:<model>`
stay logical resources, so the product runs its CPU fallback on a "GPU" node (no CUDA there)."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.ray_cluster import RAY, REPO, local_cluster, run, submit_job

pytestmark = pytest.mark.slow
IDLE_MINUTES = 0.1  # the configs' idle_timeout_minutes, shortened: nodes go 6 s after their last task
CPUS_PER_UNIT = 48  # node types' CPUs divided by this: p5.48xlarge's 192 -> 4, the head's and L40S's -> 1


def aws_node_types() -> dict:
    """cluster/aws.yaml's node types with the resources Ray's AWS provider infers from their instance types (CPUs,
    memory, GPUs and `accelerator_type:<model>`; its `ray up` does this before the autoscaler starts)."""
    from moto import mock_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    with mock_aws():  # moto's EC2 answers DescribeInstanceTypes from AWS's published instance-type data
        return AWSNodeProvider.fillout_available_node_types_resources(config)


def kuberay_node_types() -> dict:
    """cluster/kuberay/raycluster.yaml's groups as the KubeRay autoscaler turns a RayCluster into node types."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cluster = yaml.safe_load((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    cluster["metadata"]["namespace"] = "default"
    return _derive_autoscaling_config_from_ray_cr(cluster)


def on_this_machine(config: dict) -> dict:
    """The node types for the fake provider: CPUs divided by CPUS_PER_UNIT (at least 1), memory left to Ray, a
    small object store; GPUs and custom resources as they are; idle timeout shortened."""
    types = {}
    for name, node in config["available_node_types"].items():
        resources = {k: v for k, v in node["resources"].items() if k != "memory"}
        resources.update(CPU=max(1, math.ceil(resources["CPU"] / CPUS_PER_UNIT)), object_store_memory=150 * 2**20)
        types[name] = {"resources": resources, "node_config": {}, "min_workers": node.get("min_workers", 0),
                       "max_workers": node.get("max_workers", 0)}
    return {"available_node_types": types, "head_node_type": config["head_node_type"],
            "idle_timeout_minutes": IDLE_MINUTES, "upscaling_speed": config.get("upscaling_speed", 1.0),
            "max_workers": config["max_workers"]}


def submit(cluster: dict, script: str, *args: str) -> str:
    """The README's command; returns the job's log after checking it SUCCEEDED. A job whose workers fit no node type
    waits for them forever: 420 s (the AWS test's three jobs took 363 s together on 2 cores) makes that a failure."""
    try:
        status, logs = submit_job(cluster, script, *args, timeout=420)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script} still waits after 420 s: does its work fit no node type?\n{autoscaler_status(cluster)}")
    assert "succeeded" in status, f"{status}\n{logs[-4000:]}\n{autoscaler_status(cluster)}"
    return logs


def autoscaler_status(cluster: dict) -> str:
    return run([RAY, "status", "--address", cluster["gcs"]], cluster["env"]).stdout


def nodes(cluster: dict) -> dict[str, dict]:
    """node id -> {"alive", "head", "resources"} for every node the cluster has had (dead ones too)."""
    listed = run([RAY, "list", "nodes", "--address", cluster["address"], "--format", "json", "--detail",
                  "--limit", "1000"], cluster["env"]).stdout
    return {n["node_id"]: {"alive": n["state"] == "ALIVE", "head": n["is_head_node"],
                           "resources": n.get("resources_total") or {}} for n in json.loads(listed)}


def actor_nodes(cluster: dict, class_name: str) -> set[str]:
    """Node ids of the actors whose class name contains `class_name` (dead ones too)."""
    listed = run([RAY, "list", "actors", "--address", cluster["address"], "--format", "json", "--detail",
                  "--limit", "1000"], cluster["env"]).stdout
    return {a["node_id"] for a in json.loads(listed) if class_name in a["class_name"]}


def of_model(cluster: dict, node_ids: set[str], model: str) -> bool:
    """Every node in `node_ids` is a worker node carrying `accelerator_type:<model>` (never the head)."""
    from longcat_ray.runtime import accelerator_key

    known = nodes(cluster)
    return bool(node_ids) and all(not known[n]["head"] and accelerator_key(model) in known[n]["resources"]
                                  for n in node_ids)


def wait_scaled_down(cluster: dict, timeout: float = 120) -> None:
    """The autoscaler terminates the idle workers: only the head stays alive."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(node["head"] for node in nodes(cluster).values() if node["alive"]):
            return
        time.sleep(2)
    raise AssertionError(f"idle workers still up after {timeout} s\n{autoscaler_status(cluster)}")


def job_config(tiny_root: Path, **keys) -> Path:
    """The tiny config, a few steps, no in-training validation."""
    path = tiny_root / "config" / "config.json"
    config = json.loads(path.read_text())
    config.update({"--max_train_steps": 4, "--checkpointing_steps": 2, "--validation_steps": 0,
                   **{f"--{k}": v for k, v in keys.items()}})
    path.write_text(json.dumps(config, indent=2))
    return path


def test_aws_node_types_autoscale_for_the_cache_train_and_validate_jobs(tmp_path):
    """With no worker up: the cache job asks for L40S encoders and the autoscaler starts a gpu_1x_l40s node for them;
    the train job asks for 2 H100 workers on different nodes and it starts two gpu_8x_h100 nodes, one worker each,
    none on the head; validate runs on the head; every worker node goes after the idle timeout."""
    from longcat_ray.export import LORA_FILE
    from longcat_ray.tiny import make_tiny

    types = aws_node_types()
    assert types["available_node_types"]["gpu_8x_h100"]["resources"]["accelerator_type:H100"] == 1  # as Ray infers
    with local_cluster(2, autoscaler=on_this_machine(types)) as cluster:
        tiny = make_tiny(tmp_path / "tiny", pairs=4, seed=0)
        config = job_config(tmp_path / "tiny", placement_strategy="STRICT_SPREAD")
        logs = submit(cluster, "cache.py", "--config", str(config), "--accelerator-type", "L40S")
        assert "encoded 4" in logs, logs[-2000:]
        assert of_model(cluster, actor_nodes(cluster, "CacheEncoder"), "L40S"), nodes(cluster)
        logs = submit(cluster, "train.py", "--config", str(config), "--accelerator-type", "H100", "--workers", "2")
        assert "trained 4 steps" in logs and "reused 4" in logs, logs[-2000:]
        workers = actor_nodes(cluster, "RayTrainWorker")
        assert len(workers) == 2 and of_model(cluster, workers, "H100"), nodes(cluster)  # STRICT_SPREAD: 2 nodes
        assert (Path(tiny.root) / "output" / LORA_FILE).stat().st_size > 0
        submit(cluster, "validate.py", "--config", str(config), "--validation_resolution", "64x64",
               "--validation_num_inference_steps", "2")
        assert len(list((Path(tiny.root) / "output" / "validation" / "cli").glob("*.png"))) == 4
        wait_scaled_down(cluster)


def test_kuberay_worker_group_autoscales_for_the_cache_job(tmp_path):
    """raycluster.yaml's H100 group under autoscaler v2: a cache job whose config asks for H100 encoders
    (cache_accelerator_type), with no worker up, gets a gpu-8x-h100 node, its encoder actors land there (not on the
    head), and the node goes after the idle timeout. (Training's placement by model is the AWS test's.)"""
    from longcat_ray.tiny import make_tiny

    types = kuberay_node_types()
    assert types["available_node_types"]["gpu-8x-h100"]["resources"]["accelerator_type:H100"] == 1
    with local_cluster(2, autoscaler=on_this_machine(types), v2=True) as cluster:
        make_tiny(tmp_path / "tiny", pairs=4, seed=0)
        logs = submit(cluster, "cache.py", "--config", str(job_config(tmp_path / "tiny", cache_accelerator_type="H100")))
        assert "encoded 4" in logs, logs[-2000:]
        assert of_model(cluster, actor_nodes(cluster, "CacheEncoder"), "H100"), nodes(cluster)
        wait_scaled_down(cluster)
