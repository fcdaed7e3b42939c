"""Two Ray clusters on one machine: the State API calls of Ray Train's helper actors must find ours
(pipelines.common._state_api_of_this_cluster), not fail with "Found multiple active Ray instances"."""
from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.ray


def test_workers_query_this_clusters_state_api_when_several_clusters_run(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    def probe(without_the_fix: bool) -> tuple[str, str]:
        """What Ray Train's PlacementGroupCleaner does (a State API call without an address), with the
        process scan pretending another cluster runs here, as it does on a shared machine."""
        from ray._private import services
        from ray.util.state import list_actors
        real_scan, real_env = services.find_gcs_addresses, os.environ.get("RAY_API_SERVER_ADDRESS")
        services.find_gcs_addresses = lambda: ["127.0.0.1:1", "127.0.0.1:2"]
        if without_the_fix:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        try:
            list_actors(limit=1)
            outcome = "ok"
        except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
            outcome = f"{type(e).__name__}: {e}"
        finally:  # this worker process may run other tasks of the session
            services.find_gcs_addresses = real_scan
            if real_env is not None:
                os.environ["RAY_API_SERVER_ADDRESS"] = real_env
        return outcome, real_env or ""

    outcome, _ = ray.get(probe.remote(True))  # the failure the fix prevents
    assert outcome.startswith("ConnectionError: Found multiple active Ray instances"), outcome
    outcome, address = ray.get(probe.remote(False))
    assert outcome == "ok", outcome
    # the address the worker uses is this cluster's dashboard (the driver started the cluster)
    dashboard = ray._private.worker.global_worker.node.webui_url
    assert address == f"http://{dashboard}" and address == os.environ["RAY_API_SERVER_ADDRESS"]


def test_a_user_set_api_address_is_left_alone(monkeypatch):
    from pipelines import common
    monkeypatch.setattr(common, "_API_ADDRESS_OURS", None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.5:8265")
    assert common._state_api_of_this_cluster() == {}
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://10.0.0.5:8265"
    # one this process set for an earlier cluster is replaced by the new cluster's
    monkeypatch.setattr(common, "_API_ADDRESS_OURS", "http://10.0.0.5:8265")
    port = common._state_api_of_this_cluster()["dashboard_port"]
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{port}"
