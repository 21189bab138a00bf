"""`edgemerge chat` driven through a pseudo-terminal, on stories260K with a chat template."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys

import pytest

from edgemerge.cli.chat import gguf_language
from edgemerge.runtime import Generation, Model
from edgemerge.sampling import Sampling

from .test_eval_run import make_chat_gguf

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory):
    return make_chat_gguf(tmp_path_factory.mktemp("chat") / "stories-chat.gguf")


class Terminal:
    """A child process on a pseudo-terminal; `expect` reads until a pattern shows up (or fails on timeout)."""

    def __init__(self, args: list[str]):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.buffer = ""

    def expect(self, pattern: str, timeout: float = 30.0) -> str:
        """Everything up to and including the first match of `pattern`; consumes it from the buffer."""
        while True:
            m = re.search(pattern, self.buffer)
            if m:
                before, self.buffer = self.buffer[: m.end()], self.buffer[m.end() :]
                return before
            ready, _, _ = select.select([self.master], [], [], timeout)
            if not ready:
                raise AssertionError(f"timed out waiting for {pattern!r}; screen so far: {self.buffer!r}")
            try:
                data = os.read(self.master, 4096)
            except OSError:  # the child closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"process ended before {pattern!r}; screen: {self.buffer!r}")
            self.buffer += ANSI.sub("", data.decode("utf-8", errors="replace")).replace("\r", "")

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        rc = self.proc.wait(timeout=30)
        os.close(self.master)
        return rc


def test_chat_streams_answers_resets_and_exits(chat_gguf):
    args = [sys.executable, "-c", "from edgemerge.cli import main; main()", "chat", str(chat_gguf),
            "--lang", "en", "-t", "1", "--max-tokens", "40", "-c", "512", "--temp", "0"]  # fmt: skip
    term = Terminal(args)
    try:
        term.expect(r"greedy")
        term.expect(r"/bye")
        term.expect(r"> ")
        term.send("/?")  # Ollama's commands: answered by the chat, never sent to the model
        term.expect(r"/clear \(or /reset\)")
        term.expect(r"> ")
        term.send("/nope")
        term.expect(r"unknown command /nope; /\? lists the commands")
        term.expect(r"> ")
        term.send("Tell me a story.")
        first = term.expect(r"\n> ")
        assert "there was a little girl named Lily" in first
        term.send("And then?")
        term.expect(r"\n> ")
        term.send("/reset")
        term.expect(r"new conversation")
        term.expect(r"> ")
        term.send("Tell me a story.")
        again = term.expect(r"\n> ")
        # greedy decoding from a fresh conversation gives the first answer again: /reset dropped the history
        answer = first.split("Tell me a story.")[-1].strip()
        assert answer and answer in again
        term.send("/bye")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_stream_yields_pieces_that_add_up_to_the_answer(chat_gguf):
    m = Model(chat_gguf, n_ctx=512, n_threads=1)
    try:
        prompt = m.chat_tokens([{"role": "user", "content": "Hello"}])
        items = list(m.stream(prompt, 40))
        pieces, final = items[:-1], items[-1]
        assert isinstance(final, Generation) and final.stopped and len(pieces) > 3
        assert "".join(pieces) == final.text == m.generate(prompt, 40).text
    finally:
        m.close()


def test_chat_language_from_the_gguf():
    assert gguf_language({"general.languages": ["eu"]}) == "eu"
    assert gguf_language({"general.languages": ["eu", "ca"]}) is None  # several: the user says which
    assert gguf_language({"general.languages": ["xx"]}) is None and gguf_language({}) is None


def test_chat_refuses_a_base_model(capsys):
    from edgemerge.cli import main

    from .test_eval_run import stories_gguf

    with pytest.raises(SystemExit) as e:
        main(["chat", str(stories_gguf()), "--threads", "1"])
    assert e.value.code == 2 and "no chat template" in capsys.readouterr().err


def _answer(m: Model, sampling: Sampling | None, prompt: str = "Tell me a story.") -> str:
    items = list(m.stream(m.chat_tokens([{"role": "user", "content": prompt}]), 40, sampling))
    return items[-1].text


def test_sampling_goes_through_llama_cpp_s_chain(chat_gguf):
    """top-k 1 leaves the chain one token to draw: the greedy answer; a seed gives the same answer again in a
    fresh session, another seed another answer; the generator runs on across turns, as llama-cli's."""
    hot = Sampling(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    with Model(chat_gguf, n_ctx=512, n_threads=1) as m:
        greedy = _answer(m, None)
        assert _answer(m, Sampling(top_k=1, seed=1)) == greedy
        first, second = _answer(m, hot), _answer(m, hot)
    with Model(chat_gguf, n_ctx=512, n_threads=1) as m:
        assert _answer(m, hot) == first
        other = _answer(m, Sampling(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=8))
    assert first != greedy and other != first and second != first


def test_replies_show_no_special_tokens(chat_gguf):
    with Model(chat_gguf, n_ctx=512, n_threads=1) as m:
        ids = m.tokenize("Once upon a time", add_special=False)
        assert m.token_text(m.bos) == "<s>"  # rendered when asked for: the reply must not ask
        text = m.detokenize([m.bos, *ids, m.bos])
        assert "<s>" not in text and text.strip() == m.detokenize(ids).strip() == "Once upon a time"


def test_sampling_flags_are_checked_before_the_model_loads(chat_gguf, cli):
    for flag, value in [("--temp", "-1"), ("--top-p", "1.5"), ("--min-p", "nan"), ("--seed", "-2")]:
        code, _, err = cli("chat", chat_gguf, flag, value)
        assert code == 2 and flag in err and err.count("\n") == 1, err
    code, _, err = cli("chat", chat_gguf, "-m", chat_gguf)
    assert code == 2 and "give the model once" in err
