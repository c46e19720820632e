"""The pure parts of continuity: the [live] table, the in-flight gauge, the
frontend's routed instances, canary targets, and a reload that changes only
probes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynsup.dynamo.admission import routed_addresses
from dynsup.dynamo.canary import Target, targets
from dynsup.dynamo.drain import in_flight
from dynsup.engine.reload import diff_specs
from dynsup.units import UnitErrors, load_units
from dynsup.units.spec import LiveSpec, ProbeKind, ReadySpec, Registry, ServiceSpec

from .daemon_helpers import write_unit


def test_live_table_every_key(tmp_path: Path) -> None:
    write_unit(
        tmp_path,
        "web",
        """
        [service]
        command = ["sleep", "100"]
        [live]
        http = "http://127.0.0.1:9000/live"
        interval = "500ms"
        timeout = 3
        failures = 5
        grace = "1m"
        """,
    )
    spec = load_units([tmp_path])["web"]
    assert spec.live == LiveSpec(
        ProbeKind.HTTP, "http://127.0.0.1:9000/live", interval=0.5, timeout=3, failures=5, grace=60
    )
    assert spec.ready is None


def test_live_table_refuses_a_log_probe_and_zero_failures(tmp_path: Path) -> None:
    write_unit(
        tmp_path,
        "web",
        """
        [service]
        command = ["sleep", "100"]
        [live]
        log = "ready"
        failures = 0
        """,
    )
    with pytest.raises(UnitErrors) as caught:
        load_units([tmp_path])
    text = str(caught.value)
    assert "live.log: unknown key 'log'" in text
    assert "live: expected one probe: 'tcp', 'http', 'exec' or 'models'" in text
    assert "live.failures: must be at least 1, got 0" in text


def test_a_reload_that_changes_only_probes_changes_no_unit() -> None:
    old = ServiceSpec(name="frontend", command=("f",), ready=ReadySpec(ProbeKind.MODELS, "u"))
    new = ServiceSpec(
        name="frontend",
        command=("f",),
        ready=ReadySpec(ProbeKind.MODELS, "u", models=("a", "b")),
        live=LiveSpec(ProbeKind.HTTP, "http://x/live"),
    )
    assert diff_specs({"frontend": old}, {"frontend": new}).empty


def test_in_flight_sums_every_endpoint_of_the_gauge() -> None:
    metrics = b"""# HELP dynamo_component_inflight_requests Number of requests
# TYPE dynamo_component_inflight_requests gauge
dynamo_component_inflight_requests{dynamo_endpoint="generate"} 2
dynamo_component_inflight_requests{dynamo_endpoint="worker_kv_query"} 1
dynamo_component_inflight_requests_total{x="y"} 7
dynamo_component_requests_total{dynamo_endpoint="generate"} 40
"""
    assert in_flight(metrics) == 3
    assert in_flight(b"") == 0


def test_routed_addresses_from_the_frontends_health() -> None:
    health = {
        "status": "healthy",
        "instances": [
            {"endpoint": "generate", "transport": {"tcp": "127.0.0.1:29003/ab12/generate"}},
            {"endpoint": "generate", "transport": {"nats_tcp": "x"}},
        ],
    }
    assert routed_addresses(json.dumps(health).encode()) == {("127.0.0.1", 29003)}
    assert routed_addresses(b"not json") == set()


def test_canary_targets_group_workers_by_model_and_role() -> None:
    routers = (("frontend", "http://h:8000"), ("frontend-1", "http://h:8001"))

    def worker(name: str, model: str, role: str, canary: bool = True) -> ServiceSpec:
        registry = Registry("file", "/d", routers=routers, serves=model, role=role, canary=canary)
        return ServiceSpec(name=name, command=("w",), registry=registry)

    specs = {
        "pd-decode-0": worker("pd-decode-0", "m", "decode"),
        "pd-prefill-0": worker("pd-prefill-0", "m", "prefill"),
        "pd-prefill-1": worker("pd-prefill-1", "m", "prefill"),
        "quiet-0": worker("quiet-0", "q", "agg", canary=False),
        "frontend": ServiceSpec(name="frontend", command=("f",)),
    }
    assert targets(specs) == [
        Target("m", routers, (("pd-prefill-0", "pd-prefill-1"), ("pd-decode-0",)))
    ]
