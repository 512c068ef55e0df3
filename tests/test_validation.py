"""Terra's own interface with bad input: every public argument, command-line flag
and TERRA_* variable is checked where it enters, and refused with a message
that names it and the values it accepts.
"""

import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import terra
from runtime import server
from terra import bench, config
from terra import __main__ as cli
from terra.telemetry import watch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _step(w, x):
    return w - 0.1 * jnp.mean(w * x)


# -- terra.function and terra.explain ---------------------------------------------------


@pytest.mark.parametrize("call, error, message", [
    (lambda: terra.function(3), TypeError, "fn must be a callable (the step function), got int 3"),
    (lambda: terra.function("step"), TypeError, "fn must be a callable"),
    (lambda: terra.function(_step, max_graphs=-3), ValueError, "max_graphs must be an int >= 1, got -3"),
    (lambda: terra.function(_step, max_graphs=0), ValueError, "max_graphs must be an int >= 1"),
    (lambda: terra.function(_step, max_graphs=2.5), TypeError, "max_graphs must be an int >= 1, got float"),
    (lambda: terra.function(_step, max_graphs=True), TypeError, "max_graphs must be an int >= 1, got bool"),
    (lambda: terra.function(_step, max_paths=0), ValueError, "max_paths must be an int >= 1, got 0"),
    (lambda: terra.function(_step, strict="yes"), TypeError, "strict must be True, False or None"),
    (lambda: terra.function(_step, executor=3), TypeError, "executor must be None (TERRA_EXECUTOR)"),
    (lambda: terra.function(_step, executor="http://127.0.0.1:1"), terra.ConfigError,
     "executor='http://127.0.0.1:1' is not accepted: use grpc://HOST:PORT"),
    (lambda: terra.function(_step, executor="grpc://127.0.0.1:99999"), terra.ConfigError,
     "PORT in 1-65535"),
    # As a decorator with options: refused when the options are given, not later.
    (lambda: terra.function(max_graphs=-3), ValueError, "max_graphs must be an int >= 1"),
    (lambda: terra.explain(3), TypeError, "fn must be a terra.function or None (every step function), got int 3"),
    (lambda: terra.explain(_step), TypeError, "fn must be a terra.function or None"),
    (lambda: terra.explain(at_exit="no"), TypeError, "at_exit must be True or False"),
])
def test_bad_arguments_are_refused_naming_the_argument(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_accepted_arguments_still_run_the_step_as_eager():
    import functools

    step = terra.function(functools.partial(_step), max_graphs=1, max_paths=1, strict=True,
                          executor="")
    w = jnp.ones(3)
    x = jnp.arange(3.0)
    np.testing.assert_allclose(step(w, x), _step(w, x))
    assert step.__name__ == "partial" and step.stats().steps == 1


# -- TERRA_* variables ----------------------------------------------------------------------


@pytest.mark.parametrize("name, value, accepted", [
    ("TERRA_STRICT", "yes-please", "1, true, yes or on to switch it on"),
    ("TERRA_SYNC_COMPILE", "2", "1, true, yes or on"),
    ("TERRA_DISABLE", "disabled", "1, true, yes or on"),
    ("TERRA_EXPLAIN", "verbose", "1, true, yes or on"),
    ("TERRA_TELEMETRY", "99999", "PORT or HOST:PORT, PORT in 0-65535"),
    ("TERRA_TELEMETRY", "localhost:http", "PORT or HOST:PORT"),
    ("TERRA_EXECUTOR", "grpc://127.0.0.1", "grpc://HOST:PORT (grpcs:// for TLS)"),
    ("TERRA_EXECUTOR", "127.0.0.1:50051", "grpc://HOST:PORT"),
    ("TERRA_EXECUTOR", "grpc://:50051", "grpc://HOST:PORT"),
    ("TERRA_EXECUTOR_KEEPALIVE_MS", "fast", "an integer number of milliseconds, 100-3600000"),
    ("TERRA_EXECUTOR_KEEPALIVE_MS", "10", "100-3600000"),
    ("TERRA_CACHE_DIR", __file__, "a directory (this path is a file)"),
    ("TERRA_TRACE", "/nonexistent/dir/trace.json", "a file path in a directory that exists"),
])
def test_bad_variables_are_refused_naming_the_variable(monkeypatch, name, value, accepted):
    monkeypatch.setenv(name, value)
    with pytest.raises(terra.ConfigError, match=re.escape(f"{name}={value!r} is not accepted: "
                                                          f"use ") + ".*" + re.escape(accepted)):
        terra.function(_step)


def test_every_variable_has_one_parser_and_a_default():
    names = [v.name for v in config.VARIABLES]
    assert len(names) == len(set(names))
    documented = set(re.findall(r"^\| (TERRA_[A-Z_]+) \|", config.__doc__, re.M))
    assert documented == set(names)  # the module's table lists every variable, once
    assert config.resolve({}) == config.Config()
    parsed = config.resolve({
        "TERRA_STRICT": " On ", "TERRA_SYNC_COMPILE": "FALSE", "TERRA_DISABLE": "",
        "TERRA_EXPLAIN": "yes", "TERRA_TRACE": "~/t.json", "TERRA_TELEMETRY": "[::1]:0",
        "TERRA_CACHE_DIR": "~/cache", "TERRA_EXECUTOR": "grpcs://[::1]:50051",
        "TERRA_EXECUTOR_TOKEN_FILE": "tok", "TERRA_EXECUTOR_TLS_CA": "", "TERRA_EXECUTOR_KEEPALIVE_MS": "250",
    })
    home = os.path.expanduser("~")
    assert parsed == config.Config(
        strict=True, sync_compile=False, disable=False, explain=True, trace=f"{home}/t.json",
        telemetry="[::1]:0", cache_dir=f"{home}/cache", executor="grpcs://[::1]:50051",
        executor_token_file="tok", executor_tls_ca=None, executor_keepalive_ms=250)
    with pytest.raises(AttributeError):
        parsed.strict = False  # frozen: what was validated stays so


def test_a_bad_variable_fails_import_terra_with_its_name():
    out = subprocess.run([sys.executable, "-c", "import terra"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "TERRA_STRICT": "yes-please"},
                         timeout=120)
    assert out.returncode != 0
    assert "ConfigError: terra: TERRA_STRICT='yes-please' is not accepted" in out.stderr


def test_a_bad_variable_set_while_running_is_refused_at_the_next_step(monkeypatch):
    step = terra.function(_step)
    w, x = jnp.ones(3), jnp.arange(3.0)
    step(w, x)
    monkeypatch.setenv("TERRA_DISABLE", "please")
    with pytest.raises(terra.ConfigError, match="TERRA_DISABLE='please'"):
        step(w, x)
    monkeypatch.setenv("TERRA_DISABLE", "1")
    np.testing.assert_allclose(step(w, x), _step(w, x))
    assert step.stats().eager >= 1


def test_terra_variables_are_read_only_in_terra_config():
    """Each TERRA_* variable is parsed in exactly one place."""
    reads = re.compile(r"""(environ\s*(\.get\s*\(|\[)|getenv\s*\()\s*["']TERRA_""")
    offenders = [str(path.relative_to(ROOT)) for package in ("terra", "runtime")
                 for path in (ROOT / package).rglob("*.py")
                 if path.name != "config.py" and reads.search(path.read_text())]
    assert offenders == []


# -- command lines ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--port", "99999"], "argument --port: 99999 is out of range: use an integer >= 0 and <= 65535"),
    (["--port", "-1"], "argument --port: -1 is out of range"),
    (["--port", "http"], "argument --port: 'http' is not an integer >= 0 and <= 65535"),
    (["--max-message-mb", "0"], "argument --max-message-mb: 0 is out of range: use an integer >= 1 and <= 2047"),
    (["--max-message-mb", "4096"], "<= 2047"),
    (["--max-sessions", "0"], "argument --max-sessions: 0 is out of range"),
    (["--max-sessions-per-peer", "0"], "argument --max-sessions-per-peer"),
    (["--session-idle-timeout", "nan"], "argument --session-idle-timeout: nan is out of range: use a number >= 0.1"),
    (["--session-idle-timeout", "0"], "argument --session-idle-timeout"),
    (["--max-handles", "-5"], "argument --max-handles: -5 is out of range: use an integer >= 1"),
    (["--max-session-mb", "1.5"], "argument --max-session-mb: '1.5' is not an integer >= 1"),
    (["--max-total-mb", "0"], "argument --max-total-mb"),
    (["--max-executables", "0"], "argument --max-executables"),
    (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
    (["--token-file", "/nonexistent/token"], "cannot read /nonexistent/token"),
])
def test_serve_refuses_bad_flags_naming_them(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        server.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_with_an_impossible_port_exits_instead_of_serving_elsewhere():
    out = subprocess.run([sys.executable, "-m", "terra", "serve", "--port", "99999"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "serving" not in out.stdout
    assert "--port: 99999 is out of range" in out.stderr


@pytest.mark.parametrize("main, argv, message", [
    (cli.main, ["run", "--step", "f", "--telemetry", "99999", "x.py"],
     "argument --telemetry: --telemetry='99999' is not accepted: use PORT or HOST:PORT"),
    (bench.main, ["--steps", "0"], "argument --steps: '0' is not accepted: use an integer > 0"),
    (bench.main, ["--rounds", "x"], "argument --rounds: 'x' is not accepted"),
    (watch.main, ["127.0.0.1:1", "--interval", "0"], "argument --interval: '0' is not accepted"),
    (watch.main, ["127.0.0.1:1", "--duration", "-1"], "argument --duration"),
])
def test_other_commands_refuse_bad_flags_naming_them(capsys, main, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_watch_refuses_a_bad_address_naming_it(capsys):
    assert watch.main(["localhost:99999", "--duration", "1"]) == 2
    assert "telemetry address='localhost:99999' is not accepted" in capsys.readouterr().err
