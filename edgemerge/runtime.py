"""A GGUF loaded in llama.cpp (llama-cpp-python), and the primitives every metric builds on: tokenizing, the
logits of token sequences (several per llama_decode), and greedy generation of many answers at once through the
model's own chat template.

llama-cpp-python's `Llama` holds the weights and the vocabulary; the passes run on llama.cpp contexts made here
for their shape (`Context`: n_seq sequences, each in its own KV stream), because `Llama` has one context of one
sequence and its generation decodes one prompt at a time. On a laptop CPU an 8B model's decoding is bound by
reading the weights, so 16 sequences per llama_decode cost little more than one.
"""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .chat_format import ChatTemplateRaised, TemplateRenderer
from .cpu_buffers import model_params
from .errors import EdgemergeError
from .gguf.inspect import read_gguf
from .interrupts import llama_call
from .limits import MAX_THREADS, check_count
from .matmuls import MatmulObserver
from .resources import default_threads
from .sampling import Sampling

MIN_CTX = 16  # fewer tokens than this hold no prompt and no perplexity chunk
VOCAB_CTX = 32  # the context of the `Llama` object itself: it is only asked for its vocabulary
N_BATCH = 512  # tokens per llama_decode (llama.cpp's default)
MAX_PARALLEL = 16  # sequences of one context for multiple-choice candidates
KV_PAD = 256  # llama.cpp pads a context's KV cells to a multiple of this


def check_gguf(path: Path) -> Path:
    """Fail with a clear message unless `path` is a complete GGUF file (header parsed, tensor data present)."""
    read_gguf(path)
    return Path(path)


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
    ids: list[int] = field(default_factory=list, compare=False)  # the generated token ids


class Context:
    """A llama.cpp context for `n_seq` sequences of up to `n_ctx_seq` tokens each, every sequence in its own KV
    stream (kv_unified off, like llama-server's parallel slots: one sequence's attention never spans another's)."""

    def __init__(
        self,
        lib: Any,
        llm: Any,
        n_seq: int,
        n_ctx_seq: int,
        n_batch: int,
        threads: int,
        observer: MatmulObserver | None = None,
    ):
        # llama-cpp-python's own settings (attention kernels, RoPE) with this context's shape
        p = type(llm.context_params).from_buffer_copy(llm.context_params)
        if observer is not None:  # llama.cpp calls it for every node of every graph it computes
            # the ctypes wrapper must live as long as the context: llama.cpp keeps only its address
            self._callback = lib.ggml_backend_sched_eval_callback(observer)
            p.cb_eval, p.cb_eval_user_data = self._callback, None
        model = llm.model
        n_ctx_seq = -(-n_ctx_seq // KV_PAD) * KV_PAD  # llama.cpp pads the context, then splits it evenly
        p.n_ctx, p.n_seq_max, p.kv_unified = n_seq * n_ctx_seq, n_seq, False
        p.n_batch = p.n_ubatch = n_batch
        p.n_threads = p.n_threads_batch = threads
        p.no_perf = True
        with llama_call():
            self.ptr = lib.llama_init_from_model(model, p)
        if not self.ptr:
            raise EdgemergeError(
                f"llama.cpp could not make a context of {n_seq} x {n_ctx_seq} tokens (out of memory?); "
                "give a smaller --batch or --ctx"
            )
        self._lib, self.n_seq, self.n_batch = lib, n_seq, n_batch
        self.n_ctx_seq = int(lib.llama_n_ctx_seq(self.ptr))
        if self.n_ctx_seq < n_ctx_seq:  # a llama.cpp that shapes contexts differently: fail, never overflow
            self.close()
            raise RuntimeError(f"llama.cpp made sequences of {self.n_ctx_seq} tokens, {n_ctx_seq} were asked")
        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))
        self.mem = lib.llama_get_memory(self.ptr)
        self._batch = lib.llama_batch_init(n_batch, 0, 1)

    def clear(self, seq: int | None = None) -> None:
        """Forget every sequence's tokens (or one sequence's)."""
        if seq is None:
            self._lib.llama_memory_clear(self.mem, True)
        else:
            self._lib.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def copy_sequence(self, src: int, dst: int) -> None:
        """Sequence `dst` becomes a copy of `src` (its whole KV stream, as llama.cpp copies across streams)."""
        self._lib.llama_memory_seq_cp(self.mem, src, dst, -1, -1)

    def drop_after(self, seq: int, n_past: int) -> None:
        self._lib.llama_memory_seq_rm(self.mem, seq, n_past, -1)

    def decode(self, entries: Sequence[tuple[int, int, int, bool]], *, keep: bool = True) -> np.ndarray:
        """Decode (token, position, sequence, wants logits) entries, n_batch per llama_decode; the logits of the
        entries that want them (float32, [n, n_vocab]), in order (none are copied out unless `keep`)."""
        lib, b, out = self._lib, self._batch, []
        for start in range(0, len(entries), self.n_batch):
            part = entries[start : start + self.n_batch]
            n_out = 0
            for k, (tok, pos, seq, want) in enumerate(part):
                b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, pos, 1, want
                b.seq_id[k][0] = seq
                n_out += want
            b.n_tokens = len(part)
            with llama_call():
                rc = lib.llama_decode(self.ptr, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc}")
            if n_out and keep:
                ptr = ctypes.cast(lib.llama_get_logits(self.ptr), ctypes.POINTER(ctypes.c_float))
                out.append(np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy())
        return np.concatenate(out) if out else np.zeros((0, self.n_vocab), np.float32)

    def close(self) -> None:
        if self.ptr:
            if getattr(self, "_batch", None) is not None:
                self._lib.llama_batch_free(self._batch)
                self._batch = None
            with llama_call():
                self._lib.llama_free(self.ptr)
            self.ptr = None


@dataclass
class _Unit:
    """A question's prefix with some of its continuations (`Model.continuations_many`): one sequence per
    continuation of two tokens or more, one for the prefix alone when there is none."""

    item: int
    prefix: list[int]
    conts: list[tuple[int, list[int]]]  # (index among the question's continuations, tokens)

    @property
    def n_seq(self) -> int:
        return max(1, len(self.conts))


def _finished(
    got: tuple[list[np.ndarray], dict[int, np.ndarray]],
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A question's prefix logits (of its first unit) and its continuations' logits in order."""
    lasts, rows = got
    return (lasts[0] if lasts else np.zeros((0,), np.float32)), [rows[j] for j in sorted(rows)]


@dataclass
class _Slot:
    """A sequence being generated: which prompt, its tokens so far and its token limit."""

    index: int
    n_prompt: int
    limit: int
    ids: list[int] = field(default_factory=list)


class Model:
    """One GGUF in llama.cpp; `n_ctx` is the context of one sequence (capped at the model's training context)."""

    def __init__(self, path: Path, *, n_ctx: int = 2048, n_threads: int | None = None):
        # llama_cpp loads the llama.cpp library: only when a model is run or quantized
        import llama_cpp

        check_count("--ctx", n_ctx, MIN_CTX, 1 << 24, " tokens")
        check_count("--threads", n_threads, 1, MAX_THREADS)
        kv = read_gguf(path).kv  # the checks of `check_gguf`; the header is read once
        self.path = Path(path)
        self._lib = llama_cpp
        train_ctx = _train_context(kv)
        if train_ctx:
            n_ctx = min(n_ctx, train_ctx)  # beyond it llama.cpp warns and quality collapses
        self.threads = n_threads or default_threads().n  # the cores other programs leave idle now
        # llama-cpp-python compiles every chat template of the file while loading it: each one is compiled in
        # the bounded renderer first, so a broken or hostile one is one error line, never our process's problem
        self._renderer = _compile_templates(kv, self.path.name)
        self._ctx: Context | None = None
        self._chain: tuple[Sampling, Any] | None = None  # chat's llama.cpp sampler chain, made on first use
        self._cached: list[int] = []  # the tokens of sequence 0 in the single-sequence context (chat turns)
        try:
            with llama_call(), model_params():  # AMX kept out where it crashes (cpu_buffers.py)
                self.llm = llama_cpp.Llama(
                    model_path=str(self.path),
                    n_ctx=VOCAB_CTX,
                    n_batch=VOCAB_CTX,
                    n_threads=1,
                    verbose=False,
                )
        except (ValueError, RuntimeError) as e:
            raise EdgemergeError(f"llama.cpp cannot load {self.path}: {e}") from None
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = self.llm.n_vocab()
        self.n_ctx = n_ctx
        self.n_batch = min(n_ctx, N_BATCH)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.llm.model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = self.llm.token_bos()
        self.metadata: dict[str, Any] = dict(self.llm.metadata)

    def __enter__(self) -> Model:  # noqa: PYI034 - Python 3.11's typing has Self, ruff's target may not
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
        self._free_sampler()
        self._release()
        with llama_call():
            self.llm.close()

    def _release(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx, self._cached = None, []

    def context(self, n_seq: int = 1, n_ctx_seq: int | None = None) -> Context:
        """A context of at least `n_seq` sequences of `n_ctx_seq` tokens (default the model's n_ctx): the current
        one when it is large enough, else a new one after the old one is freed (one KV cache at a time)."""
        n_ctx_seq = n_ctx_seq or self.n_ctx
        c = self._ctx
        if c is not None and c.n_seq >= n_seq and c.n_ctx_seq >= n_ctx_seq:
            return c
        self._release()
        self._ctx = Context(self._lib, self.llm, n_seq, n_ctx_seq, self.n_batch, self.threads)
        return self._ctx

    def observed_context(self, n_seq: int, n_ctx_seq: int, n_batch: int, observer: MatmulObserver) -> Context:
        """A new context whose every weight multiplication is shown to `observer` (llama.cpp's cb_eval); the
        current context is freed first (one KV cache at a time) and the caller closes this one."""
        self._release()
        return Context(self._lib, self.llm, n_seq, n_ctx_seq, n_batch, self.threads, observer)

    # -- tokens and logits ---------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special`, BOS is prepended when the model's vocabulary asks for it."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def detokenize(self, ids: list[int]) -> str:
        """Answer text as llama-cpp-python's completion returns it (special tokens not rendered)."""
        return self.llm.detokenize(ids).decode("utf-8", errors="ignore")

    def logits(self, tokens: list[int], first: int = 0) -> np.ndarray:
        """Logits (float32, shape [len(tokens) - first, n_vocab]) at positions first..len-1 of one sequence
        evaluated from an empty context; only those positions' logits are computed (llama_batch flags)."""
        if len(tokens) > self.n_ctx:
            raise ValueError(f"{len(tokens)} tokens do not fit a context of {self.n_ctx}")
        ctx = self.context()
        ctx.clear()
        self._cached = list(tokens)
        return ctx.decode([(t, p, 0, p >= first) for p, t in enumerate(tokens)])

    def extend_logits(self, tokens: list[int], n_past: int) -> np.ndarray:
        """Logits at every position of `tokens` decoded after the first `n_past` tokens already in the cache
        (positions from n_past on are dropped first): scoring several continuations of one shared prefix."""
        ctx = self.context()
        ctx.drop_after(0, n_past)
        self._cached = self._cached[:n_past] + list(tokens)
        return ctx.decode([(t, n_past + k, 0, True) for k, t in enumerate(tokens)])

    def continuations(self, prefix: list[int], conts: list[list[int]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The logits after `prefix` (its last position), and for each continuation the logits at each of its
        positions but the last, decoded after the prefix: `continuations_many` of this one question, in a
        context of as many sequences as it has continuations of two tokens or more (at most MAX_PARALLEL)."""
        per = max(1, min(sum(len(c) > 1 for c in conts), MAX_PARALLEL))
        need = len(prefix) + max((len(c) for c in conts), default=0)
        if need > self.n_ctx:
            raise ValueError(f"{need} tokens do not fit a context of {self.n_ctx}")
        return next(self.continuations_many([(prefix, conts)], per, need))

    def continuations_many(
        self, items: Iterable[tuple[list[int], list[list[int]]]], n_seq: int, n_ctx_seq: int
    ) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """For each (prefix, continuations) of `items`, in order, what `continuations` gives, several questions
        per llama_decode in a context of `n_seq` sequences of `n_ctx_seq` tokens.

        A question is one unit (split in units of at most `n_seq` continuations when it has more): units are
        packed in order while their sequences fit, each unit's prefix in its own sequence (the longest prefix in
        sequence 0, so the sequences still decoding at any position are 0..k-1, as llama.cpp's split_equal
        wants them), all prefixes decoded together position by position (each 512-token llama_decode holds
        every sequence's next tokens). Then each continuation of two tokens or more continues its unit's
        sequence (the first in the sequence itself, the others in copies, llama_memory_seq_cp), one unit's
        continuations side by side per llama_decode, as `continuations` decodes them: several questions'
        continuations in one decode put a different mix of streams in each micro-batch, and the f16 KV cache
        turns the last-bit differences that makes into 1e-2 nats on stories260K's long answers (4e-6 with an
        f32 cache). A one-token continuation needs only the prefix's last logits."""
        if n_ctx_seq > self.n_ctx:
            raise ValueError(f"{n_ctx_seq} tokens do not fit a context of {self.n_ctx}")
        ctx = self.context(n_seq, n_ctx_seq)
        self._cached = []
        group: list[_Unit] = []
        done: dict[int, tuple[list[np.ndarray], dict[int, np.ndarray]]] = {}
        units_left: dict[int, int] = {}
        nxt = 0  # the next item to hand out
        for i, (prefix, conts) in enumerate(items):
            if len(prefix) + max((len(c) for c in conts), default=0) > ctx.n_ctx_seq:
                raise ValueError(f"question {i} does not fit sequences of {ctx.n_ctx_seq} tokens")
            multi = [j for j, c in enumerate(conts) if len(c) > 1]
            chunks = [multi[k : k + n_seq] for k in range(0, len(multi), n_seq)] or [[]]
            units_left[i] = len(chunks)
            done[i] = ([], {j: np.zeros((0, self.n_vocab), np.float32) for j in range(len(conts))})
            for chunk in chunks:
                unit = _Unit(i, prefix, [(j, conts[j]) for j in chunk])
                if group and sum(u.n_seq for u in group) + unit.n_seq > n_seq:
                    self._decode_units(ctx, group, done, units_left)
                    group = []
                group.append(unit)
            while nxt in done and units_left[nxt] == 0:
                yield _finished(done.pop(nxt))
                nxt += 1
        if group:
            self._decode_units(ctx, group, done, units_left)
        while nxt in done:
            yield _finished(done.pop(nxt))
            nxt += 1

    def _decode_units(
        self,
        ctx: Context,
        group: list[_Unit],
        done: dict[int, tuple[list[np.ndarray], dict[int, np.ndarray]]],
        units_left: dict[int, int],
    ) -> None:
        """Decode a group of units (`continuations_many`) and store their logits in `done`."""
        order = sorted(group, key=lambda u: -len(u.prefix))
        ctx.clear()
        entries, wants = [], []
        for pos in range(len(order[0].prefix)):
            for s, u in enumerate(order):
                if pos < len(u.prefix):
                    last = pos == len(u.prefix) - 1
                    entries.append((u.prefix[pos], pos, s, last))
                    if last:
                        wants.append(u)
        for u, row in zip(wants, ctx.decode(entries)):
            done[u.item][0].append(row)
        free = len(order)
        for s, u in enumerate(order):
            seqs = []  # (sequence, continuation index, tokens)
            for k, (j, cont) in enumerate(u.conts):
                if k:
                    ctx.copy_sequence(s, free)
                seqs.append((s if k == 0 else free, j, cont))
                free += k > 0
            entries, owners = [], []  # owners: the index in `seqs` of each entry
            for k in range(max((len(c) - 1 for *_, c in seqs), default=0)):
                for n, (q, _j, cont) in enumerate(seqs):
                    if k < len(cont) - 1:
                        entries.append((cont[k], len(u.prefix) + k, q, True))
                        owners.append(n)
            if not entries:
                continue
            rows, owner = ctx.decode(entries), np.array(owners, dtype=np.int64)
            for n, (_q, j, _c) in enumerate(seqs):
                done[u.item][1][j] = rows[owner == n]
        for u in group:
            units_left[u.item] -= 1

    def logits_many(self, seqs: list[list[int]], first: int) -> Iterator[np.ndarray]:
        """For each sequence (all of one length L <= n_ctx), the logits at positions first..L-1, evaluated from an
        empty context, as llama.cpp's perplexity tool does: max(1, n_batch // L) sequences per llama_decode."""
        if not seqs:
            return
        n = len(seqs[0])
        if any(len(s) != n for s in seqs) or n > self.n_ctx:
            raise ValueError("sequences of one length, at most the context, are expected")
        per = max(1, self.n_batch // n)
        ctx = self.context(per, n)
        self._cached = []
        scored = n - first
        for g in range(0, len(seqs), per):
            group = seqs[g : g + per]
            ctx.clear()
            entries = [(t, p, j, p >= first) for j, s in enumerate(group) for p, t in enumerate(s)]
            rows = ctx.decode(entries)
            for j in range(len(group)):
                yield rows[j * scored : (j + 1) * scored]

    # -- chat ------------------------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The GGUF's own `tokenizer.chat_template`, or None (a base model)."""
        return self.metadata.get("tokenizer.chat_template") or None

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """`chat_prompt(messages)` tokenized, parsing special tokens, with BOS when the vocabulary asks for it."""
        return self.tokenize(self.chat_prompt(messages), add_special=True, parse_special=True)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Render `messages` with the GGUF's chat template (as llama-cpp-python's Jinja2ChatFormatter does, with
        the model's BOS/EOS strings, through the bounded `TemplateRenderer`), with the generation prompt. A BOS
        the template wrote is left out when tokenizing adds it (llama.cpp's server does not double it)."""
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
                return self.chat_prompt(merged + messages[2:])
            raise
        if self.add_bos and bos_text and prompt.startswith(bos_text):
            prompt = prompt[len(bos_text) :]
        return prompt

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

    def generate_many(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        *,
        n_seq: int = 1,
        on_done: Callable[[int, Generation], None] | None = None,
    ) -> list[Generation]:
        """Greedy answers to `prompts` (already templated), decoded as up to `n_seq` parallel sequences.

        Greedy: the next token is argmax of the logits (llama.cpp's greedy sampler, which llama-cpp-python uses
        at temperature 0), no repetition penalty. A sequence ends on an end-of-generation token (EOS/EOT,
        `stopped`) or at `max_tokens` (less when the prompt leaves less room in the context), and a waiting
        prompt takes its place in the next llama_decode (continuous batching). `on_done(i, generation)` is
        called as each answer ends. One loop for one prompt and for many, so both decode the same way.
        """
        if not prompts:
            return []
        limits = [self._limit(p, max_tokens) for p in prompts]
        n_seq = max(1, min(n_seq, len(prompts)))
        ctx = self.context(n_seq, max(len(p) + lim for p, lim in zip(prompts, limits)))
        ctx.clear()
        self._cached = []
        results: list[Generation | None] = [None] * len(prompts)
        waiting = deque(range(len(prompts)))
        running: dict[int, _Slot] = {}  # sequence id -> slot; the ids are always 0 .. len(running) - 1
        while waiting or running:
            # llama.cpp puts one micro-batch's sequences of a multi-stream context in consecutive ids only
            # (split_equal): running ids are kept 0..k-1 (`_compact`), so one step is one micro-batch
            entries = [(s.ids[-1], s.n_prompt + len(s.ids) - 1, q, True) for q, s in sorted(running.items())]
            order = sorted(running)  # the sequence of each logits row
            while waiting and len(running) < n_seq:  # prompts enter free sequences, logits at the last token
                i, seq = waiting.popleft(), len(running)
                p = prompts[i]
                entries += [(t, k, seq, k == len(p) - 1) for k, t in enumerate(p)]
                running[seq] = _Slot(i, len(p), limits[i])
                order.append(seq)
            rows = ctx.decode(entries)
            finished = []
            for seq, row in zip(order, rows):
                slot = running[seq]
                nxt = int(row.argmax())
                eog = self.is_eog(nxt)
                if not eog:
                    slot.ids.append(nxt)
                if eog or len(slot.ids) >= slot.limit:
                    gen = Generation(self.detokenize(slot.ids), eog, len(slot.ids), slot.ids)
                    results[slot.index] = gen
                    finished.append(seq)
                    if on_done is not None:
                        on_done(slot.index, gen)
            for seq in finished:
                del running[seq]
                ctx.clear(seq)
            _compact(ctx, running)
        return [g for g in results if g is not None]

    def generate(self, prompt_tokens: list[int], max_tokens: int) -> Generation:
        """The greedy answer to `prompt_tokens` (already templated), at most `max_tokens` tokens."""
        return self.generate_many([prompt_tokens], max_tokens)[0]

    def _sampler(self, sampling: Sampling) -> Any:
        """llama.cpp's sampler chain for `sampling` (common/sampling.cpp's order: top-k, top-p, min-p,
        temperature, a seeded draw), made once per model and setting: its generator runs on across the turns of
        a chat, as llama-cli's does."""
        if self._chain is not None and self._chain[0] == sampling:
            return self._chain[1]
        self._free_sampler()
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        for sampler in (
            lib.llama_sampler_init_top_k(sampling.top_k),
            lib.llama_sampler_init_top_p(sampling.top_p, 1),
            lib.llama_sampler_init_min_p(sampling.min_p, 1),
            lib.llama_sampler_init_temp(sampling.temperature),
            lib.llama_sampler_init_dist(lib.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed),
        ):
            lib.llama_sampler_chain_add(chain, sampler)  # the chain owns (and frees) each one
        self._chain = (sampling, chain)
        return chain

    def _free_sampler(self) -> None:
        if self._chain is not None:
            self._lib.llama_sampler_free(self._chain[1])
            self._chain = None

    def stream(
        self, prompt_tokens: list[int], max_tokens: int, sampling: Sampling | None = None
    ) -> Iterator[str | Generation]:
        """Like `generate`, yielding text pieces as they come, then one `Generation`; greedy unless `sampling`
        says otherwise (then llama.cpp's sampler chain draws each token). The tokens a previous call left in the
        cache that start this prompt are kept (a chat's earlier turns are not decoded again)."""
        chain = None if sampling is None or sampling.greedy else self._sampler(sampling)
        limit = self._limit(prompt_tokens, max_tokens)
        ctx = self.context()
        keep = 0
        for a, b in zip(self._cached, prompt_tokens[:-1]):  # the last prompt token is decoded for its logits
            if a != b:
                break
            keep += 1
        ctx.drop_after(0, keep)
        self._cached = list(prompt_tokens)
        row = ctx.decode([(t, k, 0, k == len(prompt_tokens) - 1) for k, t in enumerate(prompt_tokens)][keep:])
        ids: list[int] = []
        text = ""
        stopped = False
        while True:
            if chain is None:
                nxt = int(row[-1].argmax())
            else:  # the logits of the last decoded token, still in the context
                with llama_call():
                    nxt = int(self._lib.llama_sampler_sample(chain, ctx.ptr, -1))
            if self.is_eog(nxt):
                stopped = True
                break
            ids.append(nxt)
            full = self.detokenize(ids)
            if full.startswith(text) and len(full) > len(text):  # a piece ending inside a character waits
                piece, text = full[len(text) :], full
                yield piece
            if len(ids) >= limit:
                break
            self._cached.append(nxt)
            row = ctx.decode([(nxt, len(self._cached) - 1, 0, True)])
        full = self.detokenize(ids)
        if full.startswith(text) and len(full) > len(text):
            yield full[len(text) :]
        yield Generation(text=full, stopped=stopped, tokens=len(ids), ids=ids)


def _compact(ctx: Context, running: dict[int, _Slot]) -> None:
    """Move the sequences with the highest ids into the ids that ended, so the running ones are 0..k-1 again
    (a KV stream copy each: n_ctx_seq x the KV bytes of a token, tens of MB for an 8B model)."""
    k = len(running)
    holes = [i for i in range(k) if i not in running]
    movers = sorted(q for q in running if q >= k)
    for hole, mover in zip(holes, movers):
        ctx.copy_sequence(mover, hole)
        ctx.clear(mover)
        running[hole] = running.pop(mover)
