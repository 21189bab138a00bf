"""Smoke test of tools/bench.py's own parts: the stage meter, the generated family, medians and ratios, and the
F16 comparison. The peers (mergekit, llama.cpp's converter) are not run here: tools/bench.py does that."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from .shared import need_shared

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench
import bench_family
import bench_stats as bs

TINY = bench_family.Size("tiny", hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)


def test_stage_meter_sees_the_child_peak_memory(tmp_path):
    # touch the pages, then keep them a moment (work, not a sleep) so the 20 ms sampling sees them too
    code = (
        "x = bytearray(300_000_000); x[::4096] = b'\\1' * len(x[::4096]); sum(sum(x[::64]) for _ in range(3))"
    )
    stage = bench.run_stage("alloc", [sys.executable, "-c", code], tmp_path / "log")
    assert 300e6 <= stage.peak_rss < 1.5e9
    assert 300e6 <= stage.peak_anon < 1.5e9
    assert stage.seconds > 0
    with pytest.raises(bench.StageFailed, match="exit 3"):
        bench.run_stage("fail", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log")


def test_generated_family_is_base_plus_small_deltas(tmp_path):
    from safetensors import safe_open
    from transformers import AutoConfig

    tok = need_shared("tokenizers", "mistral_sentencepiece", "tokenizer.model.v1")
    fam = bench_family.make_family(tmp_path, TINY, tok)
    tensors = {}
    for role in bench_family.ROLES:
        with safe_open(fam / role / "model.safetensors", "np") as f:
            assert set(f.keys()) == {n for n, _ in bench_family.tensor_shapes(TINY)}
            tensors[role] = {
                k: f.get_tensor(k).astype(np.float32) for k in ("lm_head.weight", "model.norm.weight")
            }
    base = tensors["base"]["lm_head.weight"]
    assert base.shape == (32000, 256)
    assert abs(base.std() - bench_family.BASE_STD) < 1e-3
    delta = tensors["instruct"]["lm_head.weight"] - base
    assert abs(delta.std() - bench_family.DELTA_STD) < 2e-4
    lang_delta = tensors["lang-eu"]["lm_head.weight"] - base
    assert abs(np.corrcoef(delta.ravel(), lang_delta.ravel())[0, 1]) < 0.01  # independent task vectors
    cfg = AutoConfig.from_pretrained(fam / "instruct")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.tie_word_embeddings) == (256, 2, False)
    assert json.loads((fam / "instruct" / "tokenizer_config.json").read_text()) is not None
    # reused, not regenerated, when the stamp matches
    mtime = (fam / "base" / "model.safetensors").stat().st_mtime_ns
    assert bench_family.make_family(tmp_path, TINY, tok) == fam
    assert (fam / "base" / "model.safetensors").stat().st_mtime_ns == mtime


def test_medians_ratios_and_table():
    peer = [
        bs.RouteRun(
            bs.PEER,
            [
                bs.Stage(bs.PEER_MERGE, m, 5_000_000_000),
                bs.Stage(bs.PEER_CONVERT, c, 1),
                bs.Stage(bs.QUANTIZE, 3.0, 1),
            ],
        )
        for m, c in ((10.0, 6.0), (12.0, 2.0), (11.0, 9.0))
    ]
    em = [
        bs.RouteRun(bs.EDGEMERGE, [bs.Stage(bs.EM_MERGE, t, 900_000_000), bs.Stage(bs.QUANTIZE, 3.0, 1)])
        for t in (4.0, 5.0, 6.0)
    ]
    floor = [bs.RouteRun(bs.FLOOR, [bs.Stage(bs.FLOOR_STAGE, t, 1)]) for t in (1.0, 1.0, 2.0)]
    p, e, f = bs.summarize(peer), bs.summarize(em), bs.summarize(floor)
    assert p.route == bs.PEER
    assert p.merge_export == 16.0  # median of (16, 14, 20), not 11 + 6
    assert p.total == 19.0
    assert p.peak_rss == 5_000_000_000
    q = bs.ratios(p, e, f)
    assert q.speedup_merge_export == pytest.approx(16.0 / 5.0)
    assert q.speedup_total == pytest.approx(19.0 / 8.0)
    assert q.floor_ratio == pytest.approx(5.0)
    table = bs.format_tables(
        [
            {
                "size": "1b",
                "params": 1.1e9,
                "summaries": {bs.PEER: p, bs.EDGEMERGE: e, bs.FLOOR: f},
                "ratios": q,
            }
        ]
    )
    assert "| 1b | 3.20x | 2.38x | 5.0x | 0.90 GB (0.00) | not checked |" in table
    # with `build`, the end-to-end time is the build process alone; its own stage split is shown, not added
    build = bs.Stage(bs.EM_BUILD, 20.0, 1_000_000_000)
    split = bench.build_stages(
        {"stages": {"merge": {"seconds": 6.0}, "quantize Q4_K_M": {"seconds": 11.0}}}, build
    )
    assert [(x.name, x.seconds) for x in split][-1] == ("build: other", 3.0)
    b = bs.summarize([bs.RouteRun(bs.EDGEMERGE, [bs.Stage(bs.EM_MERGE, 7.0, 1), build, *split])])
    assert (b.total, b.merge_export, b.peak_rss) == (20.0, 7.0, 1_000_000_000)
    row = bs.format_tables([{"size": "1b", "params": 1.1e9, "summaries": {bs.EDGEMERGE: b}}]).splitlines()[3]
    assert row.startswith(
        "| 1b (1.10B) | edgemerge build --skip-eval | 6.0 s fused | | 11.0 s | 3.0 s | **20.0 s** |"
    )


def test_bf16_ulp_is_the_spacing_of_bfloat16():
    x = (np.random.default_rng(0).standard_normal(1000) * 0.05).astype(ml_dtypes.bfloat16)
    x = x[np.abs(x.astype(np.float32)) > 0]
    bits = np.abs(x.astype(np.float32)).astype(ml_dtypes.bfloat16).view(np.uint16)
    up = (bits + 1).view(ml_dtypes.bfloat16).astype(np.float32)
    spacing = up - np.abs(x.astype(np.float32))
    np.testing.assert_array_equal(bs.bf16_ulp(x.astype(np.float32)), spacing)


def _gguf(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    from gguf import GGUFWriter

    w = GGUFWriter(path, "llama")
    for k, v in tensors.items():
        w.add_tensor(k, v.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_f16_comparison_accepts_bf16_rounding_and_catches_a_wrong_merge(tmp_path):
    rng = np.random.default_rng(1)
    f32 = (rng.standard_normal((64, 256)) * 0.02).astype(ml_dtypes.bfloat16).astype(np.float32)
    small = np.unravel_index(np.argmin(np.abs(f32)), f32.shape)
    # mergekit-style: 5% of the values one bf16 step (of their own magnitude) apart
    rounding = f32 + bs.bf16_ulp(f32) * (rng.random(f32.shape) < 0.05)
    two_steps = f32.copy()
    two_steps[small] += 2 * bs.bf16_ulp(np.abs(f32).max())
    wrong_weight = f32 + 0.1 * 0.002 * rng.standard_normal(f32.shape).astype(np.float32)
    norm = f32[0] + 1.0

    def gguf(name, up):
        return _gguf(tmp_path / name, {"blk.0.ffn_up.weight": up, "output_norm.weight": norm})

    ref = gguf("ref.gguf", f32)
    m = bench.verify(ref, gguf("rounding.gguf", rounding))
    assert m.ok and m.tensors == 2 and 0.1 < m.max_steps <= 1.0 and m.differing > 0
    m = bench.verify(ref, gguf("two.gguf", two_steps))
    assert not m.ok and m.worst == "blk.0.ffn_up.weight" and m.max_steps == pytest.approx(2.0, abs=0.01)
    m = bench.verify(ref, gguf("wrong.gguf", wrong_weight))
    assert not m.ok and m.max_rel_rms > 2 * bs.REL_RMS_TOL
    short = _gguf(tmp_path / "short.gguf", {"blk.0.ffn_up.weight": f32})
    assert bench.verify(ref, short).missing == ["output_norm.weight"]
