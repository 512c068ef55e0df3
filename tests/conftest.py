"""pytest setup for Terra's tests.

* ``TERRA_STRICT=1``: Terra's internal failures raise instead of silently falling
  back to eager, so a test cannot pass because Terra quietly gave up.
* ``JAX_PLATFORMS=cpu`` unless the caller chose a platform (tests are sized for a
  2-core CPU machine; set ``JAX_PLATFORMS=cuda`` explicitly to run them on a GPU).
* ``TERRA_CACHE=0``: the persistent cache (on by default) is off, so a test's step
  function never resumes a graph another test saved; tests of the cache switch it
  on in a folder of their own. The cache folders (``TERRA_CACHE_DIR``,
  ``XDG_CACHE_HOME``) point into a temporary folder: never the user's real cache.

Both must be set before jax or terra is imported, hence at module import time.
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ["TERRA_STRICT"] = "1"
# Compile generated graphs before the next step, so a test's short loop
# co-executes deterministically (in production compilation is asynchronous).
os.environ.setdefault("TERRA_SYNC_COMPILE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["TERRA_CACHE"] = "0"
_CACHE_ROOT = tempfile.mkdtemp(prefix="terra-test-cache-")
atexit.register(shutil.rmtree, _CACHE_ROOT, ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = _CACHE_ROOT
os.environ["TERRA_CACHE_DIR"] = os.path.join(_CACHE_ROOT, "terra")

# tests/ on sys.path so test modules can `import harness`.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
