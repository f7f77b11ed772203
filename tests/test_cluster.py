"""Cluster configs are product: checked with Ray's own autoscaler validation and KubeRay's own CRD schemas
(v1.7.0, ../shared/kuberay-crds copied into tests/data), and pinned to the Ray version pyproject.toml names."""

import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "cluster" / "kuberay"
CRDS = Path(__file__).resolve().parent / "data" / "kuberay-crds"
MANIFESTS = {"raycluster.yaml": "ray.io_rayclusters.yaml", "rayjob.yaml": "ray.io_rayjobs.yaml",
             "rayservice.yaml": "ray.io_rayservices.yaml"}


def pinned_ray_version() -> str:
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)


def load(path: Path):
    return yaml.safe_load(path.read_text())


def crd_schema(name: str) -> dict:
    crd = load(CRDS / name)
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def cluster_specs() -> dict[str, dict]:
    return {"raycluster.yaml": load(KUBERAY / "raycluster.yaml")["spec"],
            "rayjob.yaml": load(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"],
            "rayservice.yaml": load(KUBERAY / "rayservice.yaml")["spec"]["rayClusterConfig"]}


def images(spec: dict) -> list[str]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_kuberay_manifests_match_the_crd_schemas(manifest):
    document = load(KUBERAY / manifest)
    jsonschema.validate(document, crd_schema(MANIFESTS[manifest]))
    assert document["apiVersion"] == "ray.io/v1"


def test_crd_schemas_catch_a_wrong_field():
    """The schema check has teeth: a misspelt field and a wrong type are both refused."""
    document = load(KUBERAY / "raycluster.yaml")
    document["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas|'four'"):
        jsonschema.validate(document, crd_schema(MANIFESTS["raycluster.yaml"]))
    document = load(KUBERAY / "raycluster.yaml")
    document["spec"]["autoscalerOptions"]["version"] = "v3"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, crd_schema(MANIFESTS["raycluster.yaml"]))


def test_ray_version_does_not_drift():
    version = pinned_ray_version()
    import ray

    assert ray.__version__ == version
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"] == version, name
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2", name
        for image in images(spec):
            assert f"ray{version}-" in image.rsplit(":", 1)[1], f"{name}: {image} does not name Ray {version}"
    assert f"ARG RAY_VERSION={version}\n" in (REPO / "cluster" / "Dockerfile").read_text()
    assert load(REPO / "cluster" / "aws.yaml")["docker"]["image"].startswith(f"rayproject/ray:{version}-")


def test_aws_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(REPO / "cluster" / "aws.yaml")
    prepared = prepare_config(config)  # what `ray up` does before validating: merge the AWS defaults
    validate_config(prepared)
    gpu_types = [t for t in prepared["available_node_types"] if t != prepared["head_node_type"]]
    assert gpu_types and all(prepared["available_node_types"][t]["max_workers"] >= 1 for t in gpu_types)
    broken = dict(config, idle_timeout_minutes="soon")
    with pytest.raises(Exception, match="soon"):
        validate_config(prepare_config(broken))


def test_serve_configs_agree_and_validate():
    from ray.serve.schema import ServeDeploySchema

    from longcat_ray.serving.config import ServeConfig

    file_config = load(REPO / "serve" / "config.yaml")
    service_config = yaml.safe_load(load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])
    assert service_config == file_config
    schema = ServeDeploySchema.model_validate(file_config)
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        assert callable(getattr(__import__(module, fromlist=[attr]), attr))
        ServeConfig.model_validate(app.args)


def test_job_entrypoints_and_runtime_env():
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**load(REPO / "jobs" / "runtime_env.yaml"))
    entrypoint = load(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"].split()
    assert entrypoint[0] == "python" and (REPO / entrypoint[1]).is_file()
    assert cluster_specs()["rayjob.yaml"]["workerGroupSpecs"] == cluster_specs()["raycluster.yaml"]["workerGroupSpecs"]
