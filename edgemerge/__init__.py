"""edgemerge: language-vector merges of instruct LLMs, shipped as tested GGUF files.

Data flows one way: recipe -> sources -> check -> merge -> sinks (safetensors | GGUF) -> quantize -> eval -> package.
"""

__version__ = "0.1.0"
