"""`ray job submit` against a real two-node local cluster (`ray start --head` + `ray start --address` on
loopback): the tiny cache, train and validate jobs exactly as the README shows them, with the training
workers placed on both nodes."""

import json
from pathlib import Path

import pytest

from tests.ray_cluster import RAY, local_cluster, run, submit_job
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """A head (3 CPUs) and a second node (2 CPUs) on loopback, token auth with a token of its own."""
    with local_cluster(3, (2,)) as running:
        yield running


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
    status, logs = submit_job(cluster, script, *args)
    assert "succeeded" in status, f"{status}\n{logs[-4000:]}"
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
