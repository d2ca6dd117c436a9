"""Fixtures for the end-to-end tests that share one scaled-out set of processes."""

from __future__ import annotations

import pytest

from tests.helpers.processes import Cluster, Scaled, scaled_cluster


@pytest.fixture(scope="module")
def scaled(cluster: Cluster) -> Scaled:
    """2 web + 2 worker processes and a standalone simulated model (see `Scaled`), shared by
    the tests that do not break them."""
    return scaled_cluster(cluster)
