"""The graph executor: runs compiled segments off the Python thread.

`terra` uses `runtime`, never the reverse; this package knows nothing about
traces or placeholders, only about jobs that compile or dispatch a segment.
`runtime.server` is the out-of-process executor (`python -m terra serve`),
`runtime.client` the executor that talks to it.
"""
from runtime.executor import (
    GraphExecutor, RemoteValue, TerraExecutorError, default_executor, select_executor, wait,
)

__all__ = ["GraphExecutor", "RemoteValue", "TerraExecutorError", "default_executor",
           "select_executor", "wait"]
