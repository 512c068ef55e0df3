"""Command line.

- `python -m terra run --step NAME [--trace F] [--explain] [--telemetry ADDR]
  [--prometheus ADDR] script.py [args...]`
  runs an unmodified script as `__main__`, with each named module-level
  function wrapped by `terra.function` right where the script defines it.
- `python -m terra explain script.py --step NAME [args...]`: run it with the
  explain report at exit, including whether whole-step jax.jit would give the
  same results (the hybridization report).
- `python -m terra watch HOST:PORT`: live dashboard of a program run with
  `TERRA_TELEMETRY` (or `--telemetry`).
- `python -m terra bench ...`: eager vs jax.jit vs terra on the examples.
- `python -m terra serve`: the graph executor service (runtime/server.py).
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import types
from typing import Sequence


class _WrapSteps(ast.NodeTransformer):
    """After `def NAME(...)` at module level, insert `NAME = terra.function(NAME)`."""

    def __init__(self, names: set[str]):
        self.names = names
        self.found: set[str] = set()

    def _wrap_body(self, body: list) -> list:
        out = []
        for stmt in body:
            out.append(self.visit(stmt))
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name in self.names:
                self.found.add(stmt.name)
                out.append(ast.parse(
                    f"{stmt.name} = __import__('terra').function({stmt.name})").body[0])
        return out

    def visit_Module(self, node: ast.Module) -> ast.Module:
        node.body = self._wrap_body(node.body)
        return node

    # Module-level control flow (`if __name__ == "__main__":`, try/with) still
    # defines module-level functions; function and class bodies do not.
    def _visit_block_owner(self, node):
        for field in ("body", "orelse", "finalbody"):
            if hasattr(node, field):
                setattr(node, field, self._wrap_body(getattr(node, field)))
        for handler in getattr(node, "handlers", []):
            handler.body = self._wrap_body(handler.body)
        return node

    visit_If = visit_Try = visit_With = visit_For = visit_While = _visit_block_owner

    def visit_FunctionDef(self, node):
        return node

    visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef


def run_script(path: str, steps: Sequence[str], argv: Sequence[str]) -> None:
    """Execute `path` as __main__ with the functions named in `steps` wrapped."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source, filename=path)
    wrapper = _WrapSteps(set(steps))
    tree = ast.fix_missing_locations(wrapper.visit(tree))
    missing = set(steps) - wrapper.found
    if missing:
        raise SystemExit(f"terra run: {path} defines no module-level function named "
                         f"{', '.join(sorted(missing))}; pass the name of the step function "
                         "with --step NAME")
    code = compile(tree, path, "exec")
    sys.argv = [path, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = __builtins__
    sys.modules["__main__"] = module  # pickle and `import __main__` see the script
    exec(code, module.__dict__)


def _telemetry_address(text: str) -> str:
    from terra import config
    try:
        config.parse_address("--telemetry", text)
    except config.ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _check_script(path: str, command: str) -> None:
    if not os.path.isfile(path):
        raise SystemExit(f"terra {command}: no such script: {path}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m terra",
                                     description="Terra: co-execute imperative JAX programs.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an unmodified script with step functions co-executed")
    run.add_argument("--step", action="append", required=True, metavar="NAME",
                     help="module-level function to wrap with terra.function (repeatable)")
    run.add_argument("--trace", metavar="FILE",
                     help="write a Chrome trace timeline (open it in https://ui.perfetto.dev)")
    run.add_argument("--explain", action="store_true",
                     help="print where each step function syncs, diverges and compiles, at exit")
    run.add_argument("--telemetry", metavar="[HOST:]PORT", type=_telemetry_address,
                     help="serve the live event stream (loopback by default) for `terra watch`")
    run.add_argument("--prometheus", metavar="[HOST:]PORT",
                     help="serve Prometheus metrics at http://HOST:PORT/metrics (loopback by default)")
    run.add_argument("script", help="the Python script to run as __main__")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    explain = sub.add_parser("explain", help="run a script and report, for each step function, "
                             "its sync points and divergences and whether whole-step jax.jit "
                             "would give the same results (arguments after the options, or "
                             "after --, go to the script)")
    explain.add_argument("script", help="the Python script to run as __main__")
    explain.add_argument("--step", action="append", required=True, metavar="NAME",
                         help="module-level function to wrap with terra.function (repeatable)")
    sub.add_parser("watch", add_help=False,
                   help="live dashboard of a program run with TERRA_TELEMETRY (see --help)")
    sub.add_parser("bench", add_help=False,
                   help="eager vs jax.jit vs terra on the example programs (see --help)")
    sub.add_parser("serve", add_help=False,
                   help="run the graph executor service for TERRA_EXECUTOR=grpc://... (see --help)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["watch"]:
        from terra.telemetry import watch
        raise SystemExit(watch.main(argv[1:]))
    if argv[:1] == ["bench"]:
        from terra import bench
        raise SystemExit(bench.main(argv[1:]))
    if argv[:1] == ["serve"]:
        from runtime import server
        raise SystemExit(server.main(argv[1:]))
    if argv[:1] == ["explain"]:
        ns, rest = parser.parse_known_args(argv)
        _check_script(ns.script, "explain")
        from terra import telemetry
        telemetry.enable(explain_at_exit=True)
        run_script(ns.script, ns.step, rest[1:] if rest[:1] == ["--"] else rest)
        return
    ns = parser.parse_args(argv)
    if ns.command == "run":
        _check_script(ns.script, "run")
        if ns.trace or ns.explain or ns.telemetry or ns.prometheus:
            from terra import telemetry
            telemetry.enable(trace=ns.trace, explain_at_exit=ns.explain, stream=ns.telemetry,
                             prometheus=ns.prometheus)
        run_script(ns.script, ns.step, ns.args)


if __name__ == "__main__":
    main()
