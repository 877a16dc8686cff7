import sys
from pathlib import Path

# Tests mirror the package (tests/tensor/ for torchmesh/tensor/...); the oracles and the process
# harness live in tests/support/. Test modules import those, and each other's case tables
# (the XLA suite reuses tests/tensor/test_ops.py's), by module name.
_TESTS = Path(__file__).parent
for _folder in sorted(p for p in _TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))[::-1]:
    sys.path.insert(0, str(_folder))

import os  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """TORCHMESH_TEST_SAMPLE="k:i" keeps every k-th collected test starting at the i-th: used
    where the op suite runs on gloo processes on a 2-core machine (tests/tensor/test_ops_dist.py),
    each mesh a different slice."""
    sample = os.environ.get("TORCHMESH_TEST_SAMPLE")
    if sample:
        k, i = map(int, sample.split(":"))
        items[:] = items[i::k]
