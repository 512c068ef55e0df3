"""Compiled executables on disk, so a restarted job skips XLA compiles.

`disabled()` switches the store off for the compiles of one step function
(`terra.function(cache=False)`); the folder itself comes from terra.config.

`ExecutableStore.compile(lowered, options)` is `lowered.compile(compiler_options=options)`
backed by a directory: the key is a hash of the lowered module's text (which names its
shapes, shardings and computation) plus the options, the JAX version and the devices, the
value the executable serialized by `jax.experimental.serialize_executable`.
A file that cannot be read is recompiled and overwritten; an executable that
cannot be serialized (one with closed-over constants) is compiled every time.

Loading an executable runs code from the file: the directory must be one
only this user can write (the same holds for the pickled graphs next to it).
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import pickle
import tempfile
import threading
from pathlib import Path

import jax
from jax.experimental import serialize_executable


class ExecutableStore:
    """A directory of compiled executables; counts what it loaded and compiled."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.loaded = 0      # executables read from the directory
        self.compiled = 0    # executables XLA compiled (not found, or unreadable)
        self.unsaved = 0     # compiled but not serializable
        self._lock = threading.Lock()

    def compile(self, lowered: jax.stages.Lowered,
                options: dict | None = None) -> jax.stages.Compiled:
        """`lowered.compile(compiler_options=options)`, loaded from the directory if there."""
        path = self.directory / f"{self._key(lowered, options)}.xla"
        compiled = self._load(path)
        if compiled is not None:
            with self._lock:
                self.loaded += 1
            return compiled
        compiled = lowered.compile(compiler_options=options)
        saved = self._save(path, compiled)
        with self._lock:
            self.compiled += 1
            self.unsaved += not saved
        return compiled

    @staticmethod
    def _key(lowered: jax.stages.Lowered, options: dict | None) -> str:
        devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
        text = lowered.as_text()
        settings = sorted((options or {}).items())
        return hashlib.sha256(repr((jax.__version__, devices, text, settings)).encode()
                              ).hexdigest()[:32]

    @staticmethod
    def _load(path: Path) -> jax.stages.Compiled | None:
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except Exception:  # missing, or unreadable (other JAX build): compiled and written again
            return None

    def _save(self, path: Path, compiled: jax.stages.Compiled) -> bool:
        try:
            data = pickle.dumps(serialize_executable.serialize(compiled))
        except Exception:
            return False
        write_atomically(path, data)
        return True


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_stores: dict[str, ExecutableStore] = {}
_stores_lock = threading.Lock()
_enabled = contextvars.ContextVar("terra_executable_store", default=True)


@contextlib.contextmanager
def disabled():
    """Compiles in this context neither read nor write the executable store."""
    token = _enabled.set(False)
    try:
        yield
    finally:
        _enabled.reset(token)


def enabled() -> bool:
    """False inside `disabled()`: compiles there bypass the store."""
    return _enabled.get()


def executable_store(cache_dir: str | None) -> ExecutableStore | None:
    """The store under `cache_dir` (the cache folder), or None without one."""
    if cache_dir is None:
        return None
    directory = str(Path(cache_dir) / "executables")
    with _stores_lock:
        store = _stores.get(directory)
        if store is None:
            store = _stores[directory] = ExecutableStore(directory)
        return store
