"""Importance matrix files: llama.cpp's GGUF and legacy .dat formats read and written as llama-imatrix does,
the weights llama-quantize derives from them, and damaged or foreign files refused in one line."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgemerge.demo import DATA_DIR
from edgemerge.errors import EdgemergeError
from edgemerge.gguf.inspect import read_gguf
from edgemerge.imatrix import Entry, Imatrix, check_fits, importance, read_imatrix, write_imatrix

from .llama_tools import need_tool

T = gguf.GGUFValueType


@pytest.fixture(scope="module")
def model(f32_ggufs) -> Path:
    return f32_ggufs["qwen3"]


@pytest.fixture(scope="module")
def imx(model, random_imatrix) -> Imatrix:
    return random_imatrix(model, 1)


@pytest.fixture(scope="module")
def imx_file(imx, tmp_path_factory) -> Path:
    return write_imatrix(tmp_path_factory.mktemp("imx") / "x.imatrix.gguf", imx)


def test_write_read_round_trip(imx, imx_file, tmp_path):
    back = read_imatrix(imx_file)
    assert not back.legacy
    assert (back.datasets, back.chunk_count, back.chunk_size) == (imx.datasets, 4, 64)
    assert sorted(back.entries) == sorted(imx.entries)
    for name, (sums, counts) in imx.entries.items():
        assert back.entries[name].sums.dtype == np.float32
        np.testing.assert_array_equal(back.entries[name].sums, sums)
        np.testing.assert_array_equal(back.entries[name].counts, counts)
    assert write_imatrix(tmp_path / "again.gguf", back).read_bytes() == imx_file.read_bytes()


def test_layout_is_what_llama_imatrix_writes(imx, imx_file):
    """Keys, types, tensor order and ggml shapes of tools/imatrix/imatrix.cpp's save_imatrix."""
    info = read_gguf(imx_file)
    assert list(info.kv) == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert info.kv["general.type"] == "imatrix"
    assert info.types["imatrix.datasets"] == (T.ARRAY, T.STRING)
    assert info.types["imatrix.chunk_count"] == info.types["imatrix.chunk_size"] == (T.UINT32,)
    names = sorted(imx.entries)
    assert [t.name for t in info.tensors] == [n + s for n in names for s in (".in_sum2", ".counts")]
    shapes = {t.name: (t.type, t.shape) for t in info.tensors}
    down = "blk.0.ffn_down.weight"
    assert shapes[down + ".in_sum2"] == ("F32", (512,)) and shapes[down + ".counts"] == ("F32", (1,))


def test_stacked_experts_round_trip_and_weights(tmp_path):
    """A MoE weight: one row of sums and one count per expert; an expert never routed to weighs 1."""
    rng = np.random.default_rng(0)
    sums = rng.uniform(0.5, 9.0, 3 * 256).astype(np.float32)
    imx = Imatrix({"blk.0.ffn_up_exps.weight": Entry(sums, np.array([5, 0, 7]))}, ["t.txt"], 2, 64)
    path = write_imatrix(tmp_path / "moe.gguf", imx)
    shapes = {t.name: t.shape for t in read_gguf(path).tensors}
    assert shapes == {"blk.0.ffn_up_exps.weight.in_sum2": (256, 3), "blk.0.ffn_up_exps.weight.counts": (1, 3)}
    back = read_imatrix(path)
    assert back.columns("blk.0.ffn_up_exps.weight") == 256
    w = importance(back.entries["blk.0.ffn_up_exps.weight"])
    assert w.dtype == np.float32 and w.shape == (768,)
    expected = np.concatenate(
        [sums[:256].astype(np.float64) / 5, np.ones(256), sums[512:].astype(np.float64) / 7]
    )
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    np.testing.assert_array_equal(w[256:512], 1.0)


def test_legacy_weights_divide_by_ncall():
    vals = np.array([2.0, 4.0, 9.0], dtype=np.float32)
    np.testing.assert_allclose(importance(Entry(vals, np.array([4])), legacy=True), [0.5, 1.0, 2.25])
    np.testing.assert_array_equal(importance(Entry(vals, np.array([0])), legacy=True), vals)


def _legacy(entries: list[tuple[str, int, np.ndarray]], tail: tuple[int, str] | None = None) -> bytes:
    """A legacy .dat imatrix, written here from the format (imatrix.cpp's save_imatrix_legacy)."""
    out = struct.pack("<i", len(entries))
    for name, ncall, vals in entries:
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, vals.size)
        out += vals.astype("<f4").tobytes()
    if tail is not None:
        out += struct.pack("<ii", tail[0], len(tail[1])) + tail[1].encode()
    return out


def test_legacy_dat_is_read(tmp_path):
    a, b = np.arange(1, 257, dtype=np.float32), np.full(512, 3.0, dtype=np.float32)
    dat = tmp_path / "old.dat"
    dat.write_bytes(
        _legacy([("blk.0.attn_q.weight", 10, a), ("blk.0.ffn_down.weight", 10, b)], (10, "eu.txt"))
    )
    imx = read_imatrix(dat)
    assert imx.legacy and imx.datasets == ["eu.txt"] and (imx.chunk_count, imx.chunk_size) == (10, 0)
    np.testing.assert_array_equal(imx.entries["blk.0.attn_q.weight"].sums, a)
    np.testing.assert_allclose(importance(imx.entries["blk.0.attn_q.weight"], legacy=True), a / 10)
    dat.write_bytes(_legacy([("blk.0.attn_q.weight", 3, a)]))  # the chunk count and dataset are optional
    imx = read_imatrix(dat)
    assert imx.datasets == [] and imx.chunk_count == 0 and list(imx.entries) == ["blk.0.attn_q.weight"]
    with pytest.raises(EdgemergeError, match="legacy .dat imatrix holds normalized values"):
        write_imatrix(tmp_path / "x.gguf", imx)


def _write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    *,
    chunk_type: T = T.UINT32,
    chunk_count: int = 1,
    drop: str = "",
) -> Path:
    """An imatrix-like GGUF written with gguf-py directly (for files our writer would never make)."""
    w = gguf.GGUFWriter(path, arch="")
    w.add_type("imatrix")
    keys = {"imatrix.datasets": (["t.txt"], T.ARRAY), "imatrix.chunk_count": (chunk_count, chunk_type)}
    keys["imatrix.chunk_size"] = (64, T.UINT32)
    for key, (value, vtype) in keys.items():
        if key != drop:
            w.add_key_value(key, value, vtype)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _refused(path: Path, match: str) -> str:
    with pytest.raises(EdgemergeError, match=match) as e:
        read_imatrix(path)
    assert path.name in e.value.message and "\n" not in e.value.message
    return e.value.message


ONES = np.ones(256, dtype=np.float32)
ONE = np.ones(1, dtype=np.float32)


@pytest.mark.parametrize(
    ("tensors", "kw", "match"),
    [
        (
            {"a.in_sum2": ONES.astype(np.float16), "a.counts": ONE},
            {},
            "'a.in_sum2' is F16; imatrix tensors are F32",
        ),
        ({"a.in_sum2": ONES}, {}, "'a' has a .in_sum2 and no .counts tensor"),
        ({"a.in_sum2": ONES[:10], "a.counts": np.ones(3, np.float32)}, {}, "10 sums for 3 counts"),
        ({"a.in_sum2": ONES * np.nan, "a.counts": ONE}, {}, "negative or not finite"),
        ({"a.in_sum2": ONES, "a.counts": -ONE}, {}, "token count that is negative"),
        ({"a.in_sum2": ONES, "a.counts": ONE * 1e30}, {}, "above 2"),
        ({"a.weight": ONES}, {}, "no .in_sum2 tensors"),
        (
            {"a.in_sum2": ONES, "a.counts": ONE},
            {"chunk_type": T.INT64},
            "chunk_count must be a uint32, not int64",
        ),
        (
            {"a.in_sum2": ONES, "a.counts": ONE},
            {"drop": "imatrix.chunk_size"},
            "lacks the key imatrix.chunk_size",
        ),
        (
            {"a.in_sum2": ONES, "a.counts": ONE},
            {"chunk_count": 1 << 31},
            "chunk_count is 2147483648, above 2",
        ),
    ],
    ids=[
        "f16",
        "unpaired",
        "not-a-multiple",
        "nan",
        "negative-count",
        "huge-count",
        "no-sums",
        "int64",
        "no-key",
        "int32-overflow",
    ],
)
def test_bad_gguf_imatrix_is_one_line(tmp_path, tensors, kw, match):
    _refused(_write_gguf(tmp_path / "bad.gguf", tensors, **kw), match)


def test_truncated_or_oversized_claims(imx_file, tmp_path):
    data = imx_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    _refused(cut, "truncated")
    cut.write_bytes(data[:40])
    _refused(cut, "damaged or truncated")
    # the first tensor claims 2**40 columns: refused from the header, nothing that size is read or allocated
    huge = bytearray(data)
    name = b"blk.0.attn_k.weight.in_sum2"
    at = huge.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4
    huge[at : at + 8] = struct.pack("<Q", 1 << 40)
    (tmp_path / "huge.gguf").write_bytes(bytes(huge))
    _refused(tmp_path / "huge.gguf", "truncated")


def test_bad_legacy_files_are_one_line(tmp_path):
    dat = tmp_path / "bad.dat"
    a = np.ones(4, dtype=np.float32)
    cases = [
        (b"", "the entry count needs 4 bytes"),
        (b"not an importance matrix at all\n", "not an importance matrix llama.cpp reads"),
        (struct.pack("<i", 2**31 - 1) + bytes(40), "claims 2147483647 entries"),
        (_legacy([("blk.0.attn_q.weight", 1, a)])[:-2], "needs 16 bytes, 14 are left"),
        (struct.pack("<ii", 1, -5) + bytes(20), "name is -5 bytes"),
        (struct.pack("<ii", 1, 5) + b"abcde" + struct.pack("<ii", 1, 2**31 - 1), "needs 8589934588 bytes"),
        (_legacy([("x", 1, a), ("x", 1, a)]), "'x' appears twice"),
        (_legacy([("x", -1, a)]), "'x' has -1 calls"),
        (_legacy([("x", 1, a * -1)]), "negative or not finite"),
        (_legacy([("x", 1, a)], (1, "t.txt")) + b"junk", "4 bytes follow its end"),
    ]
    for data, match in cases:
        dat.write_bytes(data)
        _refused(dat, match)
    with pytest.raises(EdgemergeError, match="does not exist"):
        read_imatrix(tmp_path / "missing.gguf")
    with pytest.raises(EdgemergeError, match="is not a file"):
        read_imatrix(tmp_path)


def test_a_model_is_not_an_imatrix(model):
    msg = _refused(model, "not an imatrix")
    assert "general.type" in msg or "lacks the key" in msg


def test_imatrix_of_another_model_names_the_tensor(model, imx):
    other = Imatrix({**imx.entries, "blk.7.attn_q.weight": imx.entries["blk.0.attn_q.weight"]}, ["t"], 1, 64)
    with pytest.raises(EdgemergeError, match="entry for 'blk.7.attn_q.weight', a tensor the model lacks"):
        check_fits(other, read_gguf(model), Path("other.gguf"))
    wide = dict(imx.entries)
    wide["blk.0.attn_q.weight"] = Entry(np.ones(512, dtype=np.float32), np.array([3]))
    with pytest.raises(
        EdgemergeError, match=r"blk.0.attn_q.weight takes 256 columns x 1 .* has 512 columns x 1"
    ):
        check_fits(Imatrix(wide, ["t"], 1, 64), read_gguf(model), Path("wide.gguf"))
    old = Imatrix({"blk.0.ffn_down.weight": Entry(ONES, np.array([1]))}, legacy=True)
    with pytest.raises(EdgemergeError, match="blk.0.ffn_down.weight takes 512 values .* has 256 values"):
        check_fits(old, read_gguf(model), Path("old.dat"))
    check_fits(imx, read_gguf(model), Path("ok.gguf"))  # its own imatrix fits


def test_llama_imatrix_file_round_trips(model, tmp_path):
    """An imatrix computed by llama.cpp's own tool is read, and written back byte for byte."""
    tool = need_tool("llama-imatrix")
    text = tmp_path / "eu.txt"
    text.write_text((DATA_DIR / "eu.txt").read_text(encoding="utf-8") * 4, encoding="utf-8")
    theirs = tmp_path / "theirs.imatrix.gguf"
    cmd = [
        str(tool),
        "-m",
        str(model),
        "-f",
        str(text),
        "-o",
        str(theirs),
        "-c",
        "64",
        "--chunks",
        "4",
        "-t",
        "2",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    imx = read_imatrix(theirs)
    assert imx.datasets == [str(text)] and imx.chunk_size == 64 and imx.chunk_count == 4
    assert "blk.0.attn_q.weight" in imx.entries
    check_fits(imx, read_gguf(model), theirs)
    assert write_imatrix(tmp_path / "ours.gguf", imx).read_bytes() == theirs.read_bytes()
