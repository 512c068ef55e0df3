"""pytest setup for Terra's tests.

* ``TERRA_STRICT=1``: Terra's internal failures raise instead of silently falling
  back to eager, so a test cannot pass because Terra quietly gave up.
* ``JAX_PLATFORMS=cpu`` unless the caller chose a platform (tests are sized for a
  2-core CPU machine; set ``JAX_PLATFORMS=cuda`` explicitly to run them on a GPU).

Both must be set before jax or terra is imported, hence at module import time.
"""

import os
import sys

os.environ["TERRA_STRICT"] = "1"
# Compile generated graphs before the next step, so a test's short loop
# co-executes deterministically (in production compilation is asynchronous).
os.environ.setdefault("TERRA_SYNC_COMPILE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# tests/ on sys.path so test modules can `import harness`.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
