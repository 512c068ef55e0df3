"""The graph executor: runs compiled segments off the Python thread.

`terra` uses `runtime`, never the reverse; this package knows nothing about
traces or placeholders, only about jobs that compile or dispatch a segment.
"""
from runtime.executor import GraphExecutor, default_executor, wait

__all__ = ["GraphExecutor", "default_executor", "wait"]
