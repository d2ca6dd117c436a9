"""Fixtures for the end-to-end tests that share one scaled-out set of processes."""

from __future__ import annotations

import pytest

from tests.helpers.processes import BACKENDS, Cluster, Scaled, clusters_for, scaled_cluster


@pytest.fixture(scope="module", params=BACKENDS)
def scaled(request: pytest.FixtureRequest, cluster: Cluster) -> Scaled:
    """2 web + 2 worker processes and a standalone simulated model (see `Scaled`), shared by
    the tests that do not break them, on each Redis backend."""
    return scaled_cluster(cluster, clusters_for(request))
