"""The control room: the daemon's Unix socket server, its client, the JSON-lines protocol.

Modules, and who may import them:

* `protocol` — messages, error codes, `CommandError` (stdlib only);
* `paths` — where the socket lives (stdlib only);
* `peercred` — SO_PEERCRED and the access policy (stdlib only);
* `client` — the synchronous client `dynsupctl` uses (stdlib only);
* `server` — `ControlServer` (anyio, structlog): the daemon side.

This package imports nothing on its own, so `dynsupctl` never pays for anyio.
"""
