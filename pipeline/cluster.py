"""Connecting to Ray: in-process on a laptop, or an existing cluster.

With neither ``--address`` nor ``RAY_ADDRESS``, Ray starts inside the job's process and its
workers find the project through ``PYTHONPATH``. With an address, the job connects to that
cluster and ships the project's packages with it (``py_modules``), so worker nodes need
only the dependencies installed.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGES = ("jobs", "pipeline", "operators", "models")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def connect(address: str | None = None) -> bool:
    """Make sure Ray is initialised; returns True when this call started it (the caller
    shuts it down at the end)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        import importlib

        modules = [importlib.import_module(name) for name in PACKAGES]
        ray.init(address=address, runtime_env={"py_modules": modules},
                 configure_logging=False)
    else:
        path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH"))
                               if p)
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": path}}, include_dashboard=False,
                 configure_logging=False)
    return True


def shutdown() -> None:
    import ray

    ray.shutdown()


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
