"""Ray's fake multi-node provider, each node with a runtime-env folder of its own (loaded by the autoscaler process
that tests/ray_cluster.py's `fake_autoscaler` starts, as an "external" provider).

On one machine every fake node shares the head's session folder, and each node's runtime-env agent removes and
unpacks a job's working_dir there again when it first runs a task of the job: it pulled the folder from under the
head's workers (their cwd gone: FileNotFoundError in os.getcwd). On a real cluster each node has its own disk; one
folder per node restores that."""

from ray._private import parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

_RayParams = parameter.RayParams


class _OwnRuntimeEnvFolder(_RayParams):
    def __init__(self, *args, env_vars=None, **kwargs):
        node = (env_vars or {}).get("RAY_OVERRIDE_NODE_ID_FOR_TESTING", "")
        super().__init__(*args, env_vars=env_vars, runtime_env_dir_name=f"runtime_resources_{node[-5:]}", **kwargs)


parameter.RayParams = _OwnRuntimeEnvFolder  # what FakeMultiNodeProvider builds each node's Node from


class FakeNodesWithOwnDisks(FakeMultiNodeProvider):
    """FakeMultiNodeProvider; importing this module gives its nodes their own runtime-env folders."""
