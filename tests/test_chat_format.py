"""The bounded chat-template renderer (issue 19 classes 5 and 6): real templates render exactly as
transformers and llama-cpp-python render them; hostile ones fail in one line, within a bounded time and memory,
whoever renders them (the check, evaluation, chat, packaging)."""

from __future__ import annotations

import io
import shutil
import sys
import time
from pathlib import Path

import pytest

from edgemerge.chat_format import (
    ChatTemplateError,
    ChatTemplateRaised,
    TemplateRenderer,
    derive_chat_format,
    render_template,
)
from edgemerge.cli import main
from edgemerge.errors import EdgemergeError
from edgemerge.package import ChatInfo, modelfile

from .shared import need_shared

CONVERSATIONS = [
    [{"role": "user", "content": "Kaixo!"}],
    [
        {"role": "system", "content": "Lagun zara."},
        {"role": "user", "content": "Zer moduz?"},
        {"role": "assistant", "content": "Ondo."},
        {"role": "user", "content": "Eta zu?"},
    ],
]
TEMPLATES = [
    "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "Qwen-Qwen3-0.6B.jinja",
    "Qwen-Qwen2.5-7B-Instruct.jinja",
    "google-gemma-2-2b-it.jinja",
    "Mistral-Small-3.2-24B-Instruct-2506.jinja",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja",
]


def _template(name: str) -> str:
    return need_shared("tokenizers", "llama.cpp-vocab", "templates", name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", TEMPLATES)
def test_same_text_as_transformers_and_llama_cpp(name):
    from transformers.utils.chat_template_utils import render_jinja_template

    template = _template(name)
    with TemplateRenderer(template) as r:
        for conv in CONVERSATIONS:
            for gen in (True, False):
                try:
                    theirs = render_jinja_template(
                        conversations=[conv], chat_template=template, add_generation_prompt=gen,
                        bos_token="<s>", eos_token="</s>",
                    )[0][0]  # fmt: skip
                except Exception:  # noqa: BLE001 (e.g. Gemma rejects system messages: ours must raise too)
                    with pytest.raises(ChatTemplateRaised):
                        render_template(r, conv, add_generation_prompt=gen, bos="<s>", eos="</s>")
                    continue
                assert render_template(r, conv, add_generation_prompt=gen, bos="<s>", eos="</s>") == theirs


@pytest.mark.parametrize("name", TEMPLATES[:3])
def test_same_text_as_llama_cpp_python(name):
    llama_chat_format = pytest.importorskip("llama_cpp.llama_chat_format")
    template = _template(name)
    fmt = llama_chat_format.Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")
    context = {"eos_token": "</s>", "bos_token": "<s>", "functions": None, "function_call": None}
    with TemplateRenderer(template) as r:
        for conv in CONVERSATIONS:
            ours = r.render(conv, add_generation_prompt=True, tools=None, tool_choice=None, **context)
            assert ours == fmt(messages=conv).prompt


MSGS = CONVERSATIONS[0]
# template -> (error class, text of the message)
HOSTILE = {
    "syntax error": ("{% for m in messages %}{{ m.content }", ChatTemplateError, "syntax error on line 1"),
    "unclosed block": ("{% if messages %}x", ChatTemplateError, "syntax error"),
    "unknown tag": ("{% import 'os' as os %}{{ os }}", ChatTemplateError, ""),
    "raise_exception": ("{{ raise_exception('no way') }}", ChatTemplateRaised, "no way"),
    "undefined": ("{{ messages[0].nope.deeper }}", ChatTemplateRaised, "UndefinedError"),
    "division by zero": ("{{ 1 // 0 }}", ChatTemplateRaised, "ZeroDivisionError"),
    "sandbox attribute": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", ChatTemplateError, "sandbox"),
    "sandbox mutation": ("{% set l = [] %}{{ l.append(1) }}", ChatTemplateError, "sandbox"),
    "sandbox globals": ("{{ cycler.__init__.__globals__ }}", ChatTemplateError, "sandbox"),
    "nested loops": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        ChatTemplateError,
        "took longer than",
    ),
    "loop without output": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% set x = a * b %}{% endfor %}{% endfor %}",
        ChatTemplateError,
        "took longer than",
    ),
    "growing output": (
        "{% for a in range(100000) %}{% for b in range(100000) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
        ChatTemplateError,
        "exceeds",
    ),
    "huge string": ("{{ 'x' * 4000000000 }}", ChatTemplateError, "memory"),
    "doubling": (
        "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        ChatTemplateError,
        "",
    ),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", ChatTemplateError, ""),
    "huge filter width": ("{{ 'x' | center(3000000000) }}", ChatTemplateError, ""),
    # refused before it is compiled (a 50 MB template took 17 s and 360 MB to compile)
    "huge template": ("{# " + "x" * 1_000_000 + " #}ok", ChatTemplateError, "characters long"),
    "huge template of text": ("{{ messages }}" + " " * 1_000_000, ChatTemplateError, "characters long"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_templates_fail_in_one_bounded_line(case):
    template, kind, needle = HOSTILE[case]
    t0 = time.monotonic()
    with pytest.raises(kind) as e, TemplateRenderer(template, label="x.gguf", seconds=3.0) as r:
        r.render(MSGS, add_generation_prompt=True)
    assert time.monotonic() - t0 < 60  # a hang detector, not a timing claim
    msg = e.value.message
    assert msg.startswith("x.gguf: ") and needle in msg and "\n" not in msg and len(msg) < 400, msg
    assert isinstance(e.value, EdgemergeError)


def test_a_raised_error_leaves_the_renderer_usable_a_broken_one_does_not():
    template = "{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}ok"
    with TemplateRenderer(template) as r:
        with pytest.raises(ChatTemplateRaised):
            r.render([{"role": "system", "content": "s"}], add_generation_prompt=True)
        assert r.render(MSGS, add_generation_prompt=True) == "ok"
    loop = "{% if messages|length > 1 %}{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}{% endif %}ok"
    with TemplateRenderer(loop, seconds=2.0) as r:
        assert r.render(MSGS, add_generation_prompt=True) == "ok"
        with pytest.raises(ChatTemplateError, match="took longer"):
            r.render(CONVERSATIONS[1], add_generation_prompt=True)
        with pytest.raises(ChatTemplateError, match="took longer"):  # no second wait: it is known broken
            r.render(MSGS, add_generation_prompt=True)


@pytest.mark.parametrize("case", ["nested loops", "growing output", "syntax error", "sandbox attribute"])
def test_packaging_warns_instead_of_hanging(case, monkeypatch):
    monkeypatch.setattr("edgemerge.chat_format.RENDER_SECONDS", 2.0)
    text, warning = modelfile("m.gguf", ChatInfo(template=HOSTILE[case][0], bos="", stops=["</s>"]), "sys")
    assert "TEMPLATE" not in text and warning and "Ollama will fall back" in warning
    with pytest.raises(EdgemergeError):
        derive_chat_format(HOSTILE[case][0])


GOOD = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"


def _padded(template: str, length: int) -> str:
    pad = length - len(template) - len("{##}")
    assert pad >= 0
    return template + "{#" + "x" * pad + "#}"


@pytest.fixture(scope="module")
def gguf_with_template(merge_family, tmp_path_factory):
    """A GGUF exported with a 600-character template, and a function writing a copy whose template is
    replaced in place (same length, so the file layout is unchanged): hostile templates in a real GGUF."""
    from edgemerge.pipeline import export_hf

    root = tmp_path_factory.mktemp("tpl")
    folder = root / "instruct"
    shutil.copytree(merge_family["instruct"], folder)
    (folder / "chat_template.jinja").write_text(_padded(GOOD, 600))
    src = export_hf(folder, root / "good.gguf", outtype="f32")

    def with_template(template: str, dst: Path) -> Path:
        data = src.read_bytes()
        old = _padded(GOOD, 600).encode()
        assert data.count(old) == 1
        dst.write_bytes(data.replace(old, _padded(template, 600).encode()))
        return dst

    return with_template


@pytest.mark.parametrize(
    "case", ["nested loops", "loop without output", "growing output", "syntax error", "sandbox attribute"]
)
@pytest.mark.parametrize("command", ["eval", "chat"])
def test_eval_and_chat_refuse_hostile_gguf_templates(
    tmp_path, gguf_with_template, monkeypatch, capsys, case, command
):
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr("edgemerge.chat_format.RENDER_SECONDS", 2.0)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Kaixo\n/exit\n"))
    model = gguf_with_template(HOSTILE[case][0], tmp_path / "hostile.gguf")
    argv = (
        ["eval", model, "--lang", "eu", "--quick", "--report", tmp_path / "r.json"]
        if command == "eval"
        else ["chat", model]
    )
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < 120  # a hang detector
    assert e.value.code == 2, err
    assert "hostile.gguf" in err and HOSTILE[case][2] in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "r.json").exists()
