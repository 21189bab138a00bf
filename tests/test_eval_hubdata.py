"""Benchmarks' data from the hub (evaluate/hubdata.py): the real huggingface_hub code path (DatasetCard and
hf_hub_download) against the local stand-in of the hub's HTTP API (tests/fake_hub.py) serving tiny dataset repos
laid out as their cards say, the cache reused offline, and the one line when the data cannot be had."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgemerge.evaluate.hubdata import config_files

from .fake_hub import FakeHub
from .shared import need_shared

TRIVIA_CARD = """---
license: unknown
configs:
- config_name: default
  data_files:
  - split: test
    path: data/trivia.jsonl
---
# EusTrivia (a test copy)
"""

TQA_CARD = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/train.json
  - split: validation
    path: en/validation.json
- config_name: eu
  data_files:
  - split: train
    path: eu/train.json
  - split: validation
    path: eu/validation.json
---
"""


@pytest.fixture
def datasets(tmp_path):
    """HiTZ/EusTrivia and HiTZ/truthfulqa-multi as tiny hub repos, and the same records as a --data folder."""
    bench = need_shared("bench")
    trivia = (bench / "eustrivia" / "eus_trivia_test.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    tqa = {
        s: json.loads((bench / "truthfulqa_multi" / "eu" / f"{s}.json").read_text())[:6]
        for s in ("train", "validation")
    }
    repos, local = tmp_path / "repos", tmp_path / "local"
    files = {
        repos / "trivia" / "README.md": TRIVIA_CARD,
        repos / "trivia" / "data" / "trivia.jsonl": "\n".join(trivia) + "\n",
        local / "eustrivia" / "eus_trivia_test.jsonl": "\n".join(trivia) + "\n",
        repos / "tqa" / "README.md": TQA_CARD,
    }
    for s, recs in tqa.items():
        files[repos / "tqa" / "eu" / f"{s}.json"] = files[local / "truthfulqa_multi" / "eu" / f"{s}.json"] = (
            json.dumps(recs)
        )
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    hub = FakeHub(datasets={"HiTZ/EusTrivia": repos / "trivia", "HiTZ/truthfulqa-multi": repos / "tqa"})
    yield hub, local
    hub.close()


def _eval(env: dict[str, str], *args) -> subprocess.CompletedProcess:
    model = need_shared("models", "stories260K", "stories260K.gguf")
    cmd = [
        sys.executable,
        "-c",
        "from edgemerge.cli import main; main()",
        "eval",
        str(model),
        *map(str, args),
    ]
    cmd += ["--task", "eus_trivia", "--task", "truthfulqa-multi_mc1_eu", "--fewshot", "1", "--limit", "4"]
    return subprocess.run(
        cmd,
        check=False,
        env={**os.environ, **env, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_without_data_the_tasks_files_come_from_the_hub_and_its_cache(tmp_path, datasets):
    hub, local = datasets
    cache = tmp_path / "cache"
    got = _eval(hub.env(cache), "--json", "--threads", "1")
    assert got.returncode == 0, got.stderr
    # the cards, then the files they name for the splits asked (the few-shot split of mc1 is train)
    assert sorted(hub.fetched()) == sorted(
        ["README.md", "data/trivia.jsonl", "README.md", "eu/validation.json", "eu/train.json"]
    )
    want = _eval(hub.env(cache), "--json", "--threads", "1", "--data", local)
    assert want.returncode == 0, want.stderr
    assert json.loads(got.stdout)["benchmarks"] == json.loads(want.stdout)["benchmarks"]
    # offline, from the cache: the same scores, nothing fetched
    before = len(hub.fetched())
    again = _eval({**hub.env(cache), "HF_HUB_OFFLINE": "1"}, "--json", "--threads", "1")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["benchmarks"] == json.loads(want.stdout)["benchmarks"]
    assert len(hub.fetched()) == before


def test_offline_without_the_data_is_one_line_naming_the_dataset_and_the_file(tmp_path, datasets):
    hub, _ = datasets
    got = _eval({**hub.env(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"})
    assert got.returncode == 2 and "Traceback" not in got.stderr
    (line,) = got.stderr.strip().splitlines()
    assert "task eus_trivia needs HiTZ/EusTrivia from the Hugging Face hub" in line
    assert (
        "HF_HUB_OFFLINE is set" in line
        and "give --data DIR with eustrivia/eus_trivia_test.jsonl in it" in line
    )
    assert hub.fetched() == []


_MESSAGES = """
import json
from edgemerge.errors import EdgemergeError
from edgemerge.evaluate.bench import prepare_tasks
out = []
for name in ("truthfulqa-multi_mc1_gl", "eus_exams_eu_ejadministrari"):
    try:
        prepare_tasks([name], None, 0)
    except EdgemergeError as e:
        out.append(e.message)
print(json.dumps(out))
"""


def test_a_card_without_the_split_and_a_missing_repo_are_one_line(tmp_path, datasets):
    hub, _ = datasets
    env = {**os.environ, **hub.env(tmp_path / "cache")}
    run = subprocess.run(
        [sys.executable, "-c", _MESSAGES], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    no_split, no_repo = json.loads(run.stdout)
    assert no_split == (
        "task truthfulqa-multi_mc1_gl: the card of HiTZ/truthfulqa-multi names no single JSON file for the "
        "validation split of config gl; download the validation split of HiTZ/truthfulqa-multi (config gl) "
        "elsewhere and give --data DIR with truthfulqa_multi/gl/validation.json in it (JSON or JSON Lines)"
    )
    assert no_repo.startswith(
        "task eus_exams_eu_ejadministrari needs HiTZ/EusExams from the Hugging Face hub: "
    )
    assert no_repo.endswith(
        "give --data DIR with eusexams_eu/eus_exams_eu_ejadministrari_test.jsonl in it (JSON or JSON Lines)"
    )


def test_a_cards_configs_give_each_splits_file():
    meta = {
        "configs": [
            {"config_name": "eu_a", "data_files": [{"split": "test", "path": "data/eu/x/a.jsonl"}]},
            {
                "config_name": "eu_b",
                "data_files": [
                    {"split": "test", "path": ["b.jsonl"]},
                    {"split": "train", "path": "data/*.jsonl"},
                ],
            },
            {"config_name": "default", "data_files": "all.jsonl"},
        ]
    }
    assert config_files(meta, "eu_a") == {"test": "data/eu/x/a.jsonl"}
    assert config_files(meta, "eu_b") == {"test": "b.jsonl"}  # a glob is not one file: left out
    assert config_files(meta, "default") == {"train": "all.jsonl"}
    assert config_files(meta, "eu_c") == {} and config_files({}, "default") == {}
