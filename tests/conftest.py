import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (harness, programs) import by name

import os  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """TORCHMESH_TEST_SAMPLE="k:i" keeps every k-th collected test starting at the i-th: used
    where the op suite runs on 4 gloo processes on a 2-core machine (tests/test_ops_dist.py),
    each mesh a different slice, so every case still runs on some 4-process mesh."""
    sample = os.environ.get("TORCHMESH_TEST_SAMPLE")
    if sample:
        k, i = map(int, sample.split(":"))
        items[:] = items[i::k]
