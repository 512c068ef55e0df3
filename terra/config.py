"""Terra's settings from the environment: every TERRA_* variable is parsed here, and only here.

| variable | accepted values | what it does |
|---|---|---|
| TERRA_STRICT | a flag | raise `TerraInternalError` instead of falling back to eager |
| TERRA_SYNC_COMPILE | a flag | compile new graphs on the step's thread (deterministic tests) |
| TERRA_DISABLE | a flag | run every step function eagerly |
| TERRA_EXPLAIN | a flag | print the explain report of every step function at exit |
| TERRA_TRACE | a file path (its directory exists) | write a Chrome trace timeline there |
| TERRA_TELEMETRY | PORT or HOST:PORT | serve the live event stream |
| TERRA_PROMETHEUS | PORT or HOST:PORT | serve Prometheus metrics (`/metrics`) |
| TERRA_CACHE | a flag, on unless set off | the persistent cache of graphs and executables (docs/persistent-cache.md) |
| TERRA_CACHE_DIR | a directory | the persistent cache's folder (default $XDG_CACHE_HOME/terra, else ~/.cache/terra) |
| TERRA_WARMUP_WAIT | seconds, >= 0 | how long the first steps wait in all for the first graph (default 60; 0: never) |
| TERRA_EXECUTOR | grpc://HOST:PORT or grpcs://HOST:PORT | run graphs in `terra serve` |
| TERRA_EXECUTOR_TOKEN_FILE | a file path | the token that server requires |
| TERRA_EXECUTOR_TLS_CA | a file path | PEM roots to check its TLS certificate |
| TERRA_EXECUTOR_KEEPALIVE_MS | an integer, 100-3600000 | keepalive period (dead server detection) |

A flag is one of 1/true/yes/on or 0/false/no/off (any case; unset or empty
is off). `current()` resolves and validates the whole environment once, and
again only when a TERRA_* variable changed; a value it does not accept raises
`ConfigError` naming the variable, the value and the accepted values. The
rest of Terra reads the typed, frozen `Config`, never `os.environ`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import threading
from typing import Any, Callable, NamedTuple

_ON = frozenset({"1", "true", "yes", "on"})
_OFF = frozenset({"", "0", "false", "no", "off"})
KEEPALIVE_MS = (100, 3_600_000, 5000)  # accepted range, default


class ConfigError(ValueError):
    """A setting Terra does not accept; the message names it and the accepted values."""


def _refuse(name: str, text: str, accepted: str) -> ConfigError:
    where = "terra: " if name.startswith("TERRA_") else ""
    return ConfigError(f"{where}{name}={text!r} is not accepted: use {accepted}")


# -- the parsers: (variable name, raw text) -> value ------------------------------------


def parse_flag(name: str, text: str) -> bool:
    word = text.strip().lower()
    if word in _ON:
        return True
    if word in _OFF:
        return False
    raise _refuse(name, text, "1, true, yes or on to switch it on; 0, false, no, off or "
                              "nothing to leave it off")


def parse_flag_on(name: str, text: str) -> bool:
    """A flag that is on unless set off."""
    return True if not text.strip() else parse_flag(name, text)


def parse_seconds(name: str, text: str) -> float | None:
    """A number of seconds >= 0; None (the caller's default) when unset."""
    if not text.strip():
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise _refuse(name, text, "a number of seconds >= 0")
    return seconds


def parse_path(name: str, text: str) -> str | None:
    path = text.strip()
    return os.path.expanduser(path) if path else None


def parse_trace(name: str, text: str) -> str | None:
    path = parse_path(name, text)
    if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise _refuse(name, text, "a file path in a directory that exists")
    return path


def parse_directory(name: str, text: str) -> str | None:
    path = parse_path(name, text)
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise _refuse(name, text, "a directory (this path is a file)")
    return path


def parse_address(name: str, text: str) -> tuple[str, int]:
    """`PORT` or `HOST:PORT` (`[v6]:PORT`) -> (host, port); the host defaults to loopback."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text.strip()
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _refuse(name, text, "PORT or HOST:PORT, PORT in 0-65535 (0 picks a free one), "
                                  "e.g. 127.0.0.1:7007")
    return host, int(port)


def parse_telemetry(name: str, text: str) -> str | None:
    if not text.strip():
        return None
    parse_address(name, text)
    return text.strip()


def parse_executor(name: str, text: str) -> str:
    """"" (the in-process executor) or grpc://HOST:PORT, grpcs://HOST:PORT (TLS)."""
    spec = text.strip()
    if not spec:
        return ""
    scheme, sep, rest = spec.partition("://")
    host, colon, port = rest.rpartition(":")
    if (scheme not in ("grpc", "grpcs") or not sep or not colon or not host.strip("[]")
            or not port.isdigit() or not 1 <= int(port) <= 65535):
        raise _refuse(name, text, "grpc://HOST:PORT (grpcs:// for TLS), PORT in 1-65535, for a "
                                  "`python -m terra serve` process; or nothing for the "
                                  "in-process executor")
    return spec


def parse_keepalive_ms(name: str, text: str) -> int:
    low, high, default = KEEPALIVE_MS
    if not text.strip():
        return default
    if not text.strip().isdigit() or not low <= int(text) <= high:
        raise _refuse(name, text, f"an integer number of milliseconds, {low}-{high}")
    return int(text)


def positive(kind: Callable[[str], int | float], what: str = "") -> Callable[[str], int | float]:
    """An argparse `type`: a `kind` number > 0, else a message naming the accepted values."""
    accepted = f"{'an integer' if kind is int else 'a number'} > 0{what}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text!r} is not accepted: use {accepted}")
        return value
    return parse


class _Variable(NamedTuple):
    name: str
    field: str
    parse: Callable[[str, str], Any]


VARIABLES = (
    _Variable("TERRA_STRICT", "strict", parse_flag),
    _Variable("TERRA_SYNC_COMPILE", "sync_compile", parse_flag),
    _Variable("TERRA_DISABLE", "disable", parse_flag),
    _Variable("TERRA_EXPLAIN", "explain", parse_flag),
    _Variable("TERRA_TRACE", "trace", parse_trace),
    _Variable("TERRA_TELEMETRY", "telemetry", parse_telemetry),
    _Variable("TERRA_PROMETHEUS", "prometheus", parse_telemetry),
    _Variable("TERRA_CACHE", "cache", parse_flag_on),
    _Variable("TERRA_CACHE_DIR", "cache_dir", parse_directory),
    _Variable("TERRA_WARMUP_WAIT", "warmup_wait", parse_seconds),
    _Variable("TERRA_EXECUTOR", "executor", parse_executor),
    _Variable("TERRA_EXECUTOR_TOKEN_FILE", "executor_token_file", parse_path),
    _Variable("TERRA_EXECUTOR_TLS_CA", "executor_tls_ca", parse_path),
    _Variable("TERRA_EXECUTOR_KEEPALIVE_MS", "executor_keepalive_ms", parse_keepalive_ms),
)


@dataclasses.dataclass(frozen=True)
class Config:
    """The TERRA_* settings, parsed (see the module docstring for each)."""

    strict: bool = False
    sync_compile: bool = False
    disable: bool = False
    explain: bool = False
    trace: str | None = None
    telemetry: str | None = None
    prometheus: str | None = None
    cache: bool = True
    cache_dir: str | None = None
    warmup_wait: float | None = None
    executor: str = ""
    executor_token_file: str | None = None
    executor_tls_ca: str | None = None
    executor_keepalive_ms: int = KEEPALIVE_MS[2]


def cache_folder(settings: Config) -> str | None:
    """The persistent cache's folder, or None when TERRA_CACHE switches it off."""
    if not settings.cache:
        return None
    if settings.cache_dir is not None:
        return settings.cache_dir
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache"
    return os.path.join(os.path.expanduser(base), "terra")


def resolve(environ: dict[str, str]) -> Config:
    """The Config `environ` describes; raises ConfigError for the first bad variable."""
    return Config(**{v.field: v.parse(v.name, environ.get(v.name, "")) for v in VARIABLES})


_lock = threading.Lock()
_resolved: tuple[tuple, Config] | None = None


def current() -> Config:
    """The Config of the environment now (parsed again only after a TERRA_* variable changed)."""
    global _resolved
    raw = tuple(os.environ.get(v.name) for v in VARIABLES)
    resolved = _resolved
    if resolved is not None and resolved[0] == raw:
        return resolved[1]
    config = resolve({v.name: text for v, text in zip(VARIABLES, raw) if text is not None})
    with _lock:
        _resolved = (raw, config)
    return config
