"""What the commands read besides flags: sizes and addresses, a bad one a config error.

Shared by the command modules (:mod:`migsgx.cli_agent`, :mod:`migsgx.cli_migrate`,
:mod:`migsgx.cli_lab`), which therefore need not import each other.
"""

from __future__ import annotations

from .errors import ConfigError

__all__ = ["parse_address", "parse_size"]


def parse_address(value: str) -> tuple[str, int]:
    """``ADDRESS:PORT`` (an IPv6 address in brackets) -> (address, port)."""

    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected ADDRESS:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def parse_size(value: str) -> int:
    """``256MiB``, ``1GiB``, ``4096`` -> bytes (the image manifest's size syntax)."""

    from .sgx.image import parse_size as parse

    try:
        return parse(value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
