"""The persistent cache: a second run of a program co-executes from its first step.

    python train.py     # first run: records, compiles, saves
    python train.py     # again: loads the graph and its executables, co-executes from step 1

On by default, in DIR = TERRA_CACHE_DIR, else $XDG_CACHE_HOME/terra, else
~/.cache/terra (terra.config.cache_folder); TERRA_CACHE=0
or `terra.function(cache=False)` switches it off.

DIR/graphs/<key>.graph holds a step function's TraceGraph, saved each time a
new graph version is compiled; DIR/executables/ its compiled segments (see
runtime/executable_cache.py). The key names the step function (module,
qualified name, file, bytecode) and what the graph depends on (JAX version,
devices, process index, x64), so a stale graph is rarely loaded — and when it
is (a callee changed), validation catches every difference: the step
diverges, falls back to eager and learns the new path, as for any new path.

DIR/jax/ is JAX's own persistent compilation cache (`use_jax_compilation_cache`),
so the first steps' op-by-op compiles are loaded too; a folder the user
configured for JAX (jax_compilation_cache_dir) is left as it is.

Files are pickles (loading one runs code): keep the directory private.
"""
from __future__ import annotations

import hashlib
import io
import marshal
import warnings
from pathlib import Path
from typing import Callable

import jax

from runtime.executable_cache import write_atomically
from terra.coexec import TerraWarning
from terra.intercept import dump_ops, load_ops
from terra.trace import TraceGraph

FORMAT = 2  # bumped when what a saved graph holds changes


class GraphStore:
    """Where one step function's TraceGraph is saved and found again."""

    def __init__(self, path: Path, name: str, explicit: bool = True):
        self.path = path
        self.name = name
        self.explicit = explicit    # the user chose the folder (TERRA_CACHE_DIR)
        self.saved_version = -1     # TraceGraph.version last written
        self.disabled = ""          # why this graph is not saved (set once, warned once)

    def load(self) -> TraceGraph | None:
        """The saved graph, or None (no file, or unreadable: then it is removed)."""
        try:
            data = self.path.read_bytes()
        except OSError:
            return None
        try:
            graph = load_ops(io.BytesIO(data))
            if not isinstance(graph, TraceGraph):
                raise TypeError(f"not a TraceGraph: {type(graph).__name__}")
        except Exception as err:
            warnings.warn(f"terra: ignoring the saved graph of {self.name!r} ({self.path}): "
                          f"{err!r}; it is recorded again", TerraWarning, stacklevel=5)
            self.path.unlink(missing_ok=True)
            return None
        self.saved_version = graph.version
        return graph

    def save(self, graph: TraceGraph, compiled_version: int) -> None:
        """Write the graph as compiled (runs in the compile thread, after compiling).

        Only if it is still the version whose segments were just compiled: a
        restart then finds every executable of the graph it loads.
        """
        if (self.disabled or compiled_version == self.saved_version
                or graph.version != compiled_version):
            return
        buffer = io.BytesIO()
        try:
            # Some ops hold Python functions (host callbacks, custom_vjp rules): not savable.
            dump_ops(graph, buffer)
            if graph.version != compiled_version:
                return  # Python changed it meanwhile; the next compile saves it
            write_atomically(self.path, buffer.getvalue())
        except Exception as err:
            self.disabled = repr(err)
            if self.explicit:  # a folder the user chose; the default one stays quiet
                warnings.warn(f"terra: the graph of {self.name!r} is not saved in the persistent "
                              f"cache: {err}; a restarted job records it again", TerraWarning)
            return
        self.saved_version = graph.version

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def graph_store(fn: Callable, name: str, cache_dir: str | None,
                explicit: bool) -> GraphStore | None:
    """The store of step function `fn` under `cache_dir` (the cache folder); None without one.

    `explicit`: the user chose the folder (TERRA_CACHE_DIR), so a graph that cannot
    be saved there is worth a warning."""
    if cache_dir is None:
        return None
    return GraphStore(Path(cache_dir) / "graphs" / f"{_key(fn, name)}.graph", name, explicit)


def use_jax_compilation_cache(cache_dir: str) -> None:
    """Point JAX's persistent compilation cache at DIR/jax, unless the user chose a folder.

    Every compile is kept (JAX's default keeps only those over 1 s), so the
    small op-by-op compiles of the first, eagerly run steps load too.
    """
    if jax.config.jax_compilation_cache_dir is not None:
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(cache_dir) / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _key(fn: Callable, name: str) -> str:
    code = getattr(fn, "__code__", None)
    identity = (FORMAT, name, getattr(fn, "__module__", ""), getattr(fn, "__qualname__", ""),
                getattr(code, "co_filename", ""),
                hashlib.sha256(marshal.dumps(code)).hexdigest() if code is not None else "",
                jax.__version__, [(d.platform, d.device_kind, d.id) for d in jax.devices()],
                jax.process_index(), jax.process_count(), jax.config.jax_enable_x64)
    readable = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:40]
    return f"{readable}-{hashlib.sha256(repr(identity).encode()).hexdigest()[:24]}"
