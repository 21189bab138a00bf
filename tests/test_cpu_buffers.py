"""llama.cpp's extra CPU buffer types: AMX is kept out where it crashes (edgemerge/cpu_buffers.py)."""

from __future__ import annotations

import llama_cpp.llama_cpp as low
import numpy as np

from edgemerge import cpu_buffers
from edgemerge.quantize import quantize
from edgemerge.runtime import Model


def test_extra_buffer_types_are_read_from_llama_cpp():
    names = cpu_buffers.extra_buffer_types()
    assert all(isinstance(n, str) and n for n in names)
    assert cpu_buffers.use_extra_buffers() == ("AMX" not in names)


def test_model_params_turn_extra_buffers_off_only_where_one_is_broken(monkeypatch):
    default = low.llama_model_default_params
    monkeypatch.setattr(cpu_buffers, "extra_buffer_types", lambda: ("AMX", "CPU_REPACK"))
    with cpu_buffers.model_params():
        assert low.llama_model_default_params().use_extra_bufts is False
    assert low.llama_model_default_params is default and default().use_extra_bufts is True
    monkeypatch.setattr(cpu_buffers, "extra_buffer_types", lambda: ("CPU_REPACK",))
    with cpu_buffers.model_params():
        assert low.llama_model_default_params is default


def test_a_quantized_model_decodes_512_tokens_at_once(build_family, tmp_path):
    """The batch that crashed llama.cpp's AMX kernel (SIGSEGV: the test process dies) on a machine with AMX;
    the build family's instruct model (hidden 256) at Q8_0 crashed it from 257 tokens on."""
    from edgemerge.pipeline import export_hf

    f16 = export_hf(build_family["instruct"], tmp_path / "i-F16.gguf", outtype="f16")
    q8 = quantize(f16, "Q8_0", tmp_path / "i-Q8_0.gguf")
    with Model(q8, n_ctx=512, n_threads=2) as m:
        ids = (np.arange(512) % 200 + 10).tolist()
        logits = m.logits(ids)
    assert logits.shape == (512, m.n_vocab) and np.isfinite(logits).all()
