"""check_compat: what it reports on compatible inputs and how it names a mismatch."""

from __future__ import annotations

import json
import shutil

import pytest

from edgemerge.check import check_compat, tokenizer_identity
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
