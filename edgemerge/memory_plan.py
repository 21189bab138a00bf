"""The build's memory plan: what each stage needs against what this process may use, decided before any work.

    chat eval of a file   weights (the whole file, mapped) + KV cache (batch x 512-token sequences) + compute
                          buffer + logits buffers + the process; it fits when need <= 0.9 x usable memory
                          (`resources.fits`). The batch shrinks (16, 8, 4, 2, 1) before the file is given up.
    perplexity / drift    the same without the weights: each llama_decode of 512 tokens reads them once, from
                          the page cache or from disk, so a file larger than memory is still scored (slowly)
    merge, quantize       `resources.merge_memory`, `resources.quantize_memory`

A file too large for the chat metrics is scored in perplexity/drift only, and the largest file that fits stands
for it (its answers are the ones a user of the smaller file sees); `eval_all` answers with every file anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import EdgemergeError
from .files import human_bytes
from .resources import (
    MemoryLimit,
    ModelShape,
    Threads,
    eval_memory,
    fits,
    kv_bytes_per_token,
    merge_memory,
    model_shape,
    quantize_memory,
)

BATCHES = (16, 8, 4, 2, 1)
CHAT_SEQ_CTX = 512  # a prompt (the built-in ones are under 256 tokens) and a 256-token answer
PPL_SEQS, PPL_SEQ_CTX = 2, 256  # two 256-token perplexity chunks per llama_decode


@dataclass(frozen=True)
class FileEval:
    """How one file is evaluated: answers in batches of `batch`, or no answers (`stand_in` answers for it)."""

    name: str
    need: int  # bytes, for the way it is evaluated
    chat: bool
    batch: int
    note: str = ""
    stand_in: str | None = None
    answer_need: int = 0  # bytes to answer the prompts one at a time

    @property
    def skip_reason(self) -> str | None:
        """The line the eval report carries when the prompts are not answered."""
        if self.chat:
            return None
        return self.note


@dataclass
class MemoryPlan:
    limit: MemoryLimit
    threads: Threads
    stages: dict[str, int] = field(default_factory=dict)  # merge / quantize Q: bytes
    evals: dict[str, FileEval] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The plan as the build prints it before any work."""
        lim = self.limit
        ram = f"; RAM {human_bytes(lim.ram)}" if lim.cgroup is not None and lim.cgroup < lim.ram else ""
        head = f"{human_bytes(lim.bytes)} usable ({lim.source}{ram}), llama.cpp threads {self.threads.n}"
        out = [f"{head} ({self.threads.reason})"]
        out += [f"{stage} {human_bytes(need)}" for stage, need in self.stages.items()]
        for f in self.evals.values():
            how = f"answers {f.batch} at a time" if f.chat else f.note
            out.append(f"eval {f.name} {human_bytes(f.need)}: {how}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "usable": self.limit.bytes,
            "ram": self.limit.ram,
            "cgroup": self.limit.cgroup,
            "source": self.limit.source,
            "threads": self.threads.n,
            "threads_reason": self.threads.reason,
            "stages": self.stages,
            "evals": {
                n: {"need": f.need, "chat": f.chat, "batch": f.batch, "note": f.note, "stand_in": f.stand_in}
                for n, f in self.evals.items()
            },
        }


def shape_from_config(config: dict, file_bytes: int) -> ModelShape:
    """A model's shape from its Hugging Face config.json, before its GGUF exists (`resources.model_shape`
    reads the same from a GGUF header). Text settings of a multimodal config sit under text_config."""
    c = config.get("text_config") or config

    def num(key: str, default: int | None = None) -> int:
        v = c.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise EdgemergeError(f"config.json: {key} must be a positive integer for the memory plan")
        return v

    n_layer, n_embd, n_head = num("num_hidden_layers"), num("hidden_size"), num("num_attention_heads")
    n_kv, n_ff, n_vocab = num("num_key_value_heads", n_head), num("intermediate_size"), num("vocab_size")
    head_dim = c.get("head_dim") if isinstance(c.get("head_dim"), int) else None
    return ModelShape(
        file_bytes=file_bytes,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=n_ff,
        n_vocab=n_vocab,
        kv_bytes_per_token=kv_bytes_per_token(n_layer, n_head, n_kv, n_embd, head_dim, head_dim),
        largest_tensor_elements=max(n_vocab * n_embd, n_ff * n_embd),
        n_head=n_head,
    )


def chat_need(shape: ModelShape, batch: int) -> int:
    return sum(eval_memory(shape, n_seq=batch, n_ctx_seq=CHAT_SEQ_CTX).values())


def ppl_need(shape: ModelShape) -> int:
    parts = eval_memory(shape, n_seq=PPL_SEQS, n_ctx_seq=PPL_SEQ_CTX)
    return sum(v for k, v in parts.items() if k != "weights")


def plan_evals(
    shape: ModelShape,
    sizes: dict[str, int],
    limit: MemoryLimit,
    *,
    eval_all: bool = False,
    skip_chat: bool = False,
    batch: int | None = None,
) -> dict[str, FileEval]:
    """How each file (name -> bytes) is evaluated within `limit` (module docstring)."""
    planned: dict[str, FileEval] = {}
    for name, size in sizes.items():
        s = replace(shape, file_bytes=size)
        one = chat_need(s, 1)
        batches = [b for b in BATCHES if batch is None or b <= batch] or [1]
        if batch is not None and batch not in batches:
            batches.insert(0, batch)
        fitting = next((b for b in batches if fits(chat_need(s, b), limit)), None)
        if skip_chat:
            note = "perplexity and drift only (--skip-chat-eval)"
            planned[name] = FileEval(name, ppl_need(s), False, 0, note, answer_need=one)
        elif fitting is not None or eval_all:
            b = fitting or batches[0]
            planned[name] = FileEval(name, chat_need(s, b), True, b, answer_need=one)
        else:
            planned[name] = FileEval(name, ppl_need(s), False, 0, "", answer_need=one)
    answering = [n for n, f in planned.items() if f.chat]
    stand_in = max(answering, key=lambda n: sizes[n], default=None)
    for name, f in planned.items():
        if not f.chat and not skip_chat:
            note = f"too large to answer from memory (needs {human_bytes(f.answer_need)}): "
            note += "perplexity and drift only"
            note += f"; the chat metrics of {stand_in} stand for it" if stand_in else ""
            planned[name] = FileEval(name, f.need, False, 0, note, stand_in, f.answer_need)
    return planned


@dataclass(frozen=True)
class FilePlan:
    batch: int
    fits: bool
    note: str


def plan_file(path: Path, limit: MemoryLimit) -> FilePlan:
    """`edgemerge eval` of one GGUF: the batch its memory allows (1 when even one sequence does not fit: the
    answers then read the weights from disk, and `note` says so)."""
    shape = model_shape(path)
    f = plan_evals(shape, {path.name: shape.file_bytes}, limit)[path.name]
    if f.chat:
        return FilePlan(f.batch, True, "")
    note = (
        f"{path.name} needs {human_bytes(f.answer_need)} to answer from memory and {human_bytes(limit.bytes)} is "
        f"usable ({limit.source}): the answers read the weights from disk and are slow"
    )
    return FilePlan(1, False, note)


def check_chat_possible(planned: dict[str, FileEval], limit: MemoryLimit) -> None:
    """No file can answer within the memory: stop before any work, saying what would."""
    if (
        planned
        and not any(f.chat for f in planned.values())
        and not any("--skip-chat-eval" in f.note for f in planned.values())
    ):
        smallest = min(planned.values(), key=lambda f: f.answer_need)
        raise EdgemergeError(
            f"no file of this build fits the memory for the chat metrics ({human_bytes(limit.bytes)} usable, "
            f"{limit.source}; the smallest, {smallest.name}, needs {human_bytes(smallest.answer_need)}): "
            "add --skip-chat-eval for perplexity and drift only, --eval-all to answer from disk anyway (very "
            "slow), or --skip-eval"
        )


def plan_memory(
    shape: ModelShape,
    sizes: dict[str, int],
    quants: list[str],
    limit: MemoryLimit,
    threads: Threads,
    *,
    n_inputs: int,
    eval_files: bool = True,
    eval_all: bool = False,
    skip_chat: bool = False,
    batch: int | None = None,
) -> MemoryPlan:
    """The whole build's plan: merge, each quantize, each file's eval (`plan_evals`)."""
    plan = MemoryPlan(limit, threads)
    plan.stages["merge"] = merge_memory(shape.n_embd, n_inputs)
    for q in quants:
        plan.stages[f"quantize {q}"] = quantize_memory(shape)
    if eval_files:
        plan.evals = plan_evals(shape, sizes, limit, eval_all=eval_all, skip_chat=skip_chat, batch=batch)
    return plan
