"""A GGUF loaded in llama.cpp (llama-cpp-python), and the primitives every metric builds on: tokenizing, the
logits of a token sequence, and greedy generation through the model's own chat template."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..chat_format import ChatTemplateRaised, TemplateRenderer
from ..errors import EdgemergeError
from ..gguf.inspect import read_gguf
from ..interrupts import llama_call, raise_if_interrupted
from ..limits import MAX_THREADS, check_count

MIN_CTX = 16  # fewer tokens than this hold no prompt and no perplexity chunk


def check_gguf(path: Path) -> Path:
    """Fail with a clear message unless `path` is a complete GGUF file (header parsed, tensor data present)."""
    read_gguf(path)
    return Path(path)


def _cpus() -> int:
    """CPUs this process may run on (macOS has no sched_getaffinity)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _train_context(kv: dict[str, Any]) -> int | None:
    """The GGUF's `<arch>.context_length` (from its header's key/values), or None."""
    value = kv.get(f"{kv.get('general.architecture')}.context_length")
    return int(value) if value is not None else None


def _compile_templates(kv: dict[str, Any], name: str) -> TemplateRenderer | None:
    """A renderer of the GGUF's `tokenizer.chat_template` (None without one), after every template of the file
    `name` (also the named `tokenizer.chat_template.<name>` ones) compiled in the bounded renderer."""
    templates = {
        k: v
        for k, v in kv.items()
        if k == "tokenizer.chat_template" or k.startswith("tokenizer.chat_template.")
    }
    default = None
    try:
        for key, template in templates.items():
            renderer = TemplateRenderer(template, label=f"{key} of {name}")
            if key == "tokenizer.chat_template":
                default = renderer
            else:
                renderer.close()
    except BaseException:
        if default is not None:
            default.close()
        raise
    return default


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p = x - log(sum(exp(x))) per row, in float64 like llama.cpp's perplexity tool."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclass
class Generation:
    text: str
    stopped: bool  # ended on an end-of-generation token (EOS/EOT) before the token limit
    tokens: int


class Model:
    """One GGUF in llama.cpp with a context of `n_ctx` tokens (capped at the model's training context)."""

    def __init__(self, path: Path, *, n_ctx: int = 2048, n_threads: int | None = None):
        import llama_cpp

        check_count("--ctx", n_ctx, MIN_CTX, 1 << 24, " tokens")
        check_count("--threads", n_threads, 1, MAX_THREADS)
        kv = read_gguf(path).kv  # the checks of `check_gguf`; the header is read once
        self.path = Path(path)
        self._lib = llama_cpp
        train_ctx = _train_context(kv)
        if train_ctx:
            n_ctx = min(n_ctx, train_ctx)  # beyond it llama.cpp warns and quality collapses
        threads = n_threads or _cpus()
        # llama-cpp-python compiles every chat template of the file while loading it: each one is compiled in
        # the bounded renderer first, so a broken or hostile one is one error line, never our process's problem
        self._renderer = _compile_templates(kv, self.path.name)
        try:
            with llama_call():
                self.llm = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=n_ctx,
                    n_batch=min(n_ctx, 512),
                    n_threads=threads,
                    n_threads_batch=threads,
                    verbose=False,
                )
        except (ValueError, RuntimeError) as e:
            raise EdgemergeError(f"llama.cpp cannot load {self.path}: {e}") from None
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = self.llm.n_vocab()
        self.n_ctx = self.llm.n_ctx()
        self.n_batch = self.llm.n_batch
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.llm.model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = self.llm.token_bos()
        self.metadata: dict[str, Any] = dict(self.llm.metadata)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
        with llama_call():
            self.llm.close()

    # -- tokens and logits ---------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special`, BOS is prepended when the model's vocabulary asks for it."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def logits(self, tokens: list[int], first: int = 0) -> np.ndarray:
        """Logits (float32, shape [len(tokens) - first, n_vocab]) at positions first..len-1 of one sequence
        evaluated from an empty context; only those positions' logits are computed (llama_batch flags)."""
        if len(tokens) > self.n_ctx:
            raise ValueError(f"{len(tokens)} tokens do not fit a context of {self.n_ctx}")
        lib, ctx = self._lib, self.llm.ctx
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        self.llm.reset()
        return self._decode(tokens, 0, first)

    def extend_logits(self, tokens: list[int], n_past: int) -> np.ndarray:
        """Logits at every position of `tokens` decoded after the first `n_past` tokens already in the cache
        (positions from n_past on are dropped first): scoring several continuations of one shared prefix."""
        lib, ctx = self._lib, self.llm.ctx
        lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), 0, n_past, -1)
        self.llm.reset()
        return self._decode(tokens, n_past, n_past)

    def _decode(self, tokens: list[int], pos0: int, first: int) -> np.ndarray:
        lib, ctx = self._lib, self.llm.ctx
        rows = []
        batch = lib.llama_batch_init(self.n_batch, 0, 1)
        try:
            for start in range(0, len(tokens), self.n_batch):
                part = tokens[start : start + self.n_batch]
                batch.n_tokens = len(part)
                wanted = []
                for k, tok in enumerate(part):
                    pos = pos0 + start + k
                    batch.token[k] = tok
                    batch.pos[k] = pos
                    batch.n_seq_id[k] = 1
                    batch.seq_id[k][0] = 0
                    batch.logits[k] = pos >= first
                    if pos >= first:
                        wanted.append(k)
                with llama_call():
                    rc = lib.llama_decode(ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed with code {rc}")
                for k in wanted:
                    ptr = lib.llama_get_logits_ith(ctx, k)
                    rows.append(
                        np.ctypeslib.as_array(
                            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)
                        ).copy()
                    )
        finally:
            lib.llama_batch_free(batch)
        return np.stack(rows) if rows else np.zeros((0, self.n_vocab), np.float32)

    # -- chat ------------------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The GGUF's own `tokenizer.chat_template`, or None (a base model)."""
        return self.metadata.get("tokenizer.chat_template") or None

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """Render `messages` with the GGUF's chat template (as llama-cpp-python's Jinja2ChatFormatter does, with
        the model's BOS/EOS strings, through the bounded `TemplateRenderer`) and tokenize, parsing special
        tokens. A BOS the template already wrote is not doubled (llama.cpp's server does the same)."""
        template = self.chat_template
        if template is None:
            raise EdgemergeError(
                f"{self.path.name} has no chat template (a base model?): chat is not available"
            )
        bos_text = self.token_text(self.bos) if self.bos >= 0 else ""
        eos_text = self.token_text(self.llm.token_eos()) if self.llm.token_eos() >= 0 else ""
        if self._renderer is None:  # a template in metadata that read_gguf did not see: render it bounded too
            self._renderer = TemplateRenderer(template, label=f"tokenizer.chat_template of {self.path.name}")
        # the variables llama-cpp-python's Jinja2ChatFormatter passes
        context = {"eos_token": eos_text, "bos_token": bos_text, "functions": None, "function_call": None}
        try:
            prompt = self._renderer.render(
                messages, add_generation_prompt=True, tools=None, tool_choice=None, **context
            )
        except ChatTemplateRaised:  # e.g. a role the template rejects
            if messages and messages[0]["role"] == "system" and len(messages) > 1:
                merged = [
                    {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
                ]
                return self.chat_tokens(merged + messages[2:])
            raise
        if self.add_bos and bos_text and prompt.startswith(bos_text):
            prompt = prompt[len(bos_text) :]
        return self.tokenize(prompt, add_special=True, parse_special=True)

    def check_chat_template(self) -> None:
        """Render the GGUF's chat template once for a plain user message (no-op without a template): a template
        that cannot render fails here, before any long evaluation."""
        if self.chat_template is not None:
            self.chat_tokens([{"role": "user", "content": "Kaixo!"}])

    def _limit(self, prompt_tokens: list[int], max_tokens: int) -> int:
        room = self.n_ctx - len(prompt_tokens)
        if room <= 0:
            raise EdgemergeError(f"the prompt ({len(prompt_tokens)} tokens) fills the context ({self.n_ctx})")
        return min(max_tokens, room)

    def _complete(self, prompt_tokens: list[int], max_tokens: int, stream: bool):
        # Greedy: temperature 0 makes llama-cpp-python use llama.cpp's greedy sampler; no repetition penalty.
        # With no stop strings, finish_reason is "stop" only when an end-of-generation token (EOS/EOT) came.
        # The stopping criterion is Python code llama-cpp-python runs after every token: Ctrl-C ends the
        # generation there instead of being lost in a log callback (interrupts.py).
        return self.llm.create_completion(
            prompt_tokens,
            max_tokens=self._limit(prompt_tokens, max_tokens),
            temperature=0.0,
            repeat_penalty=1.0,
            stream=stream,
            stopping_criteria=self._lib.StoppingCriteriaList([raise_if_interrupted]),
        )

    def generate(self, prompt_tokens: list[int], max_tokens: int) -> Generation:
        """The greedy answer to `prompt_tokens` (already templated), at most `max_tokens` tokens."""
        with llama_call():
            out = self._complete(prompt_tokens, max_tokens, stream=False)
        choice = out["choices"][0]
        return Generation(
            choice["text"], choice["finish_reason"] == "stop", out["usage"]["completion_tokens"]
        )

    def stream(self, prompt_tokens: list[int], max_tokens: int) -> Iterator[str | Generation]:
        """Like `generate`, yielding text pieces as they come, then one `Generation` (tokens: pieces seen)."""
        parts: list[str] = []
        finish = None
        with llama_call():
            chunks = iter(self._complete(prompt_tokens, max_tokens, stream=True))
        while True:
            with llama_call():  # not around the yield: the caller's own code keeps its usual Ctrl-C
                chunk = next(chunks, None)
            if chunk is None:
                break
            choice = chunk["choices"][0]
            if choice["text"]:
                parts.append(choice["text"])
                yield choice["text"]
            finish = choice.get("finish_reason") or finish
        yield Generation(text="".join(parts), stopped=finish == "stop", tokens=len(parts))
