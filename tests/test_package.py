"""Package pieces without llama.cpp: chat template -> Ollama template, Modelfile, model card front matter."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from edgemerge.chat_format import derive_chat_format, render_template
from edgemerge.demo import CHAT_TEMPLATE
from edgemerge.errors import EdgemergeError
from edgemerge.evaluate.answers import Response
from edgemerge.evaluate.report import EvalReport
from edgemerge.package import (
    ChatInfo,
    PackageInfo,
    fill_repo,
    front_matter,
    model_card,
    modelfile,
    parse_modelfile_stops,
)
from edgemerge.package.card import PLACEHOLDER_NOTE
from edgemerge.recipe import parse_recipe

from .shared import need_shared

CONVS = [
    [{"role": "user", "content": "Kaixo, zer moduz?"}],
    [
        {"role": "system", "content": "Euskaraz erantzun."},
        {"role": "user", "content": "Zein da Euskal Herriko mendirik altuena?"},
        {"role": "assistant", "content": "Hiru Erregeen Mahaia."},
        {"role": "user", "content": "Eta bigarrena?"},
    ],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "five"},
    ],
]


def _strip_bos(text: str, bos: str) -> str:
    return text[len(bos) :] if bos and text.startswith(bos) else text


def test_chatml_format_reproduces_the_template():
    fmt = derive_chat_format(CHAT_TEMPLATE, bos="<s>", eos="<|im_end|>")
    assert fmt.user_prefix == "<|im_start|>user\n"
    assert fmt.generation_prompt == "<|im_start|>assistant\n"
    for conv in CONVS:
        assert fmt.render(conv) == render_template(CHAT_TEMPLATE, conv, add_generation_prompt=True)
    go = fmt.to_go_template()
    assert "{{-" not in go and "-}}" not in go  # whitespace trimming would eat the template's newlines
    assert go.count("{{ range") == 1 and go.count("{{ .Content }}") == 3


@pytest.mark.parametrize(
    "name",
    [
        "meta-llama-Llama-3.1-8B-Instruct",
        "Qwen-Qwen2.5-7B-Instruct",
        "Qwen-Qwen3-0.6B",
        "google-gemma-2-2b-it",
        "Mistral-Small-3.2-24B-Instruct-2506",
    ],
)
def test_real_templates_reproduced(name):
    template = need_shared("tokenizers", "llama.cpp-vocab", "templates", f"{name}.jinja").read_text()
    bos = "<|begin_of_text|>" if "Llama" in name else "<bos>" if "gemma" in name else "<s>"
    fmt = derive_chat_format(template, bos=bos, eos="</s>")
    for conv in CONVS:
        if fmt.system_prefix is None and conv[0]["role"] == "system":
            continue
        want = _strip_bos(
            render_template(template, conv, add_generation_prompt=True, bos=bos, eos="</s>"), bos
        )
        assert fmt.render(conv) == want
    if (
        "Llama-3.1" in name
    ):  # the default "Cutting Knowledge Date" system block appears without a system message
        assert "Cutting Knowledge Date" in fmt.head


def test_template_without_per_message_blocks_is_refused():
    template = need_shared(
        "tokenizers", "llama.cpp-vocab", "templates", "microsoft-Phi-3.5-mini-instruct.jinja"
    )
    with pytest.raises(EdgemergeError, match="Ollama template"):
        derive_chat_format(template.read_text(), bos="<s>", eos="<|end|>")


def test_modelfile_has_template_system_and_every_stop():
    info = ChatInfo(template=CHAT_TEMPLATE, bos="<s>", stops=["<|im_end|>", "</s>"])
    text, warning = modelfile("m-Q4_K_M.gguf", info, "Laguntzaile adeitsua zara.")
    assert warning is None
    assert text.startswith("FROM ./m-Q4_K_M.gguf\n")
    assert 'SYSTEM """Laguntzaile adeitsua zara."""' in text
    assert parse_modelfile_stops(text) == ["<|im_end|>", "</s>"]
    assert 'TEMPLATE """{{ $prev := "" }}' in text


def test_modelfile_samples_as_edgemerge_chat_does():
    """Ollama's own defaults (top_p 0.9, min_p 0, repeat_penalty 1.1) differ from llama.cpp's, which chat uses:
    the Modelfile states chat's values, each once."""
    import inspect

    from edgemerge.cli.chat import chat

    text, _ = modelfile("m-Q4_K_M.gguf", ChatInfo(template=None, bos="", stops=["</s>"]), None)
    params = dict(re.findall(r"^PARAMETER (\w+) (.+)$", text, flags=re.MULTILINE))
    defaults = {name: p.default for name, p in inspect.signature(chat).parameters.items()}
    assert float(params["temperature"]) == defaults["temp"] > 0
    assert int(params["top_k"]) == defaults["top_k"] and float(params["top_p"]) == defaults["top_p"]
    assert float(params["min_p"]) == defaults["min_p"] and float(params["repeat_penalty"]) == 1.0
    assert int(params["num_ctx"]) == defaults["ctx"]
    assert "seed" not in params  # chat draws a new seed each run (-1), as Ollama does without one


def test_modelfile_without_template_warns():
    text, warning = modelfile("m.gguf", ChatInfo(template=None, bos="", stops=["</s>"]), None)
    assert "TEMPLATE" not in text and "no chat template" in warning
    assert parse_modelfile_stops(text) == ["</s>"]


def _info(tmp_path: Path, **recipe) -> PackageInfo:
    data = {
        "name": "llama3.1-8b-eu",
        "instruct": "meta-llama/Llama-3.1-8B-Instruct",
        "base": "meta-llama/Llama-3.1-8B",
        "languages": [{"code": "eu", "model": "HiTZ/eu_Llama-3.1-8B@abc123", "weight": 0.75}],
        "license": "llama3.1",
    } | recipe
    return PackageInfo(
        recipe=parse_recipe(data), out=tmp_path, lang="eu", ggufs=["a-F16.gguf", "a-Q4_K_M.gguf"], inputs={}
    )


def test_front_matter_lists_hub_models_and_parses(tmp_path):
    card = model_card(_info(tmp_path))
    assert card.startswith("---\n")
    fm = yaml.safe_load(card.split("---\n")[1])
    assert fm["language"] == ["eu"]
    assert fm["license"] == "llama3.1"
    assert fm["base_model"] == [
        "meta-llama/Llama-3.1-8B-Instruct",
        "HiTZ/eu_Llama-3.1-8B",
        "meta-llama/Llama-3.1-8B",
    ]
    assert fm["tags"] == ["merge", "gguf", "edgemerge"]
    assert fm["pipeline_tag"] == "text-generation"
    assert "W = W_instruct + 0.75 · (W_eu − W_base)" in card
    assert "ollama create llama3.1-8b-eu -f Modelfile" in card
    assert "llama-cli -m a-Q4_K_M.gguf" in card
    hub = ModelCard(card)  # what the hub reads: the front matter as metadata, the rest as the card's text
    assert hub.data.base_model_relation == "merge" and hub.data.library_name == "gguf"
    assert hub.text.startswith("\n# llama3.1-8b-eu\n") and str(hub) == card


GGUFS = {"a-F16.gguf": 1, "a-Q4_K_M.gguf": 15, "a-Q8_0.gguf": 7}  # name -> llama.cpp file type (LLAMA_FTYPE)


def _ggufs(folder: Path) -> None:
    """Three GGUFs that say their file type, sized like the real ones (F16 > Q8_0 > Q4_K_M)."""
    import gguf
    import numpy as np

    for (name, ftype), n in zip(GGUFS.items(), (4096, 512, 1024)):
        w = gguf.GGUFWriter(folder / name, "llama")
        w.add_file_type(ftype)
        w.add_tensor("x", np.zeros(n, np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def _quick_report(name: str) -> EvalReport:
    answer = Response("eu-01", "?", "Bai.", "eu", 0.9, True, 3, {"max_words": True})
    return EvalReport(
        model=name,
        lang="eu",
        quick=True,
        perplexity=12.5,
        tokens=100,
        ppl_ctx=64,
        chat_template=True,
        language_fidelity=1.0,
        instruction_following=0.667,
        stop_rate=1.0,
        max_tokens=64,
        responses=[answer] * 6,
    )


def _evaluated(tmp_path: Path, failed: dict[str, list[str]]) -> PackageInfo:
    _ggufs(tmp_path)
    p = _info(tmp_path)
    p.ggufs = list(GGUFS)
    reports = {n: _quick_report(n) for n in GGUFS}
    p.evals = {n: r.to_dict() for n, r in reports.items()}
    p.eval_markdown = {n: r.to_markdown() for n, r in reports.items()}
    p.gate_failures = failed
    return p


def test_card_is_ready_for_the_hub(tmp_path):
    """Each file's stored type, the recommended file and why, commands to run it from the hub (a placeholder
    repo until publish fills it in), limitations, quick-set tables without their inflated instruction score, and
    metadata that huggingface_hub parses as the hub does."""
    from huggingface_hub import ModelCardData

    card = model_card(_evaluated(tmp_path, {"a-Q4_K_M.gguf": ["stop rate 0.10 < 0.50"]}))
    for name, kind in (("a-F16.gguf", "F16"), ("a-Q4_K_M.gguf", "Q4_K_M"), ("a-Q8_0.gguf", "Q8_0")):
        assert f"| `{name}` | {kind} |" in card
    assert "written as F16 (the unquantized file" in card
    assert "| 0.75 |\n\nRecipe:" in card  # the weight table ends before the text (they ran together)
    # Q4_K_M is smaller but failed a gate: the smallest file that passed is recommended, and run from the hub
    assert "**Recommended: `a-Q8_0.gguf`** (Q8_0): the smallest file that passed every gate" in card
    repo = "<user>/llama3.1-8b-eu"
    for command in (
        f"llama-cli -hf {repo}:Q8_0 -cnv",
        f"llama-server -hf {repo}:Q8_0 --port 8080",
        f"ollama run hf.co/{repo}:Q8_0",
        f"hf download {repo} a-Q8_0.gguf --local-dir .",
    ):
        assert command in card
    assert PLACEHOLDER_NOTE.format(repo=repo) in card
    limits = card.split("## Limitations")[1].split("## ")[0]
    assert "English" in limits and "not a benchmark" in limits and "langid" in limits
    # quick set: said in the text and each table's title; its instruction score is in no table
    assert "**quick set** (6 prompts" in card and "Evaluation of `a-Q8_0.gguf` in **eu** (quick set)" in card
    assert "| instruction following |" not in card and "| language fidelity | 100.0% |" in card

    hub = ModelCard(card)
    meta = hub.data.to_dict()
    assert meta == ModelCardData(**yaml.safe_load(card.split("---\n")[1])).to_dict()
    assert meta["language"] == ["eu"] and all(len(c) in (2, 3) and c.isalpha() for c in meta["language"])
    assert meta["base_model_relation"] == "merge" and len(meta["base_model"]) == 3
    assert meta["tags"] == ["merge", "gguf", "edgemerge"] and meta["pipeline_tag"] == "text-generation"

    # publish's fill-in: the repo everywhere, the note gone, the metadata untouched; and again for another repo
    filled = fill_repo(card, "llama3.1-8b-eu", "alice/eu-chat")
    assert "<user>" not in filled and "Replace `" not in filled
    assert (
        "llama-cli -hf alice/eu-chat:Q8_0 -cnv" in filled and "ollama run hf.co/alice/eu-chat:Q8_0" in filled
    )
    assert ModelCard(filled).data.to_dict() == meta
    moved = fill_repo(filled, "llama3.1-8b-eu", "bob/eu", old="alice/eu-chat")
    assert "alice" not in moved and "llama-cli -hf bob/eu:Q8_0" in moved


@pytest.mark.parametrize(
    ("failed", "evaluated", "pick", "why"),
    [
        ({}, True, "a-Q4_K_M.gguf", "the smallest file that passed every gate"),
        ({"a-Q4_K_M.gguf": ["x"], "a-Q8_0.gguf": ["x"]}, True, "a-F16.gguf", "the unquantized one did"),
        ({n: ["x"] for n in GGUFS}, True, "a-Q4_K_M.gguf", "no file passed the recipe's gates"),
        ({}, False, "a-Q4_K_M.gguf", "not evaluated (`--skip-eval`); Q4_K_M is llama.cpp's and Ollama's"),
    ],
)
def test_recommended_file(tmp_path, failed, evaluated, pick, why):
    p = _evaluated(tmp_path, failed)
    if not evaluated:
        p.evals, p.eval_markdown = {}, {}
    card = model_card(p)
    line = next(x for x in card.splitlines() if x.startswith("**Recommended:"))
    assert line.startswith(f"**Recommended: `{pick}`**") and why in line, line


def test_full_set_tables_keep_instruction_following():
    report = _quick_report("a-Q8_0.gguf")
    report.quick = False
    md = report.to_markdown()
    assert "| instruction following | 66.7% |" in md and "(quick set)" not in md


def test_every_data_file_is_package_data():
    """A non-editable install ships only what pyproject.toml's package-data names (the card template too)."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    pkg = root / "edgemerge"
    globs = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    shipped = {f for g in globs["package-data"]["edgemerge"] for f in pkg.glob(g) if f.is_file()}
    data = {f for f in pkg.rglob("*") if f.is_file() and f.suffix not in (".py", ".pyc")}
    assert pkg / "package" / "card_template.md" in data
    assert sorted(str(f.relative_to(pkg)) for f in data - shipped) == []


def test_front_matter_skips_local_folders(tmp_path):
    (tmp_path / "inst").mkdir()
    info = _info(tmp_path, instruct=str(tmp_path / "inst"), base="./base", license=None)
    fm = front_matter(info)
    assert fm["base_model"] == ["HiTZ/eu_Llama-3.1-8B"]
    assert fm["license"] == "other"
    # once resolved, a hub model is known by its revision: a local folder named like owner/name is not one
    info.inputs = {"eu": {"ref": "HiTZ/eu_Llama-3.1-8B@abc123", "revision": None}}
    fm = front_matter(info).to_dict()
    assert "base_model" not in fm and "base_model_relation" not in fm


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

// The shape of Ollama's template data for chat: .Messages with .Role and .Content.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("t").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """A binary rendering a template with Go's text/template, the engine Ollama runs TEMPLATE with."""
    import shutil
    import subprocess

    go = shutil.which("go")
    if go is None:
        pytest.skip("the Go toolchain is absent (needed to run Ollama's template engine)")
    d = tmp_path_factory.mktemp("go-render")
    (d / "main.go").write_text(GO_RENDER)
    env = {**os.environ, "GOCACHE": str(d / "cache"), "GOPATH": str(d / "gopath"), "GO111MODULE": "off"}
    subprocess.run([go, "build", "-o", str(d / "render"), str(d / "main.go")], check=True, env=env, cwd=d)

    def render(template: str, messages: list[dict]) -> str:
        data = json.dumps({"template": template, "messages": messages})
        return subprocess.run(
            [str(d / "render")], input=data, capture_output=True, text=True, check=True
        ).stdout

    return render


@pytest.mark.parametrize(
    "name",
    [
        "demo-chatml",
        "meta-llama-Llama-3.1-8B-Instruct",
        "Qwen-Qwen2.5-7B-Instruct",
        "Qwen-Qwen3-0.6B",
        "google-gemma-2-2b-it",
        "Mistral-Small-3.2-24B-Instruct-2506",
    ],
)
def test_ollama_template_renders_like_the_chat_template(name, go_render):
    if name == "demo-chatml":
        template, bos = CHAT_TEMPLATE, "<s>"
    else:
        template = need_shared("tokenizers", "llama.cpp-vocab", "templates", f"{name}.jinja").read_text()
        bos = "<|begin_of_text|>" if "Llama" in name else "<bos>" if "gemma" in name else "<s>"
    fmt = derive_chat_format(template, bos=bos, eos="</s>")
    go_template = fmt.to_go_template()
    for conv in CONVS:
        if fmt.system_prefix is None and conv[0]["role"] == "system":
            continue
        want = _strip_bos(
            render_template(template, conv, add_generation_prompt=True, bos=bos, eos="</s>"), bos
        )
        assert go_render(go_template, conv) == want


def test_template_without_system_role_drops_system_messages(go_render):
    template = need_shared(
        "tokenizers", "llama.cpp-vocab", "templates", "google-gemma-2-2b-it.jinja"
    ).read_text()
    fmt = derive_chat_format(template, bos="<bos>", eos="<eos>")
    assert fmt.system_prefix is None
    conv = CONVS[2]
    want = _strip_bos(render_template(template, conv, add_generation_prompt=True, bos="<bos>"), "<bos>")
    assert go_render(fmt.to_go_template(), [{"role": "system", "content": "ignored"}, *conv]) == want
    text, warning = modelfile("g.gguf", ChatInfo(template=template, bos="<bos>", stops=["<eos>"]), "Kaixo")
    assert "SYSTEM" not in text and "no system role" in warning
