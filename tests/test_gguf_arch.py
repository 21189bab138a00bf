"""The family registry: every family registers itself, is the one list behind help, errors and the README."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import pytest

from edgemerge.errors import EdgemergeError
from edgemerge.gguf.arch import REGISTRY, arch_for, families, supported_names
from edgemerge.gguf.arch.base import Arch, register

from .arch_fixtures import ARCH_SPECS

_README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_families() -> dict[str, tuple[set[str], str]]:
    """The README's family table: family -> (Hugging Face architectures, llama.cpp architecture)."""
    text = _README.read_text(encoding="utf-8")
    table = text[text.index("| family | Hugging Face architectures | llama.cpp architecture |") :]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        family, names, arch = (c.strip() for c in line.strip("|").split("|"))
        rows[family] = (set(re.findall(r"`([^`]+)`", names)), arch.strip("`"))
    return rows


def test_the_readme_table_is_the_registry():
    expected = {
        fam.title: ({n for n, f in REGISTRY.items() if f is fam}, gguf.MODEL_ARCH_NAMES[fam.model_arch])
        for fam in families()
    }
    assert _readme_families() == expected


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
