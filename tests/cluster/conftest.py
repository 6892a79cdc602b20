"""A two-node Ray cluster of real processes (head + worker) shared by the tests of this
folder; see ``cluster.py``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from .cluster import LocalCluster


@pytest.fixture(scope="package")
def cluster():
    # Short paths: Ray's unix sockets live under the temp dir (107-byte limit).
    root = Path(tempfile.mkdtemp(prefix="vp-", dir="/tmp"))
    c = LocalCluster(root)
    try:
        c.start_head(num_cpus=2)
        c.add_worker(num_cpus=2)
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
