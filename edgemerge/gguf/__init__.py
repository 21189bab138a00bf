"""GGUF: Hugging Face -> GGUF export (shared with the fused merge through `GGUFSink`), and GGUF -> HF."""
