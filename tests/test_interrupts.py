"""Issue 19 class 3: Ctrl-C reaches the user in every llama.cpp stage (quantize, model load, decode,
generation): exit 130 ("interrupted"), no final output, no partial file, no quantizer left running.

The subprocess tests send a real SIGINT once the stage has visibly started (its partial file exists, or
llama.cpp is loaded); the in-process tests make llama.cpp's own log callback send the signal, which is exactly
the case that used to be swallowed ("Exception ignored ... KeyboardInterrupt")."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgemerge.interrupts import llama_call, raise_if_interrupted

from .models import Spec, make_family, tiny_spm_tokenizer
from .reference_llama import reference_llama

llama_cpp = pytest.importorskip("llama_cpp")

CLI = [sys.executable, "-c", "from edgemerge.cli import main; main()"]
# big enough that a one-thread Q4_K_M takes seconds on a laptop (16 M parameters), small enough to build fast
SLOW = Spec(tokenizer="spm512", hidden=512, layers=4, intermediate=2048, heads=8, kv_heads=4, dtype="float16")


@pytest.fixture(scope="module")
def slow_family(tmp_path_factory, tok_cache) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slow-family")
    return make_family(root, SLOW, tiny_spm_tokenizer(tok_cache), langs=("eu",))


@pytest.fixture(scope="module")
def slow_gguf(slow_family, tmp_path_factory) -> Path:
    from edgemerge.pipeline import export_hf

    return export_hf(
        slow_family["instruct"], tmp_path_factory.mktemp("slow") / "slow-f16.gguf", outtype="f16"
    )


def _wait_for(proc: subprocess.Popen, ready, what: str, seconds: float = 300) -> None:
    """Poll until `ready()` (the stage has started); the process must still be running then."""
    deadline = time.monotonic() + seconds
    while not ready():
        if proc.poll() is not None:
            pytest.fail(
                f"the process ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}"
            )
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.005)


def _interrupt(proc: subprocess.Popen, group: bool) -> tuple[int, str]:
    """SIGINT to the process, or to its whole process group as a terminal's Ctrl-C does."""
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _leftover_processes(needle: str) -> list[str]:
    """Command lines of live processes mentioning `needle` (Linux /proc; [] elsewhere)."""
    found = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().split()[2]
        except OSError:
            continue
        if needle in cmd and state != "Z" and int(p.name) != os.getpid():
            found.append(cmd)
    return found


def _partials(folder: Path) -> list[Path]:
    return list(folder.glob("**/.*.partial-*")) if folder.exists() else []


@pytest.mark.parametrize("group", [False, True], ids=["process", "process-group"])
def test_ctrl_c_during_quantize(tmp_path, slow_gguf, group):
    out_dir = tmp_path / "q"
    proc = subprocess.Popen(
        [*CLI, "quantize", str(slow_gguf), "-q", "Q4_K_M", "--out-dir", str(out_dir), "--threads", "1"],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    _wait_for(proc, lambda: bool(_partials(out_dir)), "llama.cpp started writing")
    code, err = _interrupt(proc, group)
    assert code == 130, err
    assert "interrupted" in err and "Exception ignored" not in err, err
    assert not (out_dir / "slow-Q4_K_M.gguf").exists()
    assert not _partials(out_dir)
    assert not _leftover_processes(str(out_dir))


@pytest.mark.parametrize(("stage", "partial"), [("merge", "F16"), ("quantize", "Q4_K_M")])
def test_ctrl_c_during_a_build_stage_stops_the_build(tmp_path, slow_family, stage, partial):
    recipe = tmp_path / "recipe.yaml"
    data = {
        "name": "slow",
        "instruct": str(slow_family["instruct"]),
        "base": str(slow_family["base"]),
        "languages": [{"code": "eu", "model": str(slow_family["eu"]), "weight": 0.5}],
        "quants": ["Q4_K_M"],
        "imatrix": "none",  # straight from the merge to the quantize stage (calibrating this model takes 100 s)
    }
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "dist"
    proc = subprocess.Popen(
        [*CLI, "build", "--recipe", str(recipe), "--out", str(out), "--skip-eval", "--threads", "1"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    _wait_for(proc, lambda: any(partial in p.name for p in _partials(out)), f"the {stage} stage started")
    code, err = _interrupt(proc, group=True)
    assert code == 130, err
    assert "interrupted" in err and "Exception ignored" not in err, err
    assert not (out / f"slow-{partial}.gguf").exists() and not (out / "slow-Q4_K_M.gguf").exists()
    assert not (out / "manifest.json").exists() and not (out / "README.md").exists()
    assert not _partials(out)
    assert not _leftover_processes(str(out))


def test_ctrl_c_during_eval(tmp_path, slow_gguf):
    if not Path("/proc").exists():
        pytest.skip("needs Linux /proc to see when llama.cpp is loaded")
    report = tmp_path / "report.json"
    proc = subprocess.Popen(
        [*CLI, "eval", str(slow_gguf), "--lang", "eu", "--report", str(report), "--threads", "1"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )

    def llama_loaded() -> bool:
        try:
            return "libllama" in Path(f"/proc/{proc.pid}/maps").read_text()
        except OSError:
            return False

    _wait_for(proc, llama_loaded, "llama.cpp was loaded")
    code, err = _interrupt(proc, group=True)
    assert code == 130, err
    assert "Exception ignored" not in err
    assert not report.exists() and not _partials(tmp_path)


@pytest.fixture
def sigint_from_llama_log():
    """Make llama.cpp's log callback send SIGINT to this process on its first message: the signal then
    arrives inside a llama.cpp call and Python first sees it inside the callback (the swallowed case)."""
    from llama_cpp import _logger

    sent = []

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        if not sent:
            sent.append(text)
            os.kill(os.getpid(), signal.SIGINT)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield sent
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def test_sigint_inside_a_llama_cpp_callback_is_raised_after_the_call(slow_gguf, sigint_from_llama_log):
    with pytest.raises(KeyboardInterrupt), llama_call():
        llm = reference_llama(str(slow_gguf), n_ctx=64, n_threads=1, verbose=False)
        loaded = llm  # reached: the call itself ran to its end, then the interrupt was raised
    assert sigint_from_llama_log and loaded is not None
    loaded.close()


def test_model_load_is_interruptible(slow_gguf, sigint_from_llama_log):
    from edgemerge.runtime import Model

    with pytest.raises(KeyboardInterrupt):
        Model(slow_gguf, n_ctx=64, n_threads=1)
    assert sigint_from_llama_log


def test_generation_stops_at_the_next_token(slow_gguf):
    """The stopping criterion llama-cpp-python runs after each token raises a recorded Ctrl-C."""
    from edgemerge.runtime import Model

    m = Model(slow_gguf, n_ctx=128, n_threads=1)
    try:
        tokens = m.tokenize("Kaixo")
        calls = []

        def interrupt_after_three(*args):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return raise_if_interrupted()

        with pytest.raises(KeyboardInterrupt), llama_call():
            m.llm.create_completion(
                tokens,
                max_tokens=100,
                temperature=0.0,
                stopping_criteria=llama_cpp.StoppingCriteriaList([interrupt_after_three]),
            )
        assert 3 <= len(calls) <= 4  # stopped right after the signal, not at max_tokens
        assert m.generate(tokens, 4).tokens > 0  # the model is still usable afterwards
    finally:
        m.close()


def test_outside_llama_calls_ctrl_c_is_untouched():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with llama_call():
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        with llama_call():  # nested: one handler, one raise
            pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert raise_if_interrupted() is False
