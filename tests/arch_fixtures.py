"""One tiny model per model family (and per variant worth its own proof): the fixture table behind the GGUF
export, parity and fused-merge tests. Adding a family adds its entry here (a family's fixture), nothing else
in the tests.

Each entry is a `Spec` (tests/models.py): the Hugging Face architecture, the tokenizer (real shared vocabularies,
or the cheap 512-token SentencePiece one), the shapes, and `parity_outtype`, the outtype the byte-parity test
converts it to with llama.cpp's converter.
"""

from __future__ import annotations

from .models import Spec

ARCH_SPECS = {
    "llama": Spec(),
    "mistral": Spec(arch="MistralForCausalLM", tokenizer="spm", parity_outtype="bf16"),
    "qwen2": Spec(arch="Qwen2ForCausalLM", tokenizer="qwen2", tie=True),
    "qwen3": Spec(arch="Qwen3ForCausalLM", tokenizer="spm512", tie=True, parity_outtype="q8_0"),
    # Llama 3.1-style RoPE scaling (llama.cpp gets it as a rope_freqs tensor); cheap 512-token vocabulary
    "llama31": Spec(
        tokenizer="spm512",
        extra={
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            }
        },
        parity_outtype="f16",
    ),
}
