"""slimgraph: make PyTorch models smaller and faster by rewriting their FX graphs.

Three ways in:

- ``slimgraph.optimize(model, "cleanup, fold_constants", example_inputs)``
- ``torch.compile(model, backend="slimgraph")`` or ``backend=slimgraph.backend(passes=..., then="eager")``
- ``slimgraph optimize MODEL`` on the command line

``slimgraph.save(optimized, path)`` / ``slimgraph.load(path)`` keep the result in one safetensors file.
"""

from slimgraph.api import optimize
from slimgraph.backend import backend
from slimgraph.errors import (
    CaptureError,
    PassError,
    PipelineError,
    SerializationError,
    SlimgraphError,
    VerificationError,
)
from slimgraph.ir import capture, verify
from slimgraph.passes import (
    DEFAULT_PIPELINE,
    Pass,
    PassContext,
    PassResult,
    Pipeline,
    register_pass,
)
from slimgraph.passes.runner import PassRolledBackWarning
from slimgraph.report import OptimizeReport
from slimgraph.serialize import load, save

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PIPELINE", "CaptureError", "OptimizeReport", "Pass", "PassContext", "PassError", "PassResult",
    "PassRolledBackWarning", "Pipeline", "PipelineError", "SerializationError", "SlimgraphError",
    "VerificationError", "backend", "capture", "load", "optimize", "register_pass", "save", "verify",
]
