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
    # Llama 3.2 (1B/3B), standing for every Llama 3 BPE checkpoint (one fixture: the real 128k vocabulary is its
    # cost): tied embeddings, head_dim 64, llama3 RoPE with factor 32 (original context scaled down from 8192 as
    # for llama31), Llama 3.1's vocabulary, 3.2 Instruct's chat template and EOS list
    "llama": Spec(
        tokenizer="llama3.1-bpe",
        tie=True,
        extra={
            "head_dim": 64,
            "rms_norm_eps": 1e-5,
            "eos_token_id": [128001, 128008, 128009],
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        },
        chat_template="meta-llama-Llama-3.2-3B-Instruct.jinja",
    ),
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
    # Gemma 3 (no Gemma tokenizer in ../shared: the 512-token SentencePiece one stands in, through the same
    # tokenizer.model path). Norm weights near 0 (Gemma scales by 1 + w); queries scaled by head_dim as
    # llama.cpp assumes; 6 layers so the last one is a global-attention layer (llama.cpp's fixed pattern), a
    # sliding window shorter than the test prompt and a final logit softcap: the logits test exercises each
    "gemma3": Spec(
        arch="Gemma3ForCausalLM",
        tokenizer="spm512",
        tie=True,
        layers=6,
        norm_weight=0.0,
        extra={
            "head_dim": 64,
            "query_pre_attn_scalar": 64,
            "sliding_window": 8,
            "final_logit_softcapping": 2.0,
        },
        parity_outtype="f16",
    ),
    # the language model of Gemma 3's vision-language checkpoint, in float16 (the norms' +1 is then rounded to
    # float16, as the converter does it); its small SigLIP vision tower is left out of the GGUF
    "gemma3_vlm": Spec(
        arch="Gemma3ForConditionalGeneration",
        tokenizer="spm512",
        tie=True,
        dtype="float16",
        norm_weight=0.0,
        extra={"head_dim": 64, "query_pre_attn_scalar": 64},
        wrapper={
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 8,
                "vision_use_head": False,
            },
            "mm_tokens_per_image": 4,
        },
    ),
    # Qwen3 MoE (Qwen3-30B-A3B's layout, shrunk): 4 experts of 32 per layer, 2 used per token, the real Qwen2
    # vocabulary (its family converts byte-level BPE only) and Qwen3's chat template; parity in F16 and F32
    "qwen3moe": Spec(
        arch="Qwen3MoeForCausalLM",
        tokenizer="qwen2",
        hidden=64,
        heads=4,
        kv_heads=2,
        intermediate=128,
        extra={
            "head_dim": 16,
            "moe_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
        },
        parity_outtype="f16",
        more_parity=("f32",),
        chat_template="Qwen-Qwen3-0.6B.jinja",
    ),
    # Qwen3.5 (dense), the hybrid: a linear-attention (Gated DeltaNet) layer, then a full-attention one; twice as
    # many value heads as key heads in the linear attention (the export reorders them); norms scale by 1 + w but
    # the linear attention's gated norm by w; the real Qwen3.5 vocabulary and chat template. The converter runs
    # with --no-mtp: a checkpoint saved by transformers has no multi-token-prediction block
    "qwen35": Spec(
        arch="Qwen3_5ForCausalLM",
        tokenizer="qwen35",
        hidden=64,
        heads=4,
        kv_heads=2,
        intermediate=128,
        norm_weight=0.0,
        unit_norms=("linear_attn.norm.weight",),
        extra={
            "head_dim": 256,  # rotary dims 256 x 0.25 = 64: what the default M-RoPE sections [11, 11, 10] cover
            "layer_types": ["linear_attention", "full_attention"],
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
        },
        parity_outtype="f16",
        more_parity=("f32",),
        chat_template="Qwen3.5-4B.jinja",
        converter_args=("--no-mtp",),
    ),
    # Gemma 4 (31B's layout, shrunk), the real Gemma 4 vocabulary and 31B-it's chat template: a sliding-window
    # layer (head 32, window 8: shorter than the test prompt) then a full-attention one (head 64, proportional
    # RoPE on a quarter of it, one KV head whose projection serves K and V: no v_proj), norms that scale by w,
    # a final logit softcap; parity in F16 and F32
    "gemma4": Spec(
        arch="Gemma4ForCausalLM",
        tokenizer="gemma-4",
        hidden=64,
        heads=2,
        kv_heads=2,
        intermediate=128,
        tie=True,
        extra={
            "head_dim": 32,
            "global_head_dim": 64,
            "num_global_key_value_heads": 1,
            "attention_k_eq_v": True,
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 8,
            "final_logit_softcapping": 30.0,
            "hidden_size_per_layer_input": 0,
        },
        parity_outtype="f16",
        more_parity=("f32",),
        chat_template="google-gemma-4-31B-it.jinja",
    ),
    # the language model of Gemma 4's multimodal checkpoint in E2B's layout: per-layer embeddings (8 per
    # layer), the last layer reusing layer 1's KV (no k/v projections) with a double-wide MLP; its tiny
    # vision and audio towers are left out of the GGUF
    "gemma4_vlm": Spec(
        arch="Gemma4ForConditionalGeneration",
        tokenizer="gemma-4",
        hidden=64,
        layers=3,
        heads=2,
        kv_heads=1,
        intermediate=128,
        tie=True,
        extra={
            "head_dim": 32,
            "global_head_dim": 64,
            "layer_types": ["sliding_attention", "full_attention", "full_attention"],
            "sliding_window": 8,
            "final_logit_softcapping": 30.0,
            "hidden_size_per_layer_input": 8,
            "num_kv_shared_layers": 1,
            "use_double_wide_mlp": True,
        },
        wrapper={
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "patch_size": 4,
                "position_embedding_size": 64,
                "pooling_kernel_size": 2,
            },
            "audio_config": {
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "subsampling_conv_channels": [8, 4],
                "output_proj_dims": 32,
                # unclipped: transformers' default clip bounds are +-inf buffers (a checkpoint brings finite
                # ones), which the merge refuses as non-finite
                "use_clipped_linears": False,
            },
        },
        parity_outtype="f16",
    ),
    # Qwen3.5 as released: the conditional-generation class (text_config nested, `model.language_model.*`
    # tensors, a small vision tower `model.visual.*` that the GGUF leaves out), the qwen35 fixture's text model
    "qwen35_vlm": Spec(
        arch="Qwen3_5ForConditionalGeneration",
        tokenizer="qwen35",
        hidden=64,
        heads=4,
        kv_heads=2,
        intermediate=128,
        norm_weight=0.0,
        unit_norms=("linear_attn.norm.weight",),
        extra={
            "head_dim": 256,
            "layer_types": ["linear_attention", "full_attention"],
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
        },
        wrapper={
            "vision_config": {
                "depth": 1,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "patch_size": 8,
                "out_hidden_size": 64,
                "num_position_embeddings": 16,
            },
        },
        # F16 only: the qwen35 fixture proves the F32 path of the same family; this one, the released class's
        # tensor selection and names
        parity_outtype="f16",
        chat_template="Qwen3.5-4B.jinja",
        converter_args=("--no-mtp",),
    ),
}
