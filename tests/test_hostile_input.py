"""Hostile or mistaken input (issue 19, classes 6 and 7): every case exits 2 with one short line and no
traceback, and the parsers that a small file could make hang or allocate (YAML aliases, safetensors header
lengths, GGUF counts) fail fast and small. Every hostile file is built here, in tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import gguf
import pytest

from edgemerge.cli import main
from edgemerge.errors import EdgemergeError
from edgemerge.gguf.inspect import read_gguf

from .models import write_recipe

MAX_LINE = 1000  # an error line never echoes more than a short piece of the input


def run(capsys, *args) -> tuple[int, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and len(err) < MAX_LINE, err[:2000]
    assert "Traceback" not in err and "internal error" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def bounded(fn, *, max_seconds: float = 5.0, max_bytes: int = 8 << 20) -> EdgemergeError:
    """Run `fn`, which must raise EdgemergeError, within a generous time (only a hang exceeds it) and a small
    peak of Python allocations (what an unbounded parser would spend first)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(EdgemergeError) as e:
            fn()
    finally:
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert seconds < max_seconds, seconds
    assert peak < max_bytes, peak
    assert len(e.value.message) < MAX_LINE and "\n" not in e.value.message
    return e.value


# ------------------------------------------------------------------------------------------------- recipes


def lol(levels: int = 9, width: int = 9) -> str:
    """A "billion laughs" recipe: each anchor repeats the previous one `width` times (9**9 strings)."""
    lines = ["name: r", "instruct: a/b", "base: a/c", "languages: [{code: eu, model: x/y}]"]
    lines.append('l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]')
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def lol_in_options(levels: int = 9) -> str:
    """The same expansion, anchored inside a field the recipe accepts (method options)."""
    lines = ["name: r", "instruct: a/b", "base: a/c", "languages: [{code: eu, model: x/y}]", "options:"]
    lines.append('  l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]')
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def load_and_parse(path: Path) -> None:
    """What `check` and `merge` do first with a recipe: load it, then parse the method's options."""
    from edgemerge.merge.methods import get_method
    from edgemerge.recipe import load_recipe

    r = load_recipe(path)
    get_method(r.method).parse_options(r.options)


BASE = "name: r\ninstruct: a/b\nbase: a/c\n"
LANG = "languages: [{code: eu, model: x/y}]\n"
_CODES = [a + b for a in "abc" for b in "abcdefghijklmnopqrstuvwxyz"]  # distinct language codes
HUGE = "9" * 400  # an integer beyond the float range
VERY_HUGE = "9" * 5000  # beyond Python's 4300-digit int conversion limit

RECIPES = [
    # (case, YAML text or bytes, needles)
    ("billion laughs", lol(), ["aliases"]),
    ("billion laughs in options", lol_in_options(), ["aliases"]),
    ("recursive alias", BASE + LANG + "x: &a [*a]\n", ["recursive"]),
    ("deep nesting", BASE + LANG + "x: " + "[" * 5000 + "]" * 5000 + "\n", ["nested more than 32"]),
    ("deep block nesting", BASE + LANG + "".join(" " * i + f"k{i}:\n" for i in range(200)), ["nested"]),
    ("many deep lines", BASE + LANG + ("x: " + "[" * 1000 + "]" * 1000 + "\n") * 100, ["nested"]),
    (
        "weight 400 digits",
        BASE + f"languages: [{{code: eu, model: x/y, weight: {HUGE}}}]\n",
        ["weight", "finite"],
    ),
    (
        "weight 5000 digits",
        BASE + f"languages: [{{code: eu, model: x/y, weight: {VERY_HUGE}}}]\n",
        ["integer"],
    ),
    ("weight 1e400", BASE + "languages: [{code: eu, model: x/y, weight: 1.0e+400}]\n", ["finite"]),
    ("weight hex", BASE + "languages: [{code: eu, model: x/y, weight: 0x" + "f" * 3000 + "}]\n", ["finite"]),
    ("weight nan", BASE + "languages: [{code: eu, model: x/y, weight: .nan}]\n", ["finite"]),
    ("name 300 chars", "name: " + "n" * 300 + "\ninstruct: a/b\nbase: a/c\n" + LANG, ["name", "128"]),
    ("name with slash", "name: a/../b\ninstruct: a/b\nbase: a/c\n" + LANG, ["name"]),
    ("name of 100k chars", "name: " + "x/" * 50_000 + "\ninstruct: a/b\nbase: a/c\n" + LANG, ["name"]),
    ("quant of 100k chars", BASE + LANG + "quants: [" + "Q" * 100_000 + "]\n", ["quantization type"]),
    ("50 quants", BASE + LANG + "quants: [" + ",".join(["Q8_0"] * 50) + "]\n", ["at most 32"]),
    ("option 400 digits", BASE + LANG + f"options: {{lambda: {HUGE}}}\n", ["lambda", "finite"]),
    ("option nested", BASE + LANG + "options: {lambda: {a: [1, 2]}}\n", ["options.lambda", "finite number"]),
    (
        "500 unknown options",
        BASE + LANG + "options: {" + ",".join(f"o{i}: 1" for i in range(500)) + "}\n",
        ["options.o0: unknown option", "(and 497 more)"],
    ),
    ("seed 2**70", BASE + LANG + "method: dare_ties\noptions: {seed: 1180591620717411303424}\n", ["seed"]),
    ("slerp t 1.5", BASE + LANG + "method: slerp\noptions: {t: 1.5}\n", ["options.t", "[0, 1]"]),
    ("nearswap t 0", BASE + LANG + "method: nearswap\noptions: {t: 0}\n", ["options.t", "(0, 1]"]),
    (
        "slerp schedule of 5000",
        BASE + LANG + "method: slerp\noptions: {t: [" + ",".join(["0.5"] * 5000) + "]}\n",
        ["options.t", "1024"],
    ),
    (
        "della band outside (0, 1)",
        BASE + LANG + "method: della\noptions: {density: 0.2, epsilon: 0.3}\n",
        ["options.epsilon", "density +- epsilon"],
    ),
    (
        "slerp of two languages",
        BASE + "languages: [{code: eu, model: x/y}, {code: ca, model: x/z}]\nmethod: nearswap\n",
        ["languages:", "one language model"],
    ),
    ("gate not a fraction", BASE + LANG + "eval: {min_stop_rate: 5}\n", ["min_stop_rate", "between 0 and 1"]),
    ("gate negative", BASE + LANG + "eval: {max_perplexity: -1}\n", ["max_perplexity"]),
    ("gate 400 digits", BASE + LANG + f"eval: {{max_kld_mean: {HUGE}}}\n", ["max_kld_mean"]),
    ("unknown field of 100k chars", BASE + LANG + "? " + "x" * 100_000 + "\n: 1\n", ["unknown field"]),
    ("method of 100k chars", BASE + LANG + "method: " + "m" * 100_000 + "\n", ["method"]),
    ("code of 100k chars", BASE + "languages: [{code: " + "e" * 100_000 + ", model: x/y}]\n", ["code"]),
    ("model with a NUL", BASE + 'languages: [{code: eu, model: "x\\0y"}]\n', ["model"]),
    (
        "model path too long",
        BASE + "languages: [{code: eu, model: /" + "d" * 5000 + "}]\n",
        ["model", "4096"],
    ),
    ("base with a newline", 'name: r\ninstruct: a/b\nbase: "a\\nb"\n' + LANG, ["base"]),
    (
        "70 languages",
        BASE + "languages: [" + ",".join(f"{{code: {c}, model: x/y}}" for c in _CODES[:70]) + "]\n",
        ["64"],
    ),
    ("license with a newline", BASE + LANG + 'license: "mit\\n---"\n', ["license"]),
    ("not a mapping", "- a\n- b\n", ["mapping"]),
    ("two documents", BASE + LANG + "---\n" + BASE, ["YAML"]),
    ("python tag", BASE + LANG + "x: !!python/object/apply:os.system [touch PWNED]\n", ["YAML"]),
    ("not UTF-8", b"name: \xff\xfe\x00r\n", ["UTF-8"]),
    ("too large", BASE + LANG + "#" * 300_000 + "\n", ["larger than"]),
]


@pytest.mark.parametrize(("case", "text", "needles"), RECIPES, ids=[c[0] for c in RECIPES])
def test_hostile_recipes_exit_2_fast_and_small(capsys, tmp_path, monkeypatch, case, text, needles):
    monkeypatch.chdir(tmp_path)  # the python-tag case would create PWNED here if it ran
    path = tmp_path / "r.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    bounded(lambda: load_and_parse(path))
    assert_one_line(*run(capsys, "check", path), *needles)
    assert not (tmp_path / "PWNED").exists()


def test_the_billion_laughs_stop_before_any_expansion(tmp_path):
    """The 9**9-string document is refused after one visit per distinct node: a 12-level one (9**12 strings)
    costs no more than the 9-level one."""
    path = tmp_path / "r.yaml"
    path.write_text(lol(levels=12))
    from edgemerge.recipe import load_recipe

    assert "aliases" in bounded(lambda: load_recipe(path), max_seconds=2.0, max_bytes=2 << 20).message


@pytest.mark.parametrize("kind", ["folder", "device", "missing"])
def test_a_recipe_that_is_not_a_file(capsys, tmp_path, kind):
    path = {"folder": tmp_path, "device": Path("/dev/zero"), "missing": tmp_path / "nope.yaml"}[kind]
    code, err = run(capsys, "check", path)
    assert_one_line(code, err, "not found" if kind == "missing" else "recipe")


def test_anchors_within_bounds_still_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ninstruct: &m a/b\nbase: *m\nlanguages: [{code: eu, model: *m, weight: 0.5}]\n")
    from edgemerge.recipe import load_recipe

    r = load_recipe(path)
    assert r.base == r.instruct == r.languages[0].model == "a/b"


# --------------------------------------------------------------------------------------------- model folders


def _json_edit(name, change):
    def edit(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        data = change(data)
        (folder / name).write_text(json.dumps(data))

    return edit


def _set(**fields):
    def change(d):
        d.update(fields)
        return d

    return change


def _write(name, text):
    def edit(folder: Path) -> None:
        (folder / name).write_text(text) if isinstance(text, str) else (folder / name).write_bytes(text)

    return edit


def _first_shard(folder: Path) -> Path:
    return min(folder.glob("*.safetensors"))


def _shard(header: bytes | None = None, *, claimed: int | None = None, data: bytes = b"", sparse: int = 0):
    """Replace the first shard: a header (or only a claimed length), data, optionally a sparse tail."""

    def edit(folder: Path) -> None:
        path = _first_shard(folder)
        raw = header or b""
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data)
            if sparse:
                f.truncate(sparse)

    return edit


def _drop_token_id(d):
    d["added_tokens"][0].pop("id")
    return d


def _tokenizer_config_token(d):
    d["added_tokens_decoder"] = {"7": {"special": True}}
    return d


MODEL_FOLDERS = [
    # (case, file edit of the eu model, needles)
    ("index weight_map a list", _json_edit("model.safetensors.index.json", _set(weight_map=["a"])), ["weight_map"]),
    ("index values not strings", _json_edit("model.safetensors.index.json", lambda d: {"weight_map": {"a": 1}}), ["weight_map"]),
    ("index path outside", _json_edit("model.safetensors.index.json", lambda d: {"weight_map": {"a": "../x.safetensors"}}), ["weight_map"]),
    ("index not an object", _write("model.safetensors.index.json", "[1, 2]"), ["not a JSON object"]),
    ("index not JSON", _write("model.safetensors.index.json", "{"), ["not valid JSON"]),
    ("index nested deep", _write("model.safetensors.index.json", "[" * 100_000 + "]" * 100_000), ["nested too deeply"]),
    ("config a list", _write("config.json", "[]"), ["config.json", "not a JSON object"]),
    ("config layers a string", _json_edit("config.json", _set(num_hidden_layers="32")), ["num_hidden_layers"]),
    ("config vocab 2**62", _json_edit("config.json", _set(vocab_size=2**62)), ["vocab_size"]),
    ("config hidden a float", _json_edit("config.json", _set(hidden_size=256.5)), ["hidden_size"]),
    ("config text_config a list", _json_edit("config.json", _set(text_config=[1])), ["text_config"]),
    ("config architectures a string", _json_edit("config.json", _set(architectures="Llama")), ["architectures"]),
    ("config tie a string", _json_edit("config.json", _set(tie_word_embeddings="false")), ["tie_word_embeddings"]),
    ("config eos a string", _json_edit("config.json", _set(eos_token_id="2")), ["eos_token_id"]),
    ("config not UTF-8", _write("config.json", b'{"a": "\xff"}'), ["UTF-8"]),
    ("added token without id", _json_edit("tokenizer.json", _drop_token_id), ["added_tokens[0].id"]),
    ("vocab id a string", _json_edit("tokenizer.json", lambda d: {**d, "model": {**d["model"], "vocab": {"a": "1"}}}), ["model.vocab"]),
    ("tokenizer.json a list", _write("tokenizer.json", "[]"), ["tokenizer.json"]),
    ("decoder token without content", _json_edit("tokenizer_config.json", _tokenizer_config_token), ["added_tokens_decoder"]),
    ("decoder key not an id", _json_edit("tokenizer_config.json", _set(added_tokens_decoder={"x": {"content": "a"}})), ["added_tokens_decoder"]),
    ("chat_template a number", _json_edit("tokenizer_config.json", _set(chat_template=5)), ["chat_template"]),
    ("add_bos_token a string", _json_edit("tokenizer_config.json", _set(add_bos_token="yes")), ["add_bos_token"]),
    ("added_tokens.json id null", _write("added_tokens.json", '{"<x>": null}'), ["added_tokens.json"]),
    ("safetensors header too large", _shard(claimed=2 * 10**9, sparse=3 * 10**9), ["safetensors"]),
    ("safetensors header beyond the file", _shard(claimed=10**6), ["truncated"]),
    ("safetensors header a list", _shard(b"[1, 2, 3] "), ["not a JSON object"]),
    ("safetensors header not JSON", _shard(b"{{{{{{{{"), ["not JSON"]),
    ("safetensors entry without dtype", _shard(b'{"a": {"shape": [1], "data_offsets": [0, 4]}}', data=b"0000"), ["dtype"]),
    ("safetensors offsets outside", _shard(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4000]}}', data=b"0000"), ["outside"]),
    ("safetensors size mismatch", _shard(b'{"a": {"dtype": "F32", "shape": [9], "data_offsets": [0, 4]}}', data=b"0000"), ["need 36"]),
    ("safetensors shape negative", _shard(b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', data=b"0000"), ["shape"]),
]  # fmt: skip


@pytest.fixture
def eu_copy(tmp_path, merge_family):
    """A family whose eu model is a fresh copy, to be broken by a case."""
    dst = tmp_path / "lang-eu"
    shutil.copytree(merge_family["eu"], dst)
    return dict(merge_family, eu=dst)


@pytest.mark.parametrize(("case", "edit", "needles"), MODEL_FOLDERS, ids=[c[0] for c in MODEL_FOLDERS])
def test_hostile_model_folders_exit_2(capsys, tmp_path, eu_copy, case, edit, needles):
    edit(eu_copy["eu"])
    recipe = write_recipe(tmp_path / "r.yaml", eu_copy, {"eu": 1.0})
    from edgemerge.sources import resolve_recipe

    def check():
        from edgemerge.check import check_compat
        from edgemerge.recipe import load_recipe

        check_compat(resolve_recipe(load_recipe(recipe)))

    assert_one_line(*run(capsys, "check", recipe), *needles)
    bounded(check, max_bytes=16 << 20)  # after the CLI run: the modules are imported, only the work counts
    # `export` reads the same files through its own path (GGUF converter): the same one line
    out = tmp_path / "x.gguf"
    code, err = run(capsys, "export", eu_copy["eu"], "--out", out)
    assert_one_line(code, err)
    assert not out.exists()


def test_safetensors_header_claim_is_refused_before_it_is_read(tmp_path):
    """A 3 GB sparse file whose header claims 2 GB: refused with under 1 MB allocated (it used to read 2 GB)."""
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 2 * 10**9))
        f.truncate(3 * 10**9)
    from edgemerge.sources import fingerprint

    assert "claims" in bounded(lambda: fingerprint(tmp_path), max_bytes=1 << 20).message


# ----------------------------------------------------------------------------------------------------- GGUF

T = gguf.GGUFValueType


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def arr(etype: int, n: int, body: bytes = b"") -> bytes:
    return struct.pack("<IQ", etype, n) + body


GOOD_KV = [
    kv("general.architecture", T.STRING, _s("llama")),
    kv("llama.context_length", T.UINT32, u32(2048)),
    kv("tokenizer.ggml.tokens", T.ARRAY, arr(T.STRING, 2, _s("a") + _s("b"))),
]
TENSOR = _s("t") + u32(1) + struct.pack("<Q", 4) + u32(gguf.GGMLQuantizationType.F32) + struct.pack("<Q", 0)


def gguf_file(
    path: Path,
    kvs: list[bytes] = GOOD_KV,
    tensors: list[bytes] = (TENSOR,),
    *,
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    data: bytes = b"\0" * 16,
    sparse: int = 0,
) -> Path:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)  # fmt: skip
    body = head + b"".join(kvs) + b"".join(tensors)
    path.write_bytes(body + b"\0" * (-len(body) % 32) + data)
    if sparse:  # zeros that take no disk: room for the counts a case claims
        os.truncate(path, sparse)
    return path


def with_kv(*extra: bytes) -> dict:
    return {"kvs": [*GOOD_KV, *extra]}


def nested(depth: int) -> bytes:
    return struct.pack("<I", T.ARRAY) + b"".join(arr(T.ARRAY, 1) for _ in range(depth)) + arr(T.UINT8, 0)


GGUFS = [
    # (case, gguf_file keyword arguments, needles)
    ("2**60 key/values", {"n_kv": 2**60}, ["key/values"]),
    ("2**60 tensors", {"n_tensors": 2**60}, ["tensor infos"]),
    ("key length 2**60", {"kvs": [_s("x")[:0] + struct.pack("<Q", 2**60)]}, ["claims"]),
    ("string length 2**60", with_kv(kv("general.name", T.STRING, struct.pack("<Q", 2**60))), ["claims"]),
    ("uint8 array of 2**60", with_kv(kv("x", T.ARRAY, arr(T.UINT8, 2**60))), ["array of"]),
    ("string array of 2**60", with_kv(kv("x", T.ARRAY, arr(T.STRING, 2**60))), ["array of"]),
    ("bool array of 2**60", with_kv(kv("x", T.ARRAY, arr(T.BOOL, 2**60))), ["array of"]),
    ("array array of 2**60", with_kv(kv("x", T.ARRAY, arr(T.ARRAY, 2**60))), ["array of"]),
    ("2**25 empty strings", {**with_kv(kv("x", T.ARRAY, arr(T.STRING, 2**25))), "sparse": 2**29}, ["no GGUF field"]),
    ("arrays nested 1000 deep", with_kv(_s("x") + nested(1000)), ["nests arrays"]),
    ("unknown value type", with_kv(kv("x", 99, b"")), ["unknown value type"]),
    ("duplicate key", with_kv(GOOD_KV[0]), ["twice"]),
    ("alignment 0", with_kv(kv("general.alignment", T.UINT32, u32(0))), ["general.alignment"]),
    ("alignment 48", with_kv(kv("general.alignment", T.UINT32, u32(48))), ["power of two"]),
    ("alignment a string", with_kv(kv("general.alignment", T.STRING, _s("32"))), ["general.alignment"]),
    ("alignment a uint64", with_kv(kv("general.alignment", T.UINT64, struct.pack("<Q", 32))), ["uint32"]),
    ("alignment a float", with_kv(kv("general.alignment", T.FLOAT32, struct.pack("<f", 32))), ["uint32"]),
    ("context length 0", {"kvs": [GOOD_KV[0], kv("llama.context_length", T.UINT32, u32(0))]}, ["context_length"]),
    ("context length a string", {"kvs": [GOOD_KV[0], kv("llama.context_length", T.STRING, _s("2048"))]}, ["context_length"]),
    ("architecture a number", {"kvs": [kv("general.architecture", T.UINT32, u32(1))]}, ["general.architecture"]),
    ("tokens not strings", {"kvs": [GOOD_KV[0], kv("tokenizer.ggml.tokens", T.ARRAY, arr(T.UINT32, 1, u32(5)))]}, ["tokens"]),
    ("eos id a string", with_kv(kv("tokenizer.ggml.eos_token_id", T.STRING, _s("2"))), ["eos_token_id"]),
    ("file type a string", with_kv(kv("general.file_type", T.STRING, _s("F16"))), ["file_type"]),
    ("chat template a number", with_kv(kv("tokenizer.chat_template", T.UINT32, u32(1))), ["chat_template"]),
    ("version 1", {"version": 1}, ["version 1"]),
    ("big-endian", {"version": 3 << 24}, ["version"]),
    ("tensor with 2**31 dims", {"tensors": [_s("t") + u32(2**31)]}, ["dimensions"]),
    ("tensor of unknown type", {"tensors": [_s("t") + u32(1) + struct.pack("<Q", 4) + u32(999) + struct.pack("<Q", 0)]}, ["unknown type"]),
    ("tensor of 2**120 elements", {"tensors": [_s("t") + u32(2) + struct.pack("<QQ", 2**60, 2**60) + u32(0) + struct.pack("<Q", 0)]}, ["truncated"]),
    ("tensor name twice", {"tensors": [TENSOR, TENSOR]}, ["twice"]),
    ("tensor name too long", {"tensors": [_s("t" * 100) + TENSOR[9:]]}, ["longer"]),
    ("tensor misaligned", {"tensors": [TENSOR[:-8] + struct.pack("<Q", 3)]}, ["misaligned"]),
    ("tensor data missing", {"data": b""}, ["truncated"]),
]  # fmt: skip


def test_the_reference_gguf_is_accepted(tmp_path):
    """The cases below differ from this file by the one field they break."""
    info = read_gguf(gguf_file(tmp_path / "ok.gguf"))
    assert info.kv["llama.context_length"] == 2048 and [t.name for t in info.tensors] == ["t"]


@pytest.mark.parametrize(("case", "fields", "needles"), GGUFS, ids=[c[0] for c in GGUFS])
def test_hostile_ggufs_exit_2_fast_and_small(capsys, tmp_path, case, fields, needles):
    path = gguf_file(tmp_path / "bad.gguf", **fields)
    err = bounded(lambda: read_gguf(path), max_seconds=2.0, max_bytes=1 << 20)
    for needle in needles:
        assert needle in err.message, (needle, err.message)
    assert_one_line(*run(capsys, "eval", path, "--lang", "eu"), *needles)
    assert_one_line(*run(capsys, "chat", path), *needles)
    assert_one_line(*run(capsys, "quantize", path, "--quant", "Q8_0", "--out-dir", tmp_path), *needles)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


@pytest.mark.parametrize("etype", [T.UINT8, T.STRING])
def test_gguf_to_hf_checks_the_header_before_gguf_py_reads_it(tmp_path, etype):
    """gguf-py's GGUFReader does not return within a minute on a uint8 array claiming 2**60 values (and fails
    with an IndexError on a string array of that count); our bounded reader refuses both first."""
    from edgemerge.gguf.to_hf import gguf_to_hf

    path = gguf_file(tmp_path / "bad.gguf", **with_kv(kv("x", T.ARRAY, arr(etype, 2**60))))
    bounded(
        lambda: gguf_to_hf(path, tmp_path / "out", tokenizer_model=tmp_path / "tok.model"), max_seconds=2.0
    )
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- eval flags


def _mc(tmp_path: Path, content: str | bytes, name: str = "mc.json") -> Path:
    p = tmp_path / name
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return p


def tqa(choices, labels, question="Q?"):
    return json.dumps([{"question": question, "mc1_targets": {"choices": choices, "labels": labels}}])


def eus(candidates, answer, question="Q?"):
    return json.dumps({"question": question, "candidates": candidates, "answer": answer}) + "\n"


EVAL_FLAGS = [
    # (case, extra arguments (a callable of tmp_path for files), needles)
    ("--ctx 1", ["--ctx", "1"], ["--ctx", "between 16"]),
    ("--ctx 0", ["--ctx", "0"], ["--ctx"]),
    ("--ctx -5", ["--ctx", "-5"], ["--ctx"]),
    ("--ctx huge", ["--ctx", str(10**30)], ["--ctx"]),
    ("--mc-limit -1", ["--mc-limit", "-1"], ["--mc-limit"]),
    ("--mc-limit 0", ["--mc-limit", "0"], ["--mc-limit"]),
    ("--max-tokens 0", ["--max-tokens", "0"], ["--max-tokens"]),
    ("--max-tokens -3", ["--max-tokens", "-3"], ["--max-tokens"]),
    ("--threads 0", ["--threads", "0"], ["--threads"]),
    ("--threads 10**6", ["--threads", "1000000"], ["--threads"]),
    ("--min-fidelity 2", ["--min-fidelity", "2"], ["--min-fidelity", "between 0 and 1"]),
    ("--min-stop-rate nan", ["--min-stop-rate", "nan"], ["--min-stop-rate", "finite"]),
    ("--max-perplexity -1", ["--max-perplexity", "-1"], ["--max-perplexity"]),
    ("--max-kld inf", ["--max-kld", "inf"], ["--max-kld"]),
    ("mc no correct label", lambda t: ["--mc", _mc(t, tqa(["a", "b"], [0, 0]))], ["exactly one"]),
    ("mc two correct labels", lambda t: ["--mc", _mc(t, tqa(["a", "b"], [1, 1]))], ["exactly one"]),
    ("mc labels too short", lambda t: ["--mc", _mc(t, tqa(["a", "b"], [1]))], ["labels"]),
    ("mc label true", lambda t: ["--mc", _mc(t, tqa(["a", "b"], [True, 0]))], ["labels"]),
    ("mc choices not strings", lambda t: ["--mc", _mc(t, tqa([1, 2], [1, 0]))], ["must be a string"]),
    ("mc choices a string", lambda t: ["--mc", _mc(t, tqa("ab", [1, 0]))], ["choices"]),
    ("mc question a number", lambda t: ["--mc", _mc(t, tqa(["a", "b"], [1, 0], question=5))], ["question"]),
    ("mc candidates not strings", lambda t: ["--mc", _mc(t, eus([None, "b"], 0), "m.jsonl")], ["candidates[0]"]),
    ("mc answer out of range", lambda t: ["--mc", _mc(t, eus(["a", "b"], 2), "m.jsonl")], ["answer"]),
    ("mc answer a bool", lambda t: ["--mc", _mc(t, eus(["a", "b"], True), "m.jsonl")], ["answer"]),
    ("mc malformed line", lambda t: ["--mc", _mc(t, eus(["a", "b"], 0) + "{oops\n", "m.jsonl")], [":2: not JSON"]),
    ("mc not objects", lambda t: ["--mc", _mc(t, "[1, 2]")], ["JSON object"]),
    ("mc nested deep", lambda t: ["--mc", _mc(t, "[" * 100_000 + "]" * 100_000)], ["nested too deeply"]),
    ("mc not UTF-8", lambda t: ["--mc", _mc(t, b"\xff\xfe")], ["UTF-8"]),
    ("mc empty", lambda t: ["--mc", _mc(t, "\n\n")], ["no questions"]),
    ("mc a folder", lambda t: ["--mc", t], ["not found"]),
    ("mc 1000 choices", lambda t: ["--mc", _mc(t, tqa(["a"] * 1000, [1] + [0] * 999))], ["1 to 100"]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "extra", "needles"), EVAL_FLAGS, ids=[c[0] for c in EVAL_FLAGS])
def test_bad_eval_flags_and_mc_files_exit_2_before_loading_a_model(capsys, tmp_path, case, extra, needles):
    model = gguf_file(tmp_path / "m.gguf")  # a valid header without weights: llama.cpp never gets it
    args = extra(tmp_path) if callable(extra) else extra
    assert_one_line(*run(capsys, "eval", model, "--lang", "eu", *args), *needles)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--ctx", "1"], "--ctx"),
        (["--ctx", "0"], "--ctx"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--ctx", "128", "--max-tokens", "500"], "--max-tokens"),
        (["--threads", "-1"], "--threads"),
    ],
)
def test_bad_chat_flags_exit_2(capsys, tmp_path, args, needle):
    assert_one_line(*run(capsys, "chat", gguf_file(tmp_path / "m.gguf"), *args), needle)


@pytest.mark.parametrize("threads", ["0", "-2", "100000"])
def test_bad_thread_counts_exit_2_in_quantize_and_build(capsys, tmp_path, threads):
    model = gguf_file(tmp_path / "m.gguf")
    assert_one_line(*run(capsys, "quantize", model, "--quant", "Q8_0", "--threads", threads), "--threads")
    assert_one_line(
        *run(capsys, "build", "--demo", "--threads", threads, "--out", tmp_path / "b"), "--threads"
    )
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--quant", ""), ("--quant", ",,"), ("--weight", ""), ("--weight", " , "), ("--lang", ",")],
)
def test_build_list_flags_given_empty_exit_2(capsys, tmp_path, build_family, flag, value):
    """An empty list flag is a mistake, not "use the recipe's" (it built the recipe's quants silently)."""
    args = ["--recipe", build_family["recipe"]] if flag != "--lang" else []
    code, err = run(capsys, "build", *args, flag, value, "--out", tmp_path / "b", "--skip-eval")
    assert_one_line(code, err, flag, "no value")
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------------------- closed pipes


@pytest.mark.parametrize("args", [["langid", "{file}"], ["langid", "{file}", "--scores"], ["langid", "-"]])
def test_a_closed_output_pipe_ends_quietly(tmp_path, args):
    """`edgemerge langid f | head -1`: the reader goes away after one line. Like coreutils: no message, the
    SIGPIPE status 141 (128 + 13), not the exit 1 of an internal error."""
    text = tmp_path / "lines.txt"
    text.write_text("Kaixo, zer moduz zaude gaur?\n" * 50_000, encoding="utf-8")
    argv = [a.format(file=text) for a in args]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-c", "from edgemerge.cli import main; main()", *argv]
    with open(text, "rb") as stdin:
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        first = proc.stdout.readline()
        proc.stdout.close()  # what head does after its line
        err = proc.stderr.read()
        code = proc.wait(timeout=120)
    assert first.strip().split(b"\t")[0] == b"eu"
    assert code == 141 and err == b"", (code, err)


def test_real_ggufs_pass_the_stricter_header_checks():
    """The checks refuse only what llama.cpp would: every GGUF written by llama.cpp's tools here is accepted,
    the vocabulary-only ones (no tensors, so no padded data section) too."""
    from .shared import need_shared

    files = sorted(need_shared("tokenizers", "llama.cpp-vocab").glob("*.gguf"))
    files.append(need_shared("models", "stories260K", "stories260K.gguf"))
    for path in files:
        info = read_gguf(path)
        assert info.kv["general.architecture"] and info.version in (2, 3), path


# ------------------------------------------------------------------------------------------ error messages


def test_every_error_message_is_one_bounded_line():
    """The last safety net (EdgemergeError itself): line breaks and terminal control characters become
    spaces, and a huge message keeps its start and its end."""
    e = EdgemergeError("bad value\n\x1b[2Jcleared?\u2028" + "x" * 100_000 + " do this")
    assert "\n" not in e.message and "\x1b" not in e.message and "\u2028" not in e.message
    assert len(e.message) <= 2000 and e.message.startswith("bad value") and e.message.endswith("do this")


@pytest.mark.parametrize(
    "value",
    ["s" * 10**6, 10**5000, list(range(10**5)), {"k" * 1000: [1] * 1000}, b"\0" * 10**6, [[[[[[1]]]]]]],
    ids=["long string", "5000-digit int", "long list", "big dict", "bytes", "deep list"],
)
def test_shown_values_are_short_whatever_the_input(value):
    from edgemerge.limits import ECHO_CHARS, shown

    text = shown(value)
    assert len(text) <= ECHO_CHARS and "\n" not in text


def test_an_internal_error_is_one_line_too(capsys, monkeypatch):
    """Even a bug's message (exit 1) is cut to one line: its text may come from the input."""
    from edgemerge.cli import merge

    def broken(path):
        raise KeyError("x\n" * 10_000)

    monkeypatch.setattr(merge, "load_recipe", broken)
    code, err = run(capsys, "check", "r.yaml")
    assert code == 1 and err.count("\n") == 1 and len(err) < 2200, err[:300]
