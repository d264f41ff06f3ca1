"""The graph-dump tool: a recorder that writes a JSON Lines trace of a pipeline run,
and renderers (text, DOT, HTML) that show what each pass did."""

from slimgraph.tools.dump.recorder import Trace, TraceRecorder, load_trace

__all__ = ["Trace", "TraceRecorder", "load_trace"]
