"""Quantization drift: how far MODEL's next-token distributions move from a reference (usually its F16), over the
scored positions of the perplexity chunks (perplexity.py; the positions llama.cpp's `llama-perplexity
--kl-divergence` uses). The reference is not loaded beside the model: its log-probabilities were stored first
(reference.py, llama.cpp's file format). With p the reference's distribution and q the model's:

    KL(p || q) = sum_v p_v (log p_v - log q_v)        kld_mean = mean of KL over positions
    top1_agreement = share of positions where argmax p == argmax q
    ppl_ratio = PPL(model) / PPL(ref)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import EdgemergeError
from ..limits import shown_path
from ..runtime import Model, log_softmax
from .perplexity import Chunks
from .reference import StoredReference, compare


@dataclass
class DriftResult:
    kld_mean: float
    kld_max: float
    top1_agreement: float
    perplexity: float  # of the model
    ref_perplexity: float
    tokens: int

    @property
    def ppl_ratio(self) -> float:
        return self.perplexity / self.ref_perplexity


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(model)) per row, in nats (from two sets of live logits)."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def reference_chunks(
    model: Model, stored: StoredReference, tokens: list[int], *, max_chunks: int | None
) -> Chunks:
    """The stored reference's chunking for `model`, after checking that both saw the same tokens: the same
    vocabulary size, and the model's tokens of the text equal the ones the reference was computed on."""
    h, name = stored.header, shown_path(stored.path)
    if h.n_vocab != model.n_vocab:
        raise EdgemergeError(
            f"the reference logits {name} come from a model with a vocabulary of {h.n_vocab} tokens and "
            f"{model.path.name} has {model.n_vocab} (a different vocabulary); compare against the file this "
            "model was quantized from"
        )
    n = h.n_ctx * h.n_chunk
    if len(tokens) < n or not np.array_equal(np.asarray(tokens[:n]), stored.tokens):
        raise EdgemergeError(
            f"the reference logits {name} were computed on other tokens than {model.path.name} gives for this "
            "text (another text, or a different vocabulary); give the --text and --lang they were saved with"
        )
    return Chunks(list(tokens), h.n_ctx, min(h.n_chunk, max_chunks or h.n_chunk))


@dataclass
class DriftMeter:
    """Accumulates the comparison chunk by chunk (`perplexity(on_chunk=meter)`) against a stored reference."""

    stored: StoredReference
    kld: list[np.ndarray] = field(default_factory=list)
    same: int = 0
    nll: float = 0.0
    nll_ref: float = 0.0
    count: int = 0

    def __call__(self, i: int, logits: np.ndarray, targets: np.ndarray) -> None:
        c = compare(logits, targets, self.stored.chunk(i), self.stored.chunk_nll(i))
        self.kld.append(c.kld)
        self.same += int(c.same_top.sum())
        self.nll += float(c.nll.sum())
        self.nll_ref += float(c.nll_ref.sum())
        self.count += len(targets)

    def result(self) -> DriftResult:
        kl = np.concatenate(self.kld)
        return DriftResult(
            kld_mean=float(kl.mean()),
            kld_max=float(kl.max()),
            top1_agreement=self.same / self.count,
            perplexity=float(np.exp(self.nll / self.count)),
            ref_perplexity=float(np.exp(self.nll_ref / self.count)),
            tokens=self.count,
        )
