"""Arrays on the wire: dtype name + shape + raw bytes, nothing that runs code on load.

Both ends are little-endian (every platform JAX runs on); bytes are the
array's elements in C order. A typed PRNG key array travels as its key data
(uint32) under the dtype name "key<IMPL>", IMPL one of jax.random's
implementations. Building a jax.Array here must run with no JAX trace
installed (see runtime.executor.RemoteValue).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from runtime._proto import executor_pb2 as pb

# The dtypes an executor accepts; anything else is a malformed request.
DTYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
})
KEY_IMPLS = {"threefry2x32": (2,), "rbg": (4,), "unsafe_rbg": (4,)}  # impl -> key data shape
MAX_DIMENSIONS = 64           # numpy's limit (a key's data dimension included)
_MAX_BYTES = (1 << 63) - 1    # numpy's limit on size * itemsize, zero dimensions counted as 1


class MalformedTensor(ValueError):
    """A Tensor message that does not describe an array."""


def to_tensor(value: Any) -> pb.Tensor:
    """The wire form of a numpy array or a local jax.Array (copied into the message)."""
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = np.asarray(jax.random.key_data(value))
        return pb.Tensor(dtype=f"key<{jax.random.key_impl(value)}>", shape=value.shape,
                         data=data.tobytes())
    array = np.asarray(value)
    return pb.Tensor(dtype=array.dtype.name, shape=array.shape, data=array.tobytes())


def from_tensor(tensor: pb.Tensor) -> np.ndarray | jax.Array:
    """The array a Tensor describes: numpy (read-only, sharing the message's bytes),
    or a jax.Array for typed PRNG keys.

    Raises:
        MalformedTensor: unknown dtype, negative dimension, too many
            dimensions, a shape no array can have, or a byte count that does
            not match dtype and shape.
    """
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise MalformedTensor(f"negative dimension in shape {list(shape)}")
    impl = tensor.dtype[4:-1] if tensor.dtype.startswith("key<") else None
    if impl is not None:
        if impl not in KEY_IMPLS:
            raise MalformedTensor(f"unsupported PRNG key implementation {impl!r}; expected one "
                                  f"of {', '.join(KEY_IMPLS)}")
        data = _elements(tensor.data, jnp.dtype("uint32"), shape + KEY_IMPLS[impl], tensor.dtype)
        return jax.random.wrap_key_data(data, impl=impl)
    if tensor.dtype not in DTYPES:
        raise MalformedTensor(f"unsupported dtype {tensor.dtype!r}; expected one of "
                              f"{', '.join(sorted(DTYPES))} or key<IMPL>")
    return _elements(tensor.data, jnp.dtype(tensor.dtype), shape, tensor.dtype)


def _elements(data: bytes, dtype: np.dtype, shape: tuple, name: str) -> np.ndarray:
    if len(shape) > MAX_DIMENSIONS:
        raise MalformedTensor(f"{len(shape)} dimensions; a {name} array has at most {MAX_DIMENSIONS}")
    # An empty array's other dimensions still count: numpy refuses [0, 2**62, 2**62].
    if math.prod(max(d, 1) for d in shape) * dtype.itemsize > _MAX_BYTES:
        raise MalformedTensor(f"shape {list(shape)} is too large for any {name} array")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise MalformedTensor(f"{len(data)} bytes do not hold a {name}{list(shape)} array "
                              f"({expected} bytes)")
    return np.frombuffer(data, dtype=dtype).reshape(shape)
