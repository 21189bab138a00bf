"""Quantization drift: how far MODEL's next-token distributions move from a reference GGUF (usually its F16).

Over the scored positions of the perplexity chunks (perplexity.py; the same positions llama.cpp's
`llama-perplexity --kl-divergence` uses), with p = softmax(ref logits) and q = softmax(model logits):

    KL(p || q) = sum_v p_v (log p_v - log q_v)        kld_mean = mean of KL over positions
    top1_agreement = share of positions where argmax p == argmax q
    ppl_ratio = PPL(model) / PPL(ref)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import EdgemergeError
from ..progress import task
from .perplexity import Chunks, chunk_logits, nll
from .runner import Model, log_softmax

_PROBE = "Kaixo mundua, bon dia!\nHello world"  # any text: same vocabulary, same tokens


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
    """KL(softmax(ref) || softmax(model)) per row, in nats."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def drift(model: Model, ref: Model, chunks: Chunks, progress=None) -> DriftResult:
    """Compare `model` against `ref` on `chunks` (tokenized with `model`); both must share a vocabulary."""
    if model.n_vocab != ref.n_vocab or ref.tokenize(_PROBE) != model.tokenize(_PROBE):
        raise EdgemergeError(
            f"the reference {ref.path.name} has a different vocabulary from {model.path.name}; "
            "give as --ref the GGUF this model was quantized from"
        )
    kls: list[np.ndarray] = []
    agree = 0
    nll_m = nll_r = 0.0
    count = 0
    with task(progress, "drift vs reference", chunks.n_chunks, unit="chunks") as advance:
        for (lm, targets), (lr, _) in zip(chunk_logits(model, chunks), chunk_logits(ref, chunks)):
            kls.append(kl_divergence(lr, lm))
            agree += int((lm.argmax(-1) == lr.argmax(-1)).sum())
            nll_m += float(nll(lm, targets).sum())
            nll_r += float(nll(lr, targets).sum())
            count += len(targets)
            advance(1)
    kl = np.concatenate(kls)
    return DriftResult(
        kld_mean=float(kl.mean()),
        kld_max=float(kl.max()),
        top1_agreement=agree / count,
        perplexity=float(np.exp(nll_m / count)),
        ref_perplexity=float(np.exp(nll_r / count)),
        tokens=count,
    )
