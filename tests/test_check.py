"""check_compat: what it reports on compatible inputs and how it names a mismatch."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from edgemerge.check import check_compat, check_config_tensors, tokenizer_identity
from edgemerge.cli import main
from edgemerge.errors import EdgemergeError
from edgemerge.recipe import load_recipe
from edgemerge.sources import resolve_recipe

from .models import write_recipe


def sources_of(tmp_path, family, weights):
    return resolve_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", family, weights)))


def test_report_of_a_compatible_family(tmp_path, merge_family):
    report = check_compat(sources_of(tmp_path, merge_family, {"eu": 1.0, "ca": 1.0}))
    assert report.architecture == "LlamaForCausalLM" and report.vocab_size == 512
    assert not report.tied_embeddings
    names = {s.name for s in report.specs}
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= names
    spec = {s.name: s for s in report.specs}["model.embed_tokens.weight"]
    assert spec.shape == (512, 256) and spec.dtype == "bfloat16"
    assert report.n_params == sum(s.nbytes for s in report.specs) // 2
    assert len(report.models) == 4 and len({m.files["model.norm.weight"].parent for m in report.models}) == 4
    # sharded inputs: the tensors really are spread over several files
    assert len(set(report.models[0].files.values())) > 1


def test_tied_family_has_no_lm_head(tmp_path, tied_family):
    report = check_compat(sources_of(tmp_path, tied_family, {"eu": 1.0}))
    assert report.tied_embeddings and report.architecture == "Qwen3ForCausalLM"
    assert "lm_head.weight" not in {s.name for s in report.specs}


def test_added_token_mismatch_names_the_id(tmp_path, merge_family):
    eu = tmp_path / "eu"
    shutil.copytree(merge_family["eu"], eu)
    data = json.loads((eu / "tokenizer.json").read_text())
    data["added_tokens"][0]["content"] = "<weird>"
    (eu / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(
        EdgemergeError, match=r"added token id 0 is '<unk>' in instruct .* but '<weird>' in eu"
    ):
        check_compat(sources_of(tmp_path, dict(merge_family, eu=eu), {"eu": 1.0}))


def test_missing_tokenizer_is_reported(tmp_path, merge_family):
    eu = tmp_path / "eu"
    shutil.copytree(merge_family["eu"], eu)
    (eu / "tokenizer.json").unlink()
    (eu / "tokenizer.model").rename(eu / "spm.model")
    with pytest.raises(EdgemergeError, match="eu .*no tokenizer.json or tokenizer.model"):
        check_compat(sources_of(tmp_path, dict(merge_family, eu=eu), {"eu": 1.0}))
    (eu / "spm.model").rename(eu / "tokenizer.model")  # only SentencePiece: compared on tokenizer.model
    check_compat(sources_of(tmp_path, dict(merge_family, eu=eu), {"eu": 1.0}))
    (eu / "tokenizer.model").write_bytes(b"other")
    with pytest.raises(EdgemergeError, match="tokenizer.model differs between instruct .* and eu"):
        check_compat(sources_of(tmp_path, dict(merge_family, eu=eu), {"eu": 1.0}))


def test_tokenizer_identity_ignores_merge_serialisation(tmp_path):
    """tokenizers < 0.20 wrote merges as "a b", newer versions as ["a", "b"]: the same tokenizer."""
    base = {
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}},
        "added_tokens": [{"id": 3, "content": "<s>"}],
    }
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    (tmp_path / "old" / "tokenizer.json").write_text(
        json.dumps({**base, "model": {**base["model"], "merges": ["a b"]}})
    )
    (tmp_path / "new" / "tokenizer.json").write_text(
        json.dumps({**base, "model": {**base["model"], "merges": [["a", "b"]]}})
    )
    assert tokenizer_identity(tmp_path / "old") == tokenizer_identity(tmp_path / "new")
    assert tokenizer_identity(tmp_path) == {}


# ---- issue 19 class 4: config.json must describe the tensors present ------------------------------------------
def family_copy(tmp_path, family, edit_config=None, edit_instruct=None):
    """A copy of the family with `edit_config(cfg)` applied to every model's config.json (so they still agree
    with each other) and `edit_instruct(folder)` to the instruct folder."""
    out = {}
    for role, src in family.items():
        dst = tmp_path / "fam" / role
        shutil.copytree(src, dst)
        if edit_config is not None:
            cfg = json.loads((dst / "config.json").read_text())
            edit_config(cfg)
            (dst / "config.json").write_text(json.dumps(cfg))
        out[role] = dst
    if edit_instruct is not None:
        edit_instruct(out["instruct"])
    return out


def _set(**values):
    return lambda cfg: cfg.update(values)


# merge_family: hidden 256, 2 layers, 4 heads, 2 kv heads (head_dim 64), intermediate 512, vocab 512
CONFIG_LIES = [
    (_set(num_hidden_layers=3), "num_hidden_layers is 3 but the weights hold layers 0-1"),
    (_set(num_hidden_layers=40), "num_hidden_layers is 40"),
    (_set(num_hidden_layers=1), "num_hidden_layers is 1 but the weights hold layers 0-1"),
    (_set(num_hidden_layers="2"), "num_hidden_layers must be a positive integer"),
    (_set(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
    (_set(hidden_size=512), "embed_tokens.weight has shape [512, 256]"),
    (_set(num_key_value_heads=4), "self_attn.k_proj.weight"),
    (_set(num_attention_heads=8), "num_attention_heads x head_dim"),
    (_set(num_attention_heads=3), "not a multiple of num_key_value_heads"),
    (_set(head_dim=32), "self_attn.q_proj.weight"),
    (_set(intermediate_size=1024), "mlp.gate_proj.weight"),
    (_set(vocab_size=1024), "embed_tokens.weight"),
    (_set(hidden_size=True), "hidden_size must be a positive integer"),
    (_set(max_position_embeddings=0), "max_position_embeddings must be a positive integer"),
]


@pytest.mark.parametrize(("edit", "needle"), CONFIG_LIES)
def test_config_that_lies_about_its_tensors_fails_the_check(tmp_path, merge_family, edit, needle):
    fam = family_copy(tmp_path, merge_family, edit_config=edit)
    with pytest.raises(EdgemergeError) as e:
        check_compat(sources_of(tmp_path, fam, {"eu": 1.0}))
    assert needle in e.value.message and e.value.message.count("\n") == 0


def test_a_multimodal_config_describes_its_language_model_only():
    """A vision-language model's text_config sizes its `language_model.` tensors: the vision tower's own layers
    and projections are not held against it, a text tensor that disagrees still is."""
    cfg = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4, "head_dim": 64},
    }
    text = {f"language_model.model.layers.{i}.self_attn.q_proj.weight": (256, 256) for i in range(2)}
    vision = {f"vision_tower.encoder.layers.{i}.self_attn.q_proj.weight": (64, 64) for i in range(3)}
    check_config_tensors(cfg, {**text, **vision}, "vlm")
    text["language_model.model.layers.1.self_attn.q_proj.weight"] = (128, 256)
    with pytest.raises(EdgemergeError, match="layers.1.self_attn.q_proj.weight has shape"):
        check_config_tensors(cfg, {**text, **vision}, "vlm")


@pytest.mark.parametrize(("edit", "needle"), CONFIG_LIES[:3] + CONFIG_LIES[6:8])
def test_commands_refuse_a_lying_config_before_writing(tmp_path, merge_family, edit, needle, capsys):
    fam = family_copy(tmp_path, merge_family, edit_config=edit)
    recipe = write_recipe(tmp_path / "r.yaml", fam, {"eu": 1.0})
    for argv, out in (
        (["merge", recipe, "--gguf", tmp_path / "m.gguf"], tmp_path / "m.gguf"),
        (["export", fam["instruct"], "--out", tmp_path / "e.gguf"], tmp_path / "e.gguf"),
    ):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err, err
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}.partial*"))


# ---- issue 19 class 5: what the output inherits is validated before the heavy work ----------------------------
def _write(name, text):
    return lambda folder: (folder / name).write_text(text)


def _json_edit(name, change):
    def edit(folder):
        path = folder / name
        data = json.loads(path.read_text()) if path.exists() else {}
        change(data)
        path.write_text(json.dumps(data))

    return edit


NESTED = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
BROKEN_INHERITED = [
    (_write("generation_config.json", "{not json"), "generation_config.json: not valid JSON"),
    (_write("generation_config.json", "[1, 2]"), "generation_config.json is not a JSON object"),
    (_json_edit("generation_config.json", _set(eos_token_id="</s>")), "generation_config.json eos_token_id"),
    (
        _json_edit("generation_config.json", _set(eos_token_id=[2, "x"])),
        "generation_config.json eos_token_id",
    ),
    (_json_edit("generation_config.json", _set(bos_token_id=1.5)), "generation_config.json bos_token_id"),
    # sampling settings gguf-py writes into the GGUF (general.sampling.*): packed only at export time
    (_json_edit("generation_config.json", _set(temperature="hot")), "generation_config.json temperature"),
    (_json_edit("generation_config.json", _set(top_p=1e39)), "generation_config.json top_p"),
    (_json_edit("generation_config.json", _set(top_k=2**40)), "generation_config.json top_k"),
    (_json_edit("generation_config.json", _set(top_k=0.5)), "generation_config.json top_k"),
    (
        _json_edit("generation_config.json", _set(penalty_last_n="64")),
        "generation_config.json penalty_last_n",
    ),
    (_json_edit("generation_config.json", _set(sequence=["top_k"])), "generation_config.json sequence"),
    # the SentencePiece model the GGUF vocabulary is built from (after the merge)
    (_write("tokenizer.model", "garbage" * 100), "tokenizer.model is not a SentencePiece model"),
    (_write("tokenizer.model", ""), "tokenizer.model is not a SentencePiece model"),
    (lambda d: ((d / "tokenizer.model").unlink(), (d / "tokenizer.model").mkdir()), "is not a regular file"),
    (_write("tokenizer_config.json", '{"chat_template": '), "tokenizer_config.json: not valid JSON"),
    (_json_edit("tokenizer_config.json", _set(chat_template=42)), "tokenizer_config.json: chat_template"),
    (
        _json_edit("tokenizer_config.json", _set(chat_template=[{"name": 1}])),
        "tokenizer_config.json: chat_template",
    ),
    (_json_edit("tokenizer_config.json", _set(eos_token=5)), "tokenizer_config.json: eos_token"),
    (_json_edit("tokenizer_config.json", _set(add_bos_token="yes")), "tokenizer_config.json: add_bos_token"),
    (
        _json_edit("tokenizer_config.json", _set(added_tokens_decoder={"7": {"id": 7}})),
        "added_tokens_decoder[7]",
    ),
    (_write("chat_template.jinja", "{% for m in messages %}{{ m.content }"), "chat_template.jinja"),
    (_write("chat_template.jinja", "{{ raise_exception('nope') }}"), "chat_template.jinja"),
    (_write("chat_template.jinja", "{{ messages[0].nope.deeper }}"), "chat_template.jinja"),
    (_write("chat_template.jinja", "{{ ''.__class__.__mro__ }}"), "the template breaks the sandbox"),
    (_write("chat_template.jinja", NESTED), "rendering took longer than"),
    (_write("chat_template.json", '{"chat_template": "{% if %}"}'), "chat_template.json chat_template"),
    (_write("chat_template.json", '{"chat_template": 7}'), "chat_template.json chat_template"),
    (_write("chat_template.jinja", ""), "leaves out the user's message"),
    (
        _write("chat_template.jinja", "{% for m in messages %}<{{ m.role }}>{% endfor %}"),
        "leaves out the user",
    ),
    (
        _json_edit("tokenizer_config.json", _set(chat_template=[{"name": "tool_use", "template": "x"}])),
        "with a 'default'",
    ),
]


@pytest.mark.parametrize(("edit", "needle"), BROKEN_INHERITED)
def test_broken_inherited_files_fail_the_check(tmp_path, merge_family, edit, needle, monkeypatch):
    monkeypatch.setattr("edgemerge.chat_format.RENDER_SECONDS", 2.0)  # the runaway case: no need to wait 10 s
    fam = family_copy(tmp_path, merge_family, edit_instruct=edit)
    with pytest.raises(EdgemergeError) as e:
        check_compat(sources_of(tmp_path, fam, {"eu": 1.0}))
    assert needle in e.value.message and e.value.message.count("\n") == 0, e.value.message
    assert len(e.value.message) < 400


def test_a_template_may_reject_system_messages(tmp_path, merge_family):
    template = (
        "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    )
    fam = family_copy(tmp_path, merge_family, edit_instruct=_write("chat_template.jinja", template))
    check_compat(sources_of(tmp_path, fam, {"eu": 1.0}))


def test_tokenizer_larger_than_the_embeddings_fails_the_check(tmp_path, merge_family):
    """Token ids at or beyond vocab_size have no embedding row (the GGUF vocabulary would be cut silently)."""
    fam = family_copy(tmp_path, merge_family)
    for folder in fam.values():  # the same extra token everywhere: the tokenizers still agree
        tj = json.loads((folder / "tokenizer.json").read_text())
        tj["added_tokens"].append({"id": 700, "content": "<extra>", "special": True, "single_word": False,
                                   "lstrip": False, "rstrip": False, "normalized": False})  # fmt: skip
        (folder / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(EdgemergeError, match="token ids up to 700 but config.json vocab_size is 512"):
        check_compat(sources_of(tmp_path, fam, {"eu": 1.0}))


TOOLS_ONLY = "{% for t in tools %}{{ t.name }}{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.mark.parametrize(
    ("named", "refused"),
    [
        (TOOLS_ONLY, None),  # a tool_use template may need tools: not refused
        ("{{ raise_exception('tools required') }}", None),
        ("{% for t in tools %}", "syntax error"),
        (NESTED, "rendering took longer than"),
        ("{{ ''.__class__ }}", "the template breaks the sandbox"),
    ],
)
def test_named_templates_are_checked_for_what_they_are(tmp_path, merge_family, monkeypatch, named, refused):
    monkeypatch.setattr("edgemerge.chat_format.RENDER_SECONDS", 2.0)
    default = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    templates = [{"name": "default", "template": default}, {"name": "tool_use", "template": named}]
    edit = _json_edit("tokenizer_config.json", _set(chat_template=templates))
    fam = family_copy(tmp_path, merge_family, edit_instruct=edit)
    (fam["instruct"] / "chat_template.jinja").unlink()
    if refused is None:
        check_compat(sources_of(tmp_path, fam, {"eu": 1.0}))
        return
    with pytest.raises(EdgemergeError) as e:
        check_compat(sources_of(tmp_path, fam, {"eu": 1.0}))
    assert "'tool_use'" in e.value.message and refused in e.value.message


def _replace_with(kind):
    """Put something that is not a regular file where a model file goes: a folder, a pipe, a broken link."""

    def put(path):
        if path.exists() or path.is_symlink():
            path.unlink()
        if kind == "folder":
            path.mkdir()
        elif kind == "pipe":
            os.mkfifo(path)  # a reader would block on it for ever
        else:
            path.symlink_to(path.with_name("missing-target"))

    return put


@pytest.mark.parametrize("kind", ["folder", "pipe", "broken link"])
@pytest.mark.parametrize(
    "name",
    [
        "generation_config.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer.json",
    ],
)
def test_a_model_file_that_is_not_a_regular_file_fails_the_check(tmp_path, merge_family, name, kind):
    fam = family_copy(tmp_path, merge_family, edit_instruct=lambda folder: _replace_with(kind)(folder / name))
    with pytest.raises(EdgemergeError) as e:
        check_compat(sources_of(tmp_path, fam, {"eu": 1.0}))
    assert name in e.value.message and e.value.message.count("\n") == 0, e.value.message
