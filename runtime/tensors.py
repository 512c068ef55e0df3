"""Arrays on the wire: dtype name + shape + raw bytes, nothing that runs code on load.

Both ends are little-endian (every platform JAX runs on); bytes are the
array's elements in C order.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from runtime._proto import executor_pb2 as pb

# The dtypes an executor accepts; anything else is a malformed request.
DTYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
})


class MalformedTensor(ValueError):
    """A Tensor message that does not describe an array."""


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """The wire form of a numpy array (copied into the message, in C order)."""
    return pb.Tensor(dtype=array.dtype.name, shape=array.shape, data=array.tobytes())


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """The numpy array a Tensor describes (read-only, sharing the message's bytes).

    Raises:
        MalformedTensor: unknown dtype, negative dimension, or a byte count
            that does not match dtype and shape.
    """
    if tensor.dtype not in DTYPES:
        raise MalformedTensor(f"unsupported dtype {tensor.dtype!r}; expected one of "
                              f"{', '.join(sorted(DTYPES))}")
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise MalformedTensor(f"negative dimension in shape {shape}")
    dtype = jnp.dtype(tensor.dtype)
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise MalformedTensor(f"{len(tensor.data)} bytes do not hold a {tensor.dtype}{list(shape)} "
                              f"array ({expected} bytes)")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
