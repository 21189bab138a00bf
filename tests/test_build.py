"""End-to-end builds on a tiny fixture family: merge -> GGUF -> llama.cpp quantize -> llama.cpp eval -> package."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgemerge.build import BuildOptions, build, work_dir
from edgemerge.cli import main
from edgemerge.errors import EdgemergeError
from edgemerge.files import human_bytes
from edgemerge.package import parse_modelfile_stops
from edgemerge.public import public_recipe
from edgemerge.recipe import load_recipe

GGUFS = ["tiny-eu-F16.gguf", "tiny-eu-Q4_K_M.gguf", "tiny-eu-Q8_0.gguf"]
IMATRIX = "tiny-eu.imatrix.gguf"  # recipe default imatrix: auto
PACKAGE = ["README.md", "Modelfile", "eval.json", "manifest.json"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_build(src: Path, dst: Path) -> None:
    """A build folder and its work area, timestamps kept (as `cp -a` would)."""
    shutil.copytree(src, dst)
    shutil.copytree(work_dir(src), work_dir(dst))


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def built(build_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "tiny-eu"
    events = []
    result = build(
        load_recipe(build_family["recipe"]),
        BuildOptions(out=out, quick_eval=True, compare_parents=True),
        on_stage=events.append,
    )
    return result, events


def test_build_writes_every_file_and_nothing_else(built):
    result, _ = built
    out = result.out
    marker = [".edgemerge-output"]  # edgemerge's marker: this folder is its build
    assert sorted(p.name for p in out.iterdir()) == sorted(
        GGUFS + [IMATRIX] + PACKAGE + marker
    )  # uploads as is
    assert [p.name for p in result.files] == GGUFS + [IMATRIX] + PACKAGE[:3] + ["manifest.json"]
    assert not list(out.rglob("*partial*"))


def test_manifest_hashes_sizes_and_provenance(built, build_family):
    result, _ = built
    m = _manifest(result.out)
    assert [f["name"] for f in m["files"]] == GGUFS + [IMATRIX] + PACKAGE[:3]
    for f in m["files"]:
        p = result.out / f["name"]
        assert f["size"] == p.stat().st_size
        assert f["sha256"] == _sha256(p)
    assert m["recipe"] == public_recipe(load_recipe(build_family["recipe"]))  # local paths: folder names
    assert set(m["inputs"]) == {"instruct", "base", "eu"}
    assert m["inputs"]["instruct"]["files"]["config.json"].startswith("sha256:")
    assert m["tools"]["llama-cpp-python"] and m["tools"]["edgemerge"]
    stages = {"merge", "quantize Q4_K_M", "quantize Q8_0", "imatrix", "export instruct", "eval instruct"}
    assert set(m["stages"]) == stages | {f"eval {g}" for g in GGUFS}
    assert not any(s["cached"] for s in m["stages"].values())


def test_auto_imatrix_calibrates_the_k_quant_on_the_target_language(built):
    """imatrix: auto (the default) computes one importance matrix on the F16 and the bundled Basque and English
    texts, ships it, makes Q4_K_M with it (recorded by file name, as llama-quantize records its --imatrix) and
    Q8_0 without."""
    from edgemerge.gguf.inspect import kv
    from edgemerge.imatrix import read_imatrix
    from edgemerge.imatrix.collect import ImatrixOptions, compute_imatrix
    from edgemerge.imatrix.text import bundled_text

    result, _ = built
    out = result.out
    q4, q8 = kv(out / "tiny-eu-Q4_K_M.gguf"), kv(out / "tiny-eu-Q8_0.gguf")
    assert q4["quantize.imatrix.file"] == IMATRIX
    assert q4["quantize.imatrix.dataset"] == bundled_text("eu").name
    assert not any(k.startswith("quantize.imatrix") for k in q8)
    shipped = read_imatrix(out / IMATRIX)
    texts = [bundled_text("eu"), bundled_text("en")]
    direct = compute_imatrix(out / GGUFS[0], texts, ImatrixOptions(chunk_size=shipped.chunk_size))
    assert shipped.chunk_count == direct.chunk_count > 10 and sorted(shipped.entries) == sorted(
        direct.entries
    )
    for name, e in direct.entries.items():
        np.testing.assert_allclose(shipped.entries[name].sums, e.sums, rtol=1e-6)

    m = _manifest(out)
    assert m["imatrix"] == {
        "file": IMATRIX,
        "mode": "auto",
        "texts": [t.name for t in texts],
        "chunks": shipped.chunk_count,
        "chunk_size": shipped.chunk_size,
        "computed_on": GGUFS[0],
        "quants": ["Q4_K_M"],
        "files": ["tiny-eu-Q4_K_M.gguf"],
    }
    by_name = {f["name"]: f for f in m["files"]}
    assert [by_name[g]["imatrix"] for g in GGUFS] == [None, IMATRIX, None]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert (
        f"| `tiny-eu-Q4_K_M.gguf` | Q4_K_M | {human_bytes((out / GGUFS[1]).stat().st_size)} | yes |" in card
    )
    assert f"| `tiny-eu-Q8_0.gguf` | Q8_0 | {human_bytes((out / GGUFS[2]).stat().st_size)} | no |" in card
    assert f"| `{IMATRIX}` | importance matrix | {human_bytes((out / IMATRIX).stat().st_size)} |  |" in card
    assert f"computed by this build on `{GGUFS[0]}`: {shipped.chunk_count} chunks of" in card
    assert f"`llama-quantize --imatrix {IMATRIX}`" in card


def test_gguf_file_types(built):
    from edgemerge.gguf.inspect import kv

    result, _ = built
    # llama.cpp's LLAMA_FTYPE numbers: MOSTLY_F16 = 1, MOSTLY_Q8_0 = 7, MOSTLY_Q4_K_M = 15
    types = [kv(result.out / g)["general.file_type"] for g in GGUFS]
    assert types == [1, 15, 7]


def test_modelfile_stops_match_the_tokenizer_eos(built, build_family):
    from transformers import AutoTokenizer

    from edgemerge.evaluate.prompts import language_info

    result, _ = built
    text = (result.out / "Modelfile").read_text(encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(build_family["instruct"])
    gen = json.loads((build_family["instruct"] / "generation_config.json").read_text())
    ids = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    eos = {tok.eos_token} | {tok.convert_ids_to_tokens(i) for i in ids}
    assert set(parse_modelfile_stops(text)) == eos
    assert text.startswith("FROM ./tiny-eu-Q4_K_M.gguf\n")
    assert f'SYSTEM """{language_info("eu")["system"]}"""' in text
    assert "<|im_start|>assistant\n{{ end }}" in text  # the generation prompt after the last user turn


def test_model_card_front_matter_and_eval(built):
    result, _ = built
    card = (result.out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n")
    fm = yaml.safe_load(card.split("---\n")[1])
    assert fm["language"] == ["eu"]
    assert fm["license"] == "apache-2.0"
    assert fm["tags"] == ["merge", "gguf", "edgemerge"]
    assert fm["pipeline_tag"] == "text-generation"
    assert "W = W_instruct + 0.8 · (W_eu − W_base)" in card
    assert "computed per tensor in float32 and written as F16 (the unquantized file" in card  # not bfloat16
    for g in GGUFS:
        assert f"Evaluation of `{g}`" in card


def test_eval_json_reports_every_file(built):
    result, _ = built
    ev = json.loads((result.out / "eval.json").read_text(encoding="utf-8"))
    assert sorted(ev["files"]) == sorted(GGUFS)
    for g in GGUFS:
        rep = ev["files"][g]
        assert rep["lang"] == "eu" and rep["perplexity"] > 1 and rep["responses"]
    assert "kld_mean" not in ev["files"][GGUFS[0]]
    # --compare-parents: the instruct model alone, exported to GGUF in the work area (not shipped)
    assert ev["parents"]["instruct"]["lang"] == "eu" and ev["parents"]["instruct"]["perplexity"] > 1
    assert (work_dir(result.out) / "parents" / "instruct-F16.gguf").is_file()
    assert ev["files"]["tiny-eu-Q4_K_M.gguf"]["kld_mean"] > ev["files"]["tiny-eu-Q8_0.gguf"]["kld_mean"] >= 0


def test_resume_after_interruption_reuses_finished_stages(build_family, tmp_path):
    recipe = load_recipe(build_family["recipe"])
    out = tmp_path / "b"

    def interrupt_after_imatrix(e):
        if e.done and e.name == "imatrix":  # after merge and Q8_0 (which ignores an imatrix)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(recipe, BuildOptions(out=out, skip_eval=True), on_stage=interrupt_after_imatrix)
    assert (out / GGUFS[0]).exists() and (out / GGUFS[2]).exists() and (out / IMATRIX).exists()
    assert not (out / GGUFS[1]).exists() and not (out / "manifest.json").exists()
    mtime = (out / GGUFS[0]).stat().st_mtime_ns

    build(recipe, BuildOptions(out=out, skip_eval=True))
    stages = _manifest(out)["stages"]
    assert stages["merge"]["cached"] and stages["quantize Q8_0"]["cached"] and stages["imatrix"]["cached"]
    assert not stages["quantize Q4_K_M"]["cached"]
    assert (out / GGUFS[0]).stat().st_mtime_ns == mtime

    # A changed recipe redoes only what it changes: dropping a quant removes its file (and the importance
    # matrix no quant uses any more), nothing is rebuilt.
    build(recipe, BuildOptions(out=out, skip_eval=True, quants=["Q8_0"]))
    m = _manifest(out)
    assert [f["name"] for f in m["files"]][:2] == [GGUFS[0], GGUFS[2]]
    assert not (out / GGUFS[1]).exists() and not (out / IMATRIX).exists() and m["imatrix"] is None
    assert m["stages"]["merge"]["cached"] and m["stages"]["quantize Q8_0"]["cached"]
    # A new weight changes the merge and everything after it.
    build(recipe, BuildOptions(out=out, skip_eval=True, quants=["Q8_0"], weights=[0.5]))
    m = _manifest(out)
    assert not m["stages"]["merge"]["cached"] and not m["stages"]["quantize Q8_0"]["cached"]
    assert m["recipe"]["languages"][0]["weight"] == 0.5


def test_output_folder_of_another_build_needs_force(build_family, tmp_path, built):
    result, _ = built
    out = tmp_path / "o"
    _copy_build(result.out, out)
    other = build_family["recipe"].with_name("other.yaml")
    data = yaml.safe_load(build_family["recipe"].read_text()) | {"name": "other-eu", "quants": ["Q8_0"]}
    other.write_text(yaml.safe_dump(data))
    with pytest.raises(EdgemergeError, match=r"holds another build \(tiny-eu\).*--force"):
        build(load_recipe(other), BuildOptions(out=out, skip_eval=True))
    assert (out / GGUFS[0]).exists()
    (out / "notes.txt").write_text("mine")  # not edgemerge's: --force keeps it, and the build says so
    forced = build(load_recipe(other), BuildOptions(out=out, skip_eval=True, force=True))
    assert not (out / GGUFS[0]).exists() and (out / "other-eu-Q8_0.gguf").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert any("notes.txt" in w and "move them out before uploading" in w for w in forced.warnings)
    assert "notes.txt" not in [f["name"] for f in _manifest(out)["files"]]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(EdgemergeError, match="not an edgemerge build"):
        build(load_recipe(other), BuildOptions(out=foreign, skip_eval=True))


def test_not_enough_disk_fails_before_writing(build_family, tmp_path, monkeypatch):
    import edgemerge.build.options as b

    monkeypatch.setattr(b, "free_bytes", lambda path: 1000)  # a full disk, without filling one
    out = tmp_path / "full"
    with pytest.raises(EdgemergeError, match=r"not enough disk space.*tiny-eu-F16.gguf"):
        build(load_recipe(build_family["recipe"]), BuildOptions(out=out, skip_eval=True))
    assert not out.exists()


def test_gate_failure_exits_3_with_the_table(build_family, built, tmp_path, capsys):
    result, _ = built
    out = tmp_path / "gates"
    _copy_build(result.out, out)  # same build: every stage is reused, only the gates change
    strict = build_family["recipe"].with_name("strict.yaml")
    data = yaml.safe_load(build_family["recipe"].read_text())
    data["eval"] = {"max_perplexity": 1.0}
    strict.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit) as e:
        main(["build", "--recipe", str(strict), "--out", str(out), "--quick-eval"])
    assert e.value.code == 3
    captured = capsys.readouterr()
    assert "failed" in captured.out and "perplexity" in captured.out
    assert "needs <= 1" in captured.err
    out_text = " ".join(captured.out.split())
    assert f"edgemerge chat {out / 'tiny-eu-Q4_K_M.gguf'} --lang eu" in out_text  # the next steps, concrete
    assert f"ollama create tiny-eu -f {out / 'Modelfile'} && ollama run tiny-eu" in out_text
    assert f"edgemerge publish {out} --repo YOUR-NAME/tiny-eu" in out_text
    assert all(s["cached"] for n, s in _manifest(out)["stages"].items() if n != "package")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lang", "xx"], "no bundled recipe for --lang xx; the bundled recipes cover ca ("),
        (["--lang", "ca"], "--lang ca: no bundled recipe for it has every language model public yet ("),
        (["--recipe", "nope"], "recipe nope not found"),
        ([], "say what to build"),
        (["--lang", "eu", "--demo", "--recipe", "x"], "drop --recipe"),
        (["--lang", "xx", "--demo"], "demo languages: "),
    ],
)
def test_bad_input_exits_2(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["build", "--out", str(tmp_path / "x"), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "x").exists()


def test_unknown_quant_exits_2(build_family, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "build",
                "--recipe",
                str(build_family["recipe"]),
                "--quant",
                "Q9_X",
                "--out",
                str(tmp_path / "q"),
            ]
        )
    assert e.value.code == 2
    assert "unknown quantization type 'Q9_X'" in capsys.readouterr().err


def test_model_not_available_offline_names_it(tmp_path, capsys):
    recipe = tmp_path / "net.yaml"
    recipe.write_text(
        "name: net-eu\ninstruct: someone-x/missing-model\nbase: someone-x/missing-base\n"
        "languages: [{code: eu, model: someone-x/missing-eu}]\n"
    )
    with pytest.raises(SystemExit) as e:
        main(["build", "--recipe", str(recipe), "--out", str(tmp_path / "n"), "--skip-eval"])
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (
        f"recipe net-eu ({recipe}) needs someone-x/missing-model, someone-x/missing-base, someone-x/missing-eu"
        in err
    )
    assert "put the local folders in net.yaml instead of the hub ids" in err
    assert not (tmp_path / "n").exists()


def test_folder_copied_without_work_area_is_rebuilt_not_refused(build_family, built, tmp_path):
    result, _ = built
    out = tmp_path / "copied"
    shutil.copytree(result.out, out)
    build(load_recipe(build_family["recipe"]), BuildOptions(out=out, skip_eval=True))
    m = _manifest(out)
    assert not m["stages"]["merge"]["cached"]
    assert [f["name"] for f in m["files"]][:3] == GGUFS


def test_unknown_backend_exits_2_before_writing(build_family, tmp_path, capsys):
    out = tmp_path / "bk"
    with pytest.raises(SystemExit) as e:
        main(["build", "--recipe", str(build_family["recipe"]), "--backend", "cuda", "--out", str(out)])
    assert e.value.code == 2
    assert "unknown backend 'cuda'" in capsys.readouterr().err
    assert not out.exists() and not work_dir(out).exists()


def test_one_build_per_output_folder_at_a_time(tmp_path):
    from edgemerge.build import build_lock

    out = tmp_path / "locked"
    held = pytest.raises(EdgemergeError, match="another edgemerge build is writing")
    with build_lock(out), held, build_lock(out):
        pass
    with build_lock(out):  # released, and no lock file left behind
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quant", "Q4_K_X"], "unknown quantization type 'Q4_K_X'"),
        (["--weight", "abc"], "--weight"),
        (["--method", "tise"], "tise"),
        (["--backend", "cuda"], "cuda"),
        (["--outtype", "q8"], "unknown output type"),
        (["--eval-lang", "xx"], "xx"),
    ],
)
def test_demo_flags_are_checked_before_the_demo_is_trained(args, message, monkeypatch, capsys, tmp_path):
    from edgemerge.build import target

    def no_training(*a, **k):
        raise AssertionError("the demo family was made before the flags were checked")

    monkeypatch.setattr(target, "demo_family", no_training)
    with pytest.raises(SystemExit) as e:
        main(["build", "--demo", "--out", str(tmp_path / "d"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def _trivia_data(folder: Path) -> Path:
    """An EusTrivia-shaped file of three questions (the layout of ../shared/data/bench)."""
    f = folder / "bench" / "eustrivia" / "eus_trivia_test.jsonl"
    f.parent.mkdir(parents=True)
    recs = [
        {"question": f"Zenbat dira {i} eta {i}?", "candidates": [str(2 * i), "bat"], "answer": 0}
        for i in range(3)
    ]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n", encoding="utf-8")
    return f.parent.parent


def test_a_recipes_eval_tasks_run_on_every_file_and_reach_the_card(build_family, tmp_path):
    """eval.tasks in the recipe: each shipped file's report and the model card carry the benchmark rows."""
    recipe = yaml.safe_load(build_family["recipe"].read_text(encoding="utf-8"))
    _trivia_data(tmp_path)
    recipe.update(quants=["Q8_0"], imatrix="none")
    recipe["eval"] = {
        "min_stop_rate": 0.0,
        "tasks": ["eus_trivia"],
        "fewshot": 1,
        "limit": 2,
        "data": "./bench",
    }
    recipe["eval"]["chat_template"] = True  # the fixture's instruct model has a ChatML template
    for k in ("instruct", "base"):
        recipe[k] = str(build_family[k])
    recipe["languages"][0]["model"] = str(build_family["eu"])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = build(
        load_recipe(path), BuildOptions(out=tmp_path / "out", quick_eval=True, compare_parents=True)
    )
    for name, rep in {**result.evals, **result.parent_evals}.items():
        (row,) = rep.benchmarks
        assert (row["task"], row["questions"], row["shots"]) == ("eus_trivia", 2, 1), name
        assert rep.bench_settings["limit"] == 2 and rep.bench_settings["chat_template"] is True
    card = (result.out / "README.md").read_text(encoding="utf-8")
    assert (
        "| eus_trivia | 1 | acc |" in card and "lm-evaluation-harness format, 1-shot, chat template" in card
    )
    gates = json.loads((result.out / "eval.json").read_text(encoding="utf-8"))["gates"]
    assert gates == {"min_stop_rate": 0.0}  # the benchmark settings are not gates

    # the eval stages' key holds the data's contents: the same data is cached, an edited file runs them again
    def evals_cached() -> list[bool]:
        stages = _manifest(result.out)["stages"]
        return [v["cached"] for k, v in stages.items() if k.startswith("eval ")]

    again = {"out": tmp_path / "out", "quick_eval": True, "compare_parents": True}
    build(load_recipe(path), BuildOptions(**again))
    assert evals_cached() and all(evals_cached())
    f = tmp_path / "bench" / "eustrivia" / "eus_trivia_test.jsonl"
    f.write_text(f.read_text(encoding="utf-8").replace("bat", "hiru"), encoding="utf-8")  # same size
    build(load_recipe(path), BuildOptions(**again))
    assert evals_cached() and not any(evals_cached())
    assert _manifest(result.out)["stages"]["quantize Q8_0"]["cached"]


def test_a_recipes_unknown_task_fails_before_any_work(build_family, tmp_path):
    recipe = yaml.safe_load(build_family["recipe"].read_text(encoding="utf-8"))
    recipe["eval"] = {"tasks": ["eus_trivium"], "data": "./bench"}
    for k in ("instruct", "base"):
        recipe[k] = str(build_family[k])
    recipe["languages"][0]["model"] = str(build_family["eu"])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    with pytest.raises(EdgemergeError, match="unknown task 'eus_trivium'; known tasks"):
        build(load_recipe(path), BuildOptions(out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
