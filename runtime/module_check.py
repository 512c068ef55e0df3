"""Reading an untrusted StableHLO module in a helper process first.

jaxlib's StableHLO bytecode reader is not hardened against corrupted input:
some corrupted `jax.export` modules (3 flipped bits: 1 in ~100) make it
crash the process (SIGSEGV), and a few make it loop. The executor server
hands each new module to `ModuleCheck.check` before reading it itself: a
module that crashes the reader kills the helper, one that hangs it is
stopped after `timeout_s` (modules are read in milliseconds), and the helper
is restarted for the next one; the server keeps serving.
Reading is deterministic, so a module the helper read is safe to read again.
"""
from __future__ import annotations

import multiprocessing
import threading
from multiprocessing.connection import Connection


def _serve(conn: Connection) -> None:
    """The helper: read each module it is sent; reply None, or why it is malformed."""
    import jax  # imported here: the server's own process has it already

    while True:
        try:
            blob = conn.recv_bytes()
        except (EOFError, OSError):  # the server is gone
            return
        try:
            jax.export.deserialize(bytearray(blob)).mlir_module()
            conn.send(None)
        except Exception as err:
            conn.send(f"{type(err).__name__}: {str(err).strip()[:300]}")


class ModuleCheck:
    """One helper process, started once and again after each module that killed it."""

    def __init__(self, timeout_s: float = 20.0):
        self._timeout_s = timeout_s
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded server
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None

    def start(self) -> None:
        with self._lock:
            self._ensure_started()

    def check(self, blob: bytes) -> str | None:
        """None if the helper read the module; else why not (it failed, crashed or hung)."""
        with self._lock:
            self._ensure_started()
            try:
                self._conn.send_bytes(blob)
                if self._conn.poll(self._timeout_s):
                    return self._conn.recv()
                why = f"reading it took over {self._timeout_s:g} s"
            except (EOFError, OSError):
                why = "it crashes jaxlib's StableHLO reader"
            self._stop()
            return why

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ensure_started(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        self._stop()
        ours, theirs = self._context.Pipe()
        self._process = self._context.Process(target=_serve, args=(theirs,),
                                              name="terra-serve-module-check", daemon=True)
        self._process.start()
        theirs.close()
        self._conn = ours

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None
