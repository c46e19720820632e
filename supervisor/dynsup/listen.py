"""HOST:PORT addresses to listen on (the metrics endpoint), parsed the same everywhere."""

from __future__ import annotations


def parse_listen(text: str) -> tuple[str, int]:
    """ "127.0.0.1:9464", "[::1]:9464" or ":9464" (every address) -> (host, port).

    Port 0 asks the kernel for a free one (tests). ValueError when malformed.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)
