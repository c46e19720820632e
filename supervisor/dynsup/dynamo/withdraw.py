"""Withdraw what a dead Dynamo process left registered in discovery.

A SIGKILLed worker cannot deregister: its records stay until their lease
runs out (about 10 s with file discovery, about 30 s with etcd), and all
that time the frontend keeps routing requests to it, each answered 500.
So when a unit with a registry exits (a crash, or a stop that ended in
SIGKILL), the engine calls :func:`withdraw_dead`, before any restart.

A record is dead when the address it advertises (an endpoint's TCP request
plane, an event channel's ZMQ socket) refuses connections: its process is
gone. Only a refusal counts; a timeout or an unreachable host leaves the
record alone, so a live worker behind a slow network is never withdrawn.
Records with no address of their own (model cards, event sources) go with
the dead ones they share an instance id or a key's last segment with.

With file discovery a record is a file and is removed; with etcd every
record of a process hangs on its lease (the instance id), which is revoked.
Records in the request plane ``nats`` advertise no address and are left to
expire.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import anyio
import anyio.to_thread
import structlog

from ..units.spec import Registry, ServiceSpec

log = structlog.get_logger("dynsup.dynamo")

CONNECT_TIMEOUT = 0.5
PREFIX = "v1/"
_ADDRESS = re.compile(r"^(?:tcp://)?\[?([^\]/]+?)\]?:(\d+)(?:/|$)")

Address = tuple[str, int]


@dataclass(frozen=True)
class Record:
    key: str  # the discovery key, "v1/instances/<ns>/<component>/<endpoint>/<id>"
    instance_id: int | None
    address: Address | None
    lease: int | None = None  # etcd only
    path: Path | None = None  # file discovery only

    @property
    def last_segment(self) -> str:
        return self.key.rsplit("/", 1)[-1]


def advertised_address(value: object) -> Address | None:
    """Where the registering process listens, from a record's ``transport``."""
    if not isinstance(value, dict):
        return None
    transport = value.get("transport")
    if not isinstance(transport, dict):
        return None
    config = transport.get("config")
    text = transport.get("tcp") or (config.get("endpoint") if isinstance(config, dict) else None)
    match = _ADDRESS.match(text) if isinstance(text, str) else None
    return (match[1], int(match[2])) if match else None


def parse_record(key: str, raw: bytes, **where: object) -> Record | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    instance_id = value.get("instance_id") if isinstance(value, dict) else None
    return Record(
        key=key,
        instance_id=instance_id if isinstance(instance_id, int) else None,
        address=advertised_address(value),
        **where,  # type: ignore[arg-type]
    )


def dead_records(records: list[Record], refused: set[Address]) -> list[Record]:
    """Records whose process is gone: their address refuses, or they go with one that does."""
    dead = [r for r in records if r.address in refused]
    ids = {r.instance_id for r in dead if r.instance_id is not None}
    segments = {r.last_segment for r in dead} | {f"{i:x}" for i in ids}
    return dead + [
        r
        for r in records
        if r.address is None and (r.instance_id in ids or r.last_segment in segments)
    ]


def connection_refused(address: Address) -> bool:
    try:
        with socket.create_connection(address, timeout=CONNECT_TIMEOUT):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:  # timeout, unreachable: not proof of death
        return False


async def refused_among(addresses: Iterable[Address]) -> set[Address]:
    refused: set[Address] = set()

    async def check(address: Address) -> None:
        if await anyio.to_thread.run_sync(connection_refused, address):
            refused.add(address)

    async with anyio.create_task_group() as tg:
        for address in set(addresses):
            tg.start_soon(check, address)
    return refused


def own_address(text: str) -> Address:
    """An address written "host:port" (a unit's own, from its spec)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# -- file discovery -----------------------------------------------------------


def file_records(root: Path) -> list[Record]:
    """Each file under <root>/v1/<kind>/ is one record; its name is the rest of the key, quoted."""
    records = []
    for path in sorted(root.glob(f"{PREFIX}*/*")):
        try:
            raw = path.read_bytes()
        except OSError:  # withdrawn by its owner meanwhile
            continue
        key = f"{PREFIX}{path.parent.name}/{unquote(path.name)}"
        record = parse_record(key, raw, path=path)
        if record is not None:
            records.append(record)
    return records


def remove_files(records: list[Record]) -> None:
    for record in records:
        assert record.path is not None
        record.path.unlink(missing_ok=True)


# -- etcd ---------------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _etcd_call(endpoint: str, method: str, body: dict[str, object]) -> dict[str, object]:
    """One call to etcd's JSON gateway (the HTTP face of its gRPC API)."""
    request = urllib.request.Request(
        f"{endpoint.rstrip('/')}/v3/{method}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=2.0) as response:
        result: dict[str, object] = json.load(response)
        return result


def etcd_records(endpoint: str) -> list[Record]:
    # range_end "v10" (prefix + 1 on the last byte) selects every key under "v1/".
    answer = _etcd_call(endpoint, "kv/range", {"key": _b64(PREFIX), "range_end": _b64("v10")})
    records = []
    for kv in answer.get("kvs") or []:  # type: ignore[union-attr]
        key = base64.b64decode(kv["key"]).decode(errors="replace")
        lease = int(kv.get("lease", 0)) or None
        record = parse_record(key, base64.b64decode(kv.get("value", "")), lease=lease)
        if record is not None:
            records.append(record)
    return records


def revoke_leases(endpoint: str, records: list[Record]) -> None:
    for lease in sorted({r.lease for r in records if r.lease is not None}):
        try:
            _etcd_call(endpoint, "lease/revoke", {"ID": str(lease)})
        except OSError as exc:  # expired or revoked meanwhile (404): nothing to do
            log.debug("dynamo.revoke_failed", lease=lease, error=str(exc))
    for record in records:
        if record.lease is None:
            _etcd_call(endpoint, "kv/deleterange", {"key": _b64(record.key)})


# -- the hook -----------------------------------------------------------------


async def withdraw_dead(spec: ServiceSpec) -> None:
    """The engine's after-exit hook: withdraw every dead record of spec's registry."""
    if spec.registry is not None:
        await withdraw_dead_records(spec.registry)


async def withdraw_unit(spec: ServiceSpec) -> None:
    """The engine's withdraw hook, before a live process is stopped (a hung one,
    or one to drain): its own records go as if it were dead, with the dead ones."""
    if spec.registry is not None:
        await withdraw_dead_records(spec.registry, own=spec.registry.own)


async def withdraw_leftovers(specs: Iterable[ServiceSpec]) -> None:
    """At daemon start: what dead processes of an earlier run (a crash, a power
    loss) left in file discovery, which a new frontend would list and route to.
    (etcd is not running yet then; its leases run out by themselves.)"""
    registries = {Registry(s.registry.backend, s.registry.location) for s in specs if s.registry}
    for registry in sorted(r for r in registries if r.backend == "file"):
        try:
            await withdraw_dead_records(registry)
        except OSError as exc:
            log.warning("dynamo.withdraw_failed", location=registry.location, error=str(exc))


async def withdraw_dead_records(registry: Registry, own: Iterable[str] = ()) -> list[Record]:
    """Withdraw the records whose address refuses connections, and those at ``own``
    ("host:port" of a process being stopped), with what goes with them."""
    if registry.backend == "file":
        root = Path(registry.location)
        records = await anyio.to_thread.run_sync(file_records, root)
    else:
        records = await anyio.to_thread.run_sync(etcd_records, registry.location)
    refused = await refused_among(r.address for r in records if r.address is not None)
    dead = dead_records(records, refused | {own_address(text) for text in own})
    if not dead:
        return []
    if registry.backend == "file":
        await anyio.to_thread.run_sync(remove_files, dead)
    else:
        await anyio.to_thread.run_sync(revoke_leases, registry.location, dead)
    log.info(
        "dynamo.withdrawn",
        backend=registry.backend,
        instances=sorted({r.last_segment for r in dead if r.key.startswith(f"{PREFIX}instances/")}),
        records=len(dead),
    )
    return dead
