"""The conventions every command shares (edgemerge/cli/common.py; README "Command-line conventions"): list
options take commas and repeats, --json is a switch, -m/-c/-t/-o/-q as llama.cpp's, examples in every --help."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import typer.main
from rich.markup import render

from edgemerge.cli.common import app, listed, numbers
from edgemerge.errors import EdgemergeError


def _commands() -> list[list[str]]:
    """Every command and subcommand, as the words that call it (the root too)."""
    root = typer.main.get_command(app)
    out = [[]]
    for name, cmd in root.commands.items():
        out.append([name])
        for sub in getattr(cmd, "commands", {}):
            out.append([name, sub])
    return out


def _command(words: list[str]):
    cmd = typer.main.get_command(app)
    for w in words:
        cmd = cmd.commands[w]
    return cmd


def test_list_options_take_commas_repeats_or_both():
    assert listed(["Q4_K_M,Q5_K_M", "Q8_0"], "--quant") == ["Q4_K_M", "Q5_K_M", "Q8_0"]
    assert listed(["Q4_K_M", " Q8_0 "], "--quant") == ["Q4_K_M", "Q8_0"]
    assert listed("eu,ca", "--lang") == ["eu", "ca"]
    assert listed(None, "--quant") is None and listed([], "--quant") is None
    with pytest.raises(EdgemergeError, match="--quant: got ' , ', no value"):
        listed([" , "], "--quant")
    assert numbers(["0.5,1", "1.5"], "--weights") == [0.5, 1.0, 1.5]
    with pytest.raises(EdgemergeError, match="not a number"):
        numbers(["0.5,x"], "--weights")


@pytest.mark.parametrize("words", _commands(), ids=lambda w: " ".join(w) or "edgemerge")
def test_every_help_has_examples_and_readable_options(words, cli):
    code, out, _ = cli(*words, "--help")
    assert code == 0 and "Examples" in out, out
    examples = [render(p).plain.strip() for p in _command(words).epilog.split("\n\n")[1:]]
    examples = [e for e in examples if e.startswith("edgemerge ")]
    assert any(e.startswith(f"edgemerge {' '.join(words)}") for e in examples)  # one of this very command
    for e in examples:  # each on one line of an 80-column help, to copy as it is
        assert e in out, (e, out)
    assert "<bool>" not in out and "<str>" not in out and "<path>" not in out, (
        out
    )  # switches, values readable
    assert not re.search(r"\{[A-Za-z_]+\}", out), out  # arguments as RECIPE, not {RECIPE}
    assert "…" not in out


def test_switches_and_short_options_mean_the_same_everywhere():
    """--json is a flag taking no value; -t is --threads, -o an output, -q --quant, -l --lang, -c a context or
    chunk, -m the model, wherever they exist."""
    root = typer.main.get_command(app)
    meaning = {"-t": "threads", "-o": None, "-q": "quant", "-l": "lang", "-m": "model", "-c": None}
    seen = {k: 0 for k in meaning}
    for words in _commands():
        cmd = root
        for w in words:
            cmd = cmd.commands[w]
        for p in getattr(cmd, "params", []):
            if "--json" in p.opts:
                assert p.is_flag, words
            for short, long in meaning.items():
                if short in p.opts:
                    seen[short] += 1
                    if long is not None:
                        assert f"--{long}" in p.opts, (words, p.opts)
    assert seen["-t"] >= 5 and seen["-o"] >= 6 and seen["-q"] == 2 and seen["-m"] == 4 and seen["-c"] == 3


def test_quant_types_by_commas_or_repeats_reach_the_same_check(cli, tmp_path):
    """quantize and build read `-q A,B -q C` as three types (a typo among them is refused before any work)."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not read: the types are checked first")
    pytest.importorskip("llama_cpp")  # the valid types come from llama.cpp
    for argv in (["quantize", gguf, "-q", "Q4_K_M,Q8_0", "-q", "Q4_K_X"],
                 ["build", "--demo", "-o", tmp_path / "d", "-q", "Q4_K_M,Q8_0", "-q", "Q4_K_X"]):  # fmt: skip
        code, _, err = cli(*argv)
        assert code == 2 and "'Q4_K_X'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "d").exists()


def test_eval_json_is_a_switch(cli, tmp_path):
    """`eval MODEL --json --lang eu` (the order that used to read --lang as --json's file): --json takes no value
    and the report file is --report/-o."""
    model = tmp_path / "m.gguf"
    model.write_text("not a model")
    code, _, err = cli("eval", model, "--json", "--lang", "eu")
    assert code == 2 and "not a GGUF" in err and "Missing option" not in err
    code, _, err = cli(
        "eval", model, "--lang", "eu", "-o", tmp_path / "r.json", "--markdown", tmp_path / "r.json"
    )
    assert code == 2 and "--report and --markdown both name" in err
    assert not (tmp_path / "r.json").exists()


def test_python_dash_m_is_the_same_command_line():
    """`python -m edgemerge` runs the CLI (a checkout without the script on PATH): help, and a user error's exit."""
    ok = subprocess.run(
        [sys.executable, "-m", "edgemerge", "--help"], check=False, capture_output=True, text=True
    )
    assert ok.returncode == 0 and "build" in ok.stdout and "Usage" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "edgemerge", "export", "/nonexistent-dir", "-o", "x.gguf"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
