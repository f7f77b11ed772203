"""The Serve application, for `serve run serve.app:app` from the repository root.

The code lives in the package (`longcat_ray.serving.app`) so that clusters with the project installed import it
from anywhere; serve/config.yaml points there. This file only re-exports it.
"""

from longcat_ray.serving.app import EditModel, Ingress, app, build_app  # noqa: F401
