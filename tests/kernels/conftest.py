"""The compiled native kernels, shared by the kernel tests."""

from __future__ import annotations

import pytest

from slimgraph.kernels import native


@pytest.fixture(scope="session")
def kernels():
    """The compiled extension (the first build takes ~20-80 s; torch caches it on disk)."""
    module = native.load()
    if module is None:
        pytest.skip("native kernels could not be built on this machine (no C++ compiler?)")
    return module
