"""Issue 19 class 1: a model folder never runs code. Hostile folders (built here) carry a payload module that
would create a marker file if imported; every entry point must refuse them in one line naming the field (exit
2), with stdin answering "y" to any prompt, and leave no marker and no output."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import yaml

from edgemerge.errors import EdgemergeError
from edgemerge.gguf.vocab import SafeLlamaHfVocab
from edgemerge.trust import custom_code_field, load_config_dict, load_tokenizer, no_stdin

PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('payload ran')\n"
YES = "y\n" * 200


def _edit_json(folder: Path, name: str, change) -> None:
    path = folder / name
    data = json.loads(path.read_text()) if path.exists() else {}
    change(data)
    path.write_text(json.dumps(data))


def _auto_map_config(d):
    d["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}


def _nested_auto_map(d):
    d["text_config"] = {"auto_map": {"AutoConfig": "evil.EvilConfig"}}


def _auto_map_tokenizer(d):
    d["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizerFast"]}


def _legacy_auto_map_tokenizer(d):
    d["auto_map"] = ["evil.EvilTokenizer", None]


def _custom_tokenizer_class(d):
    d["tokenizer_class"] = "EvilTokenizer"


def _not_a_tokenizer_class(d):
    d["tokenizer_class"] = "AutoModelForCausalLM"


def _tokenizer_class_in_config(d):
    d["tokenizer_class"] = "EvilTokenizerFast"


def _custom_pipelines(d):
    d["custom_pipelines"] = {"text-generation": {"impl": "evil.EvilPipeline"}}


# (file edited, edit, text the error must contain)
HOSTILE = {
    "config auto_map": ("config.json", _auto_map_config, "config.json auto_map"),
    "config text_config.auto_map": ("config.json", _nested_auto_map, "config.json text_config.auto_map"),
    "config tokenizer_class": ("config.json", _tokenizer_class_in_config, "config.json tokenizer_class"),
    "config custom_pipelines": ("config.json", _custom_pipelines, "config.json custom_pipelines"),
    "tokenizer auto_map": ("tokenizer_config.json", _auto_map_tokenizer, "tokenizer_config.json auto_map"),
    "tokenizer legacy auto_map": (
        "tokenizer_config.json",
        _legacy_auto_map_tokenizer,
        "tokenizer_config.json auto_map",
    ),
    "tokenizer_class custom": (
        "tokenizer_config.json",
        _custom_tokenizer_class,
        "tokenizer_config.json tokenizer_class 'EvilTokenizer'",
    ),
    "tokenizer_class not a tokenizer": (
        "tokenizer_config.json",
        _not_a_tokenizer_class,
        "tokenizer_class 'AutoModelForCausalLM'",
    ),
}


def hostile_copy(src: Path, dst: Path, kind: str, marker: Path) -> Path:
    """A copy of the model folder `src` made hostile: the field of `kind` plus payload modules."""
    shutil.copytree(src, dst)
    fname, edit, _ = HOSTILE[kind]
    _edit_json(dst, fname, edit)
    (dst / "evil.py").write_text(PAYLOAD.format(marker=str(marker)))
    return dst


@pytest.fixture
def cli(cli, monkeypatch):
    """conftest's `edgemerge ...` in-process, with stdin saying yes to everything: (exit code, stderr)."""

    def run(*args) -> tuple[int, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(YES))
        code, _, err = cli(*args)
        return code, err

    return run


def test_clean_folders_have_no_custom_code(merge_family, llama_family):
    for folder in (merge_family["instruct"], llama_family["instruct"], llama_family["base"]):
        assert custom_code_field(folder) is None


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_custom_code_field_names_the_field(tmp_path, merge_family, kind):
    folder = hostile_copy(merge_family["instruct"], tmp_path / "m", kind, tmp_path / "marker")
    assert HOSTILE[kind][2] in custom_code_field(folder)


@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("loader", [load_tokenizer, load_config_dict])
def test_library_loaders_refuse(tmp_path, llama_family, kind, loader, monkeypatch):
    import io

    marker = tmp_path / "marker"
    folder = hostile_copy(llama_family["instruct"], tmp_path / "m", kind, marker)
    monkeypatch.setattr(sys, "stdin", io.StringIO(YES))
    with pytest.raises(EdgemergeError, match="never does"):
        loader(folder)
    assert not marker.exists()


def test_transformers_itself_never_prompts_under_our_flags(tmp_path, llama_family, monkeypatch):
    """Defence in depth: even without the up-front refusal, trust_remote_code=False with stdin hidden cannot
    run the payload (transformers raises instead)."""
    import io

    from transformers import AutoConfig, AutoTokenizer

    marker = tmp_path / "marker"
    folder = hostile_copy(llama_family["instruct"], tmp_path / "m", "tokenizer auto_map", marker)
    _edit_json(folder, "config.json", _auto_map_config)
    monkeypatch.setattr(sys, "stdin", io.StringIO(YES))
    for loader in (AutoTokenizer, AutoConfig):
        with no_stdin():
            try:
                loader.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
            except (ValueError, OSError):
                pass
    assert not marker.exists()


def _recipe(tmp_path: Path, family: dict, **models) -> Path:
    data = {
        "name": "hostile",
        "instruct": str(models.get("instruct", family["instruct"])),
        "base": str(models.get("base", family["base"])),
        "languages": [{"code": "eu", "model": str(models.get("eu", family["eu"])), "weight": 1.0}],
        "quants": ["Q8_0"],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# entry point -> argv given (tmp_path, recipe, hostile folder); the output it would write
ENTRY_POINTS = {
    "export": lambda t, r, m: (["export", m, "--out", t / "out.gguf"], t / "out.gguf"),
    "merge --gguf": lambda t, r, m: (["merge", r, "--gguf", t / "out.gguf"], t / "out.gguf"),
    "merge --out": lambda t, r, m: (["merge", r, "--out", t / "out"], t / "out"),
    "check": lambda t, r, m: (["check", r], None),
    "build": lambda t, r, m: (["build", "--recipe", r, "--out", t / "dist", "--skip-eval"], t / "dist"),
}


# export reads one folder; the recipe commands are tried with the hostile folder as instruct and as a language
CASES = [("export", "instruct")] + [
    (e, r) for e in sorted(ENTRY_POINTS) if e != "export" for r in ("instruct", "eu")
]


@pytest.mark.parametrize(
    "kind", ["config auto_map", "tokenizer auto_map", "tokenizer_class custom", "config text_config.auto_map"]
)
@pytest.mark.parametrize(("entry", "role"), CASES)
def test_entry_points_refuse_hostile_folders(tmp_path, merge_family, cli, kind, entry, role):
    marker = tmp_path / "marker"
    hostile = hostile_copy(merge_family[role], tmp_path / f"{role}-hostile", kind, marker)
    recipe = _recipe(tmp_path, merge_family, **{role: hostile})
    argv, output = ENTRY_POINTS[entry](tmp_path, recipe, hostile)
    code, err = cli(*argv)
    assert code == 2, err
    assert err.strip().startswith("error: ") and err.strip().count("\n") == 0, err
    assert HOSTILE[kind][2] in err, err
    assert not marker.exists()
    if output is not None:
        assert not output.exists() or (output.is_dir() and not any(output.iterdir()))


def test_yes_pipe_on_real_stdin_runs_nothing(tmp_path, llama_family):
    """The issue's reproduction: `yes | edgemerge export` in a fresh process, stdin a real pipe."""
    marker = tmp_path / "marker"
    hostile = hostile_copy(llama_family["instruct"], tmp_path / "m", "config auto_map", marker)
    _edit_json(hostile, "tokenizer_config.json", _auto_map_tokenizer)
    r = subprocess.run(
        [sys.executable, "-c", "from edgemerge.cli import main; main()", "export", str(hostile), "--out",
         str(tmp_path / "x.gguf")],
        input=YES,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "auto_map" in r.stderr and "[y/N]" not in r.stdout + r.stderr
    assert not marker.exists()
    assert not (tmp_path / "x.gguf").exists()


def test_safe_llama_hf_vocab_is_gguf_pys(spm512_tokenizer, tmp_path):
    """Our LlamaHfVocab (tokenizer loaded through the guard) yields gguf-py's tokens, scores and types."""
    ours = list(SafeLlamaHfVocab(spm512_tokenizer).all_tokens())
    assert ours == list(gguf.LlamaHfVocab(spm512_tokenizer).all_tokens()) and len(ours) == 512
    marker = tmp_path / "marker"
    hostile = hostile_copy(spm512_tokenizer, tmp_path / "t", "tokenizer auto_map", marker)
    with pytest.raises(EdgemergeError, match="tokenizer_config.json auto_map"):
        SafeLlamaHfVocab(hostile)
    assert not marker.exists()
