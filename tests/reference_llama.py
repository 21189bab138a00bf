"""llama-cpp-python's own `Llama`, for tests that compare edgemerge with it or run a model through it directly:
loaded the way edgemerge loads models (llama.cpp's AMX buffers kept out where they crash: edgemerge/cpu_buffers.py),
so both sides run the same kernels and neither crashes on such a machine."""

from __future__ import annotations

from typing import Any

from edgemerge.cpu_buffers import model_params


def reference_llama(*args: Any, **kwargs: Any) -> Any:
    """`llama_cpp.Llama(*args, **kwargs)`, loaded under `cpu_buffers.model_params()`."""
    import llama_cpp

    with model_params():
        return llama_cpp.Llama(*args, **kwargs)
