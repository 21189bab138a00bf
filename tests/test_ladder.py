"""`build --quant auto` (edgemerge/build/ladder.py, quant_auto.py): the choice as a pure function, size budgets
as users write them, llama.cpp's dry-run sizes against the files it writes, and one real build of the demo
family choosing its type by measured drift."""

from __future__ import annotations

import json

import pytest
import yaml

from edgemerge.build.ladder import Budget, Rung, check_budget, choose_quant, ladder_table, order
from edgemerge.errors import EdgemergeError
from edgemerge.files import si_bytes
from edgemerge.limits import parse_size
from edgemerge.recipe import QuantAuto, parse_recipe

GATE = QuantAuto(max_kld_mean=0.05, min_top1_agreement=0.9)


def _rungs(**scores):
    """Q2_K < Q3_K_M < Q4_K_M < Q8_0 by size; scores: type -> (kld, top1)."""
    sizes = {"Q2_K": 3_200, "Q3_K_M": 4_000, "Q4_K_M": 4_900, "Q8_0": 8_500}
    out = []
    for q, size in sizes.items():
        kld, top1 = scores.get(q, (None, None))
        out.append(Rung(q, size * 10**6, 2 * size * 10**6, kld, top1))
    return out


def test_the_choice_is_the_smallest_type_within_budget_that_passes_the_gate():
    rungs = _rungs(Q2_K=(0.40, 0.80), Q3_K_M=(0.06, 0.91), Q4_K_M=(0.03, 0.94))
    c = choose_quant(rungs, GATE, Budget(max_size=5 * 10**9))
    assert c.chosen == "Q4_K_M"
    assert c.verdicts == {
        "Q2_K": "drifts: KLD 0.4 > 0.05, top-1 0.8 < 0.9",
        "Q3_K_M": "drifts: KLD 0.06 > 0.05",
        "Q4_K_M": "chosen",
        "Q8_0": "over budget: size 8.5 GB > 5 GB",
    }
    assert "Q4_K_M: the smallest type within --max-size 5 GB" in c.reason
    # no budget: Q8_0 fits but is larger than the choice, and was never measured
    c = choose_quant(rungs, GATE, Budget())
    assert c.chosen == "Q4_K_M" and c.verdicts["Q8_0"] == "not measured; Q4_K_M is smaller"
    # a gate on top-1 only: Q3_K_M passes and, smaller, wins
    c = choose_quant(rungs, QuantAuto(max_kld_mean=None, min_top1_agreement=0.9), Budget())
    assert c.chosen == "Q3_K_M"


def test_measuring_order_is_smallest_first_among_the_types_that_fit():
    rungs = _rungs()
    assert [r.quant for r in order(rungs, Budget(max_size=5 * 10**9))] == ["Q2_K", "Q3_K_M", "Q4_K_M"]
    # memory: 2 bytes per byte of file here, so 8 GB allows up to Q3_K_M
    assert [r.quant for r in order(rungs, Budget(max_ram=8 * 10**9))] == ["Q2_K", "Q3_K_M"]
    assert [r.quant for r in order(rungs, Budget(5 * 10**9, 8 * 10**9))] == ["Q2_K", "Q3_K_M"]


def test_no_type_passing_the_gate_names_the_closest():
    rungs = _rungs(Q2_K=(0.40, 0.80), Q3_K_M=(0.09, 0.88), Q4_K_M=(0.07, 0.91))
    c = choose_quant(rungs, GATE, Budget(max_size=5 * 10**9))
    assert c.chosen is None and c.closest == "Q4_K_M"
    assert c.reason == (
        "no type within --max-size 5 GB passes the drift gate (KLD <= 0.05, top-1 >= 0.9); "
        "the closest: Q4_K_M (KLD 0.07 > 0.05)"
    )


def test_a_budget_no_type_meets_names_the_closest_and_its_size():
    with pytest.raises(EdgemergeError) as e:
        check_budget(_rungs(), Budget(max_size=3 * 10**9))
    assert "no type of the quant ladder fits --max-size 3 GB: the closest, Q2_K, is 3.2 GB" in e.value.message
    with pytest.raises(
        EdgemergeError, match="fits --max-ram 2 GB: the closest, Q2_K, is 3.2 GB and needs 6.4 GB"
    ):
        check_budget(_rungs(), Budget(max_ram=2 * 10**9))
    check_budget(_rungs(), Budget(max_size=4 * 10**9))  # Q2_K and Q3_K_M fit: no error


def test_the_table_lists_every_type_smallest_first_with_its_verdict():
    rungs = _rungs(Q2_K=(0.40, 0.80), Q3_K_M=(0.03, 0.95))
    c = choose_quant(rungs, GATE, Budget(max_size=5 * 10**9))
    lines = ladder_table(rungs, c).splitlines()
    assert lines[0] == "| type | size | RAM to run | KLD | top-1 | PPL ratio | verdict |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["Q2_K", "**Q3_K_M**", "Q4_K_M", "Q8_0"]
    assert lines[4].endswith("| not measured; Q3_K_M is smaller |")


@pytest.mark.parametrize(
    ("text", "bytes_"),
    [
        ("5GB", 5 * 10**9),
        ("800MB", 800 * 10**6),
        ("5GiB", 5 * 2**30),
        ("4.5gib", int(4.5 * 2**30)),
        ("5G", 5 * 10**9),
        ("5 GB", 5 * 10**9),
        ("123", 123),
        (".5TB", 5 * 10**11),
    ],
)
def test_sizes_are_read_as_the_hf_cli_and_llama_cpp_write_them(text, bytes_):
    assert parse_size("--max-size", text) == bytes_


@pytest.mark.parametrize("text", ["5XB", "GB", "", "-5GB", "0GB", "nan", "1e9", "5iB", "5 G B", "9" * 50])
def test_a_malformed_size_is_refused_in_one_line(text):
    with pytest.raises(
        EdgemergeError, match=r"--max-size: .* is not a size; give a number and a unit, e\.g\. 5GB"
    ):
        parse_size("--max-size", text)


def _recipe(**quant_auto):
    return parse_recipe(
        {
            "name": "x",
            "instruct": "a/b",
            "base": "a/c",
            "languages": [{"code": "eu", "model": "a/d"}],
            "quant_auto": quant_auto,
        }
    )


def test_the_recipe_gate_has_documented_defaults_and_is_validated():
    q = _recipe().quant_auto
    assert (q.max_kld_mean, q.min_top1_agreement) == (0.05, 0.9)
    assert q.ladder[0] == "Q8_0" and q.ladder[-1] == "Q2_K"
    assert _recipe(ladder=["Q4_K_M", "Q4_K_M", "Q2_K"]).quant_auto.ladder == ["Q4_K_M", "Q2_K"]
    for bad, message in [
        ({"ladder": []}, "quant_auto.ladder: give at least one llama.cpp type"),
        ({"max_kld_mean": 0}, "max_kld_mean must be above 0"),
        ({"min_top1_agreement": 1.5}, "min_top1_agreement is a fraction"),
        ({"max_kld_mean": None, "min_top1_agreement": None}, "give max_kld_mean or min_top1_agreement"),
        ({"ladder": ["Q4 K M"]}, "a quantization type is a llama.cpp name"),
        ({"max_kld": 0.1}, "quant_auto.max_kld: unknown field"),
    ]:
        with pytest.raises(EdgemergeError, match=message):
            _recipe(**bad)


def test_cli_bad_budgets_are_one_line_exit_2_before_any_work(cli, tmp_path):
    out = tmp_path / "o"
    code, _, err = cli("build", "--lang", "eu", "--quant", "auto", "--max-size", "5XB", "--out", out)
    assert code == 2 and "--max-size: '5XB' is not a size" in err and "Traceback" not in err
    code, _, err = cli("build", "--lang", "eu", "--max-ram", "8GB", "--out", out)
    assert code == 2 and "--max-ram: a budget for --quant auto; add --quant auto or leave it out" in err
    code, _, err = cli("build", "--lang", "eu", "--quant", "auto", "--max-ram", "0.5", "--out", out)
    assert code == 2 and "--max-ram: '0.5' is not a size" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def demo_yaml(tmp_path_factory):
    """The demo family's recipe as a file (absolute model paths), without an importance matrix (seconds saved),
    with a short ladder and a KLD gate about halfway, in log space, between the demo's Q2_K and Q3_K_M (measured
    without a matrix: KLD 0.46 and 0.12)."""
    pytest.importorskip("llama_cpp")
    from edgemerge.demo import demo_family

    r = demo_family("eu").recipe
    data = r.to_yaml_dict()
    for key in ("instruct", "base"):
        data[key] = str((r.root / data[key]).resolve())
    for lang in data["languages"]:
        lang["model"] = str((r.root / lang["model"]).resolve())
    data["imatrix"] = "none"
    data["quant_auto"] = {
        "ladder": ["Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K"],
        "max_kld_mean": 0.25,
        "min_top1_agreement": None,
    }
    path = tmp_path_factory.mktemp("ladder") / "demo.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_build_quant_auto_ships_the_smallest_type_within_budget_and_gate(demo_yaml, tmp_path, cli):
    """`build --quant auto --max-size 1.6MB` on the demo family, end to end through llama.cpp: the budget
    leaves out the demo's Q8_0 (1.8 MB), the gate its Q2_K; whatever the measurements, the choice must be the
    smallest measured type within the budget that passes, every smaller one must have been measured and have
    failed, and only the choice may remain on disk."""
    out = tmp_path / "demo"
    budget = 1_600_000
    code, stdout, err = cli(
        "build", "--recipe", demo_yaml, "--quant", "auto", "--max-size", "1.6MB", "--out", out,
        "--skip-eval", "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    ladder = manifest["quant_ladder"]
    chosen = ladder["choice"]["chosen"]
    rungs = {r["quant"]: r for r in ladder["rungs"]}
    verdicts = ladder["choice"]["verdicts"]
    assert sorted(rungs) == sorted(["Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K"])
    for q, r in rungs.items():
        assert verdicts[q].startswith("over budget") == (r["size"] > budget), (q, r, verdicts[q])
        smaller = r["size"] < rungs[chosen]["size"]
        if smaller:  # measured and rejected: the choice is the smallest that passes
            assert r["kld_mean"] > 0.25 and verdicts[q].startswith("drifts: KLD"), (q, r)
        elif q != chosen and r["size"] <= budget:
            assert r["kld_mean"] is None and verdicts[q] == f"not measured; {chosen} is smaller"
    assert rungs[chosen]["kld_mean"] <= 0.25 and rungs[chosen]["size"] <= budget
    assert any(v.startswith("over budget") for v in verdicts.values())
    assert any(v.startswith("drifts") for v in verdicts.values())
    # only the chosen type ships; the rejected ones were deleted
    ggufs = sorted(p.name for p in out.glob("*.gguf"))
    assert ggufs == sorted(["edgemerge-demo-eu-F16.gguf", f"edgemerge-demo-eu-{chosen}.gguf"])
    assert not list(out.parent.glob(".demo.edgemerge/**/*-Q*.gguf"))
    assert manifest["recipe"]["quants"] == [chosen]
    assert "ladder.png" in [f["name"] for f in manifest["files"]]
    assert (out / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # llama.cpp's dry-run size of each type made against its file: within the MiB rounding of its log
    sizes = json.loads((out.parent / ".demo.edgemerge" / "ladder" / "sizes.json").read_text())
    for q, r in rungs.items():
        if r["kld_mean"] is not None:
            assert abs(sizes[q] - r["size"]) <= 8 * 1024, (q, sizes[q], r["size"])
    card = (out / "README.md").read_text()
    assert "![quant ladder: drift against file size](ladder.png)" in card
    assert f"**Recommended: `edgemerge-demo-eu-{chosen}.gguf`**" in card and "the quant ladder chose" in card
    assert ladder["choice"]["reason"] in card
    for q in rungs:
        assert f"| {q} |" in card or f"| **{q}** |" in card
    assert "quant ladder" in stdout and ladder["choice"]["reason"][:40] in stdout.replace("\n", " ")

    # a memory budget every type meets: the same choice from the cached scores, the budget in the manifest
    code, _, err = cli("build", "--recipe", demo_yaml, "--quant", "auto", "--max-ram", "2GB", "--out", out,
                       "--skip-eval", "--threads", "1")  # fmt: skip
    assert code == 0, err
    again = json.loads((out / "manifest.json").read_text())["quant_ladder"]
    assert again["budget"]["max_ram"] == 2 * 10**9 and again["choice"]["chosen"] == chosen
    assert all(r["ram"] <= 2 * 10**9 for r in again["rungs"])

    # a budget the estimate allows but llama.cpp's exact sizes do not: refused after the (reused) merge, naming
    # the closest type with its dry-run size
    tight = sizes["Q2_K"] - 1000
    code, _, err = cli("build", "--recipe", demo_yaml, "--quant", "auto", "--max-size", tight, "--out", out)
    assert code == 2 and "Traceback" not in err
    assert f"fits --max-size {si_bytes(tight)}: the closest, Q2_K, is {si_bytes(sizes['Q2_K'])}" in err


def test_a_budget_no_type_can_meet_is_refused_before_any_work(demo_yaml, tmp_path, cli):
    out = tmp_path / "demo"
    code, _, err = cli("build", "--recipe", demo_yaml, "--quant", "auto", "--max-size", "10KB", "--out", out)
    assert code == 2 and "Traceback" not in err
    assert "no type of the quant ladder fits --max-size 10 KB: the closest, Q2_K, is" in err
    code, _, err = cli("build", "--recipe", demo_yaml, "--quant", "auto", "--max-ram", "100MB", "--out", out)
    assert code == 2 and "fits --max-ram 100 MB: the closest, Q2_K, is" in err  # ~317 MB to run any of them
    assert not out.exists()
