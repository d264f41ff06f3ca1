"""Passes and the machinery that runs them. Importing this registers every built-in pass."""

from slimgraph.passes import (  # noqa: F401 - registration
    cleanup,
    fold_constants,
    fuse_activations,
    layer_drop,
    prune,
    quantize,
)
from slimgraph.passes.manager import (
    PASS_REGISTRY,
    Pass,
    PassContext,
    PassResult,
    Pipeline,
    register_pass,
)

DEFAULT_PIPELINE = "cleanup, fold_constants"

__all__ = ["DEFAULT_PIPELINE", "PASS_REGISTRY", "Pass", "PassContext", "PassResult", "Pipeline", "register_pass"]
