"""The family registry: every family registers itself, is the one list behind help, errors and the README."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import gguf
import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.gguf.arch import REGISTRY, arch_for, families, family_table, supported_names
from edgemerge.gguf.arch.base import Arch, register

from .arch_fixtures import ARCH_SPECS

_README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_table_is_the_registry():
    """The README's family table is the one family_table() makes (tools/family_table.py writes it)."""
    text = _README.read_text(encoding="utf-8")
    assert family_table() in text
    assert text.count("| family | Hugging Face architectures |") == 1


def test_the_family_table_lists_every_registered_architecture():
    table = family_table()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    for fam in families():
        row = rows[fam.title]
        assert set(re.findall(r"`([^`]+)`", row)) == {*fam.hf_names, gguf.MODEL_ARCH_NAMES[fam.model_arch]}
    assert len(rows) == len(families()) and set(REGISTRY) == {n for f in families() for n in f.hf_names}


def test_the_table_writer_replaces_only_the_table():
    text = "intro\n\n| family | Hugging Face architectures | llama.cpp architecture |\n| --- |\n| old | `X` | `y` |\n\nafter\n"
    out = _family_table_tool().readme_with_table(text, family_table())
    assert out == "intro\n\n" + family_table() + "\nafter\n"


def _family_table_tool():
    spec = importlib.util.spec_from_file_location(
        "family_table", _README.parent / "tools" / "family_table.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_registered_architecture_has_a_fixture():
    assert set(REGISTRY) <= {spec.arch for spec in ARCH_SPECS.values()}


def test_unsupported_architecture_names_every_registered_one():
    with pytest.raises(EdgemergeError) as e:
        arch_for({"architectures": ["GPT2LMHeadModel"]})
    assert "GPT2LMHeadModel" in e.value.message
    assert all(name in e.value.message for name in REGISTRY)


def test_export_help_lists_the_registry(cli):
    code, out, _ = cli("export", "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert all(name in flat for name in REGISTRY)
    assert supported_names().split(", ")[0] in flat


def test_one_architecture_name_cannot_belong_to_two_families():
    class Twin(Arch):
        hf_names = (next(iter(REGISTRY)),)
        model_arch = gguf.MODEL_ARCH.LLAMA

    with pytest.raises(AssertionError, match="registered by both"):
        register(Twin)
