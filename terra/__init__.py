"""Terra: imperative-symbolic co-execution for JAX.

`terra.function` runs an unmodified eager training step at compiled-graph
speed; see README.md and docs/design.md for how.
"""
from runtime.executor import TerraExecutorError
from terra import telemetry
from terra.api import StepFunction, explain, function
from terra.coexec import TerraInternalError, TerraWarning
from terra.telemetry import Stats, timeline

__all__ = ["function", "explain", "timeline", "StepFunction", "Stats", "TerraWarning",
           "TerraInternalError", "TerraExecutorError"]

telemetry.configure_from_env()
