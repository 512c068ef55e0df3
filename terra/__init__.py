"""Terra: imperative-symbolic co-execution for JAX.

`terra.function` runs an unmodified eager training step at compiled-graph
speed; see README.md and DESIGN.md for how.
"""
from runtime.executor import TerraExecutorError
from terra.api import StepFunction, function
from terra.coexec import TerraInternalError, TerraWarning
from terra.telemetry import Stats

__all__ = ["function", "StepFunction", "Stats", "TerraWarning", "TerraInternalError",
           "TerraExecutorError"]
