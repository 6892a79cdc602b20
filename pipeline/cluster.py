"""Connecting to Ray: in-process on a laptop, or an existing cluster.

With neither ``--address`` nor ``RAY_ADDRESS``, Ray starts inside the job's process and its
workers find the project through ``PYTHONPATH``. With an address, the job connects to that
cluster and ships the project's packages with it (``py_modules``), so worker nodes need
only the dependencies installed. A job started by the Ray Jobs API (``vidprune submit``)
already runs inside the runtime environment its submission carried (the packages, the spec,
forwarded variables): it connects without one of its own, which Ray would refuse as a
conflict.
"""

from __future__ import annotations

import contextlib
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
    with _keep_sigterm_handler():
        _init(address)
    return True


@contextlib.contextmanager
def _keep_sigterm_handler():
    """``ray.init`` replaces the SIGTERM handler with ``sys.exit``; a caller that installed
    its own (``vidprune run`` records a stopped job as interrupted) keeps it."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)


def _init(address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if inside_submitted_job():
        ray.init(address=address or "auto", configure_logging=False)
    elif address:
        # the packages' folders, not module objects: Ray Client copies the runtime env, and
        # a module object cannot be copied (every ray:// run failed on it)
        modules = [str(PROJECT_ROOT / name) for name in PACKAGES]
        ray.init(address=address, runtime_env={"py_modules": modules},
                 configure_logging=False)
    else:
        path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH"))
                               if p)
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": path}}, include_dashboard=False,
                 configure_logging=False)


def inside_submitted_job() -> bool:
    """True in the entrypoint of a job submitted through the Ray Jobs API."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def shutdown() -> None:
    import ray

    ray.shutdown()


def alive_nodes() -> int:
    """Nodes of the connected cluster that are alive (0 when Ray is not initialised)."""
    import ray

    if not ray.is_initialized():
        return 0
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def node_resource(name: str) -> list[float]:
    """Ray's resource ``name`` (``CPU``, ``GPU``) of each alive node."""
    import ray

    return [float(n.get("Resources", {}).get(name, 0.0)) for n in ray.nodes()
            if n.get("Alive")]


def node_memory_bytes() -> list[float]:
    """Ray's ``memory`` resource of each alive node (what actors' ``memory=`` draws on)."""
    import ray

    return [float(n.get("Resources", {}).get("memory", 0.0)) for n in ray.nodes()
            if n.get("Alive")]
