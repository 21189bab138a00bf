"""`edgemerge merge` / `edgemerge check` through the command line: success, and every bad input of issue 2
(exit code 2, one line on stderr, nothing at the final output path)."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import yaml
from safetensors import safe_open
from safetensors.numpy import save_file

from .models import write_recipe


def assert_user_error(cli, recipe, out, *needles, extra=()):
    code, _stdout, err = cli("merge", recipe, "--out", out, *extra)
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Traceback" not in err
    assert not out.exists() or (out.is_dir() and not any(out.iterdir())) or "already exists" in err
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def edit_copy(family, tmp_path, role, edit):
    """A copy of one model of the family, changed by `edit(folder)`; returns the family with it."""
    dst = tmp_path / f"{role}-edited"
    shutil.copytree(family[role], dst)
    edit(dst)
    return dict(family, **{role: dst})


def edit_json(name, change):
    def edit(folder):
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))

    return edit


def rewrite_tensor(name, change):
    def edit(folder):
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, framework="numpy") as h:
                tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
            if name in tensors:
                tensors[name] = change(tensors[name])
                save_file(tensors, shard, metadata={"format": "pt"})

    return edit


def test_merge_and_check_succeed_with_json(cli, tmp_path, merge_family):
    recipe = write_recipe(tmp_path / "r.yaml", merge_family, {"eu": 0.5, "ca": 0.5})
    code, out, err = cli("check", recipe, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (
        report["compatible"] and report["architecture"] == "LlamaForCausalLM" and report["vocab_size"] == 512
    )
    assert set(report["models"]) == {"instruct", "base", "eu", "ca"}
    code, out, err = cli("merge", recipe, "--out", tmp_path / "m", "--backend", "torch", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (
        result["backend"] == "torch"
        and result["format"] == "hf"
        and result["languages"] == {"eu": 0.5, "ca": 0.5}
    )
    assert (tmp_path / "m" / "model.safetensors").exists() or (
        tmp_path / "m" / "model.safetensors.index.json"
    ).exists()
    # an existing non-empty output is refused, then replaced with --force
    assert_user_error(cli, recipe, tmp_path / "m", "already exists", "--force")
    code, _, err = cli("merge", recipe, "--out", tmp_path / "m", "--force", "--dtype", "float16")
    assert code == 0, err
    assert (
        json.loads((tmp_path / "m" / "config.json").read_text())[
            "dtype"
            if "dtype" in json.loads((merge_family["instruct"] / "config.json").read_text())
            else "torch_dtype"
        ]
        == "float16"
    )


BAD_MODELS = [
    (
        "truncated",
        "eu",
        lambda f: os.truncate(min(f.glob("*.safetensors")), 5000),
        ["unreadable or truncated"],
    ),
    (
        "shape",
        "eu",
        rewrite_tensor("model.layers.0.mlp.up_proj.weight", lambda a: a[:256]),
        ["model.layers.0.mlp.up_proj.weight", "[512, 256]", "[256, 256]"],
    ),
    (
        "vector shape",
        "ca",
        rewrite_tensor("model.norm.weight", lambda a: a.reshape(1, -1)),
        ["model.norm.weight", "[256]", "[1, 256]"],
    ),
    ("missing tensor", "ca", lambda f: _drop("model.norm.weight", f), ["model.norm.weight", "not in ca ("]),
    (
        "vocab",
        "eu",
        edit_json("config.json", lambda c: c.update(vocab_size=32000)),
        ["vocab_size", "512", "32000", "eu ("],
    ),
    (
        "architecture",
        "base",
        edit_json("config.json", lambda c: c.update(architectures=["MistralForCausalLM"])),
        ["architectures", "LlamaForCausalLM", "MistralForCausalLM"],
    ),
    ("tokenizer", "eu", lambda f: _swap_tokens(f), ["token id 100", "eu ("]),
    (
        "int weights",
        "eu",
        rewrite_tensor("model.norm.weight", lambda a: a.view("int16")),
        ["I16", "model.norm.weight"],
    ),
    (
        "pickle only",
        "eu",
        lambda f: [p.rename(p.with_suffix(".bin")) for p in f.glob("*.safetensors")],
        ["no .safetensors weights", ".bin"],
    ),
]


def _drop(name, folder):
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="numpy") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys() if k != name}  # noqa: SIM118
        save_file(tensors, shard, metadata={"format": "pt"})


def _swap_tokens(folder):
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    if isinstance(vocab, list):
        vocab[100], vocab[101] = vocab[101], vocab[100]
    else:
        a, b = (t for t, i in vocab.items() if i in (100, 101))
        vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(data))


@pytest.mark.parametrize(("case", "role", "edit", "needles"), BAD_MODELS, ids=[c[0] for c in BAD_MODELS])
def test_bad_models_stop_before_writing(cli, tmp_path, merge_family, case, role, edit, needles):
    family = edit_copy(merge_family, tmp_path, role, edit)
    if case == "pickle only":
        (family[role] / "model.safetensors.index.json").unlink()
    recipe = write_recipe(tmp_path / "r.yaml", family, {"eu": 1.0, "ca": 0.5})
    assert_user_error(cli, recipe, tmp_path / "out", *needles)
    code, _, err = cli("check", recipe)
    assert code == 2 and needles[0] in err


def test_missing_local_model(cli, tmp_path, merge_family):
    recipe = write_recipe(tmp_path / "r.yaml", dict(merge_family, eu=tmp_path / "nowhere"), {"eu": 1.0})
    assert_user_error(cli, recipe, tmp_path / "out", "no such folder", "nowhere")


def test_relative_model_paths_resolve_against_the_recipe(cli, tmp_path, merge_family):
    rel = {k: os.path.relpath(v, tmp_path / "recipes") for k, v in merge_family.items()}
    recipe = write_recipe(tmp_path / "recipes" / "r.yaml", rel, {"eu": 1.0})
    code, out, err = cli("check", recipe, "--json")
    assert code == 0, err
    assert json.loads(out)["models"]["eu"]["path"] == str(merge_family["eu"].resolve())


def test_unknown_hub_model_offline(cli, tmp_path, merge_family, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    recipe = write_recipe(tmp_path / "r.yaml", dict(merge_family, eu="nobody/no-such-model@v1"), {"eu": 1.0})
    assert_user_error(
        cli, recipe, tmp_path / "out", f"recipe tiny ({recipe}) needs nobody/no-such-model@v1 from the Hugging Face",
        "HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE", "put the local folders in r.yaml",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "needles"),
    [
        ({"method": "nuslerp"}, ["method", "nuslerp"]),
        ({"method": "slerp", "options": {"t": 2}}, ["options.t: must be in [0, 1], got 2"]),
        ({"options": {"foo": 1}}, ["options.foo: unknown option", "valid options: normalize, lambda"]),
        ({"method": "ties", "options": {"density": 2}}, ["options.density: must be in (0, 1], got 2"]),
        ({"dtype": "int8"}, ["dtype", "int8"]),
    ],
)
def test_bad_recipe_fields(cli, tmp_path, merge_family, fields, needles):
    recipe = write_recipe(tmp_path / "r.yaml", merge_family, {"eu": 1.0}, **fields)
    assert_user_error(cli, recipe, tmp_path / "out", *needles)


@pytest.mark.parametrize(
    ("weight", "needle"), [(".nan", "finite"), ("abc", "must be a number"), ("", "number")]
)
def test_bad_weights(cli, tmp_path, merge_family, weight, needle):
    path = write_recipe(tmp_path / "r.yaml", merge_family, {"eu": 1.0})
    text = path.read_text().replace("weight: 1.0", f"weight: {weight}")
    path.write_text(text)
    assert_user_error(cli, path, tmp_path / "out", "languages.0.weight", needle)


def test_unset_language_model(cli, tmp_path, merge_family):
    path = write_recipe(tmp_path / "r.yaml", merge_family, {"eu": 1.0})
    data = yaml.safe_load(path.read_text())
    data["languages"][0]["model"] = None
    path.write_text(yaml.safe_dump(data))
    assert_user_error(cli, path, tmp_path / "out", "languages.0.model (eu) is not set")


def test_mlx_backend_without_mlx(cli, tmp_path, merge_family, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlx", None)
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    recipe = write_recipe(tmp_path / "r.yaml", merge_family, {"eu": 1.0})
    assert_user_error(cli, recipe, tmp_path / "out", 'pip install -e ".[mlx]"', extra=("--backend", "mlx"))


def test_output_choice(cli, tmp_path, merge_family):
    recipe = write_recipe(tmp_path / "r.yaml", merge_family, {"eu": 1.0})
    assert_user_error(cli, recipe, tmp_path / "out", "--gguf", extra=("--gguf", tmp_path / "x.gguf"))
    code, _, err = cli("merge", recipe)
    assert code == 2 and "--out DIR" in err


def test_merge_to_gguf_from_the_command_line(cli, tmp_path, merge_family):
    recipe = write_recipe(tmp_path / "r.yaml", merge_family, {"eu": 1.0})
    code, out, err = cli("merge", recipe, "--gguf", tmp_path / "m.gguf", "--outtype", "f16", "--json")
    assert code == 0, err
    assert json.loads(out)["format"] == "gguf" and (tmp_path / "m.gguf").stat().st_size > 1_000_000
    code, _, err = cli("merge", recipe, "--gguf", tmp_path / "m.gguf")
    assert code == 2 and "already exists" in err and err.count("\n") == 1


def test_backend_choice(cli, tmp_path, merge_family, monkeypatch):
    import platform

    from edgemerge.merge.backends import resolve_backend_name

    recipe = write_recipe(tmp_path / "r.yaml", merge_family, {"eu": 1.0})
    assert_user_error(
        cli,
        recipe,
        tmp_path / "out",
        "unknown backend 'cuda'",
        "auto, torch, mlx",
        extra=("--backend", "cuda"),
    )
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    assert resolve_backend_name("auto") == "torch"
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    monkeypatch.setitem(sys.modules, "mlx", None)
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    assert resolve_backend_name("auto") == "torch"  # Apple silicon without mlx installed


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("build", "recipe.yaml"), "unexpected extra argument"),
        (("merge", "r.yaml", "--no-such-option"), "No such option"),
        (("no-such-command",), "No such command"),
    ],
)
def test_usage_errors_exit_2_without_internal_error(cli, args, needle):
    code, _out, err = cli(*args)
    assert code == 2, err
    assert needle in err and "internal error" not in err and "Traceback" not in err


def test_ctrl_c_exits_130_and_says_so(cli, tmp_path, merge_family, monkeypatch):
    """typer turns KeyboardInterrupt into exit code 130, returned (not raised) outside standalone mode."""
    from edgemerge.cli import merge as run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "merge_to_hf", interrupted)
    recipe = write_recipe(tmp_path / "r.yaml", merge_family, {"eu": 1.0})
    code, _out, err = cli("merge", recipe, "--out", tmp_path / "out")
    assert code == 130 and "interrupted" in err and "Traceback" not in err


def test_version(cli):
    from edgemerge import __version__

    code, out, _err = cli("--version")
    assert code == 0 and out.strip() == f"edgemerge {__version__}"


@pytest.mark.parametrize(
    ("errno_", "needle"),
    [("ENOSPC", "free some space"), ("EACCES", "choose a folder you can write to")],
)
def test_a_full_or_forbidden_disk_is_one_line_and_exit_2(
    cli, tmp_path, merge_family, monkeypatch, errno_, needle
):
    """Failures of the machine while writing (another process filled the disk after the space check, a folder
    without write permission) are not edgemerge bugs: one line with what to do, exit 2."""
    import errno

    from edgemerge.cli import merge as run

    def fails(*args, **kwargs):
        code = getattr(errno, errno_)
        raise OSError(code, os.strerror(code), str(tmp_path / "out"))

    monkeypatch.setattr(run, "merge_to_hf", fails)
    recipe = write_recipe(tmp_path / "r.yaml", merge_family, {"eu": 1.0})
    code, _out, err = cli("merge", recipe, "--out", tmp_path / "out")
    assert code == 2 and err.startswith("error: ") and needle in err and str(tmp_path / "out") in err
    assert err.strip().count("\n") == 0 and "internal error" not in err
