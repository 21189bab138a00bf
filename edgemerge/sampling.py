"""How `edgemerge chat` picks each next token, and the Ollama Modelfile says the same: llama.cpp's defaults.

llama-cli samples with top-k 40, top-p 0.95, min-p 0.05 and temperature 0.8 (common/common.h), in that order,
then draws with a seeded generator; Ollama's own defaults differ (top-p 0.9, min-p 0, repeat penalty 1.1), so the
Modelfile writes these values out and the three runtimes sample alike. Temperature 0 is greedy (argmax), as in
llama-cli, and is what the evaluation always uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import EdgemergeError

CHAT_CTX = 4096  # tokens of context for a chat (`chat --ctx`, the Modelfile's num_ctx)


@dataclass(frozen=True)
class Sampling:
    """llama.cpp's sampler settings: top-k, then top-p, then min-p, then temperature, then a seeded draw."""

    temperature: float = 0.8
    top_k: int = 40  # 0: all tokens
    top_p: float = 0.95  # 1.0: off
    min_p: float = 0.05  # 0.0: off
    seed: int | None = None  # None: a new seed each run (llama-cli's -1)

    def __post_init__(self) -> None:
        checks = [
            ("--temp", self.temperature, 0.0, 100.0),
            ("--top-k", self.top_k, 0, 1 << 31),
            ("--top-p", self.top_p, 0.0, 1.0),
            ("--min-p", self.min_p, 0.0, 1.0),
        ]
        for flag, value, low, high in checks:
            if not low <= value <= high:  # NaN fails too
                raise EdgemergeError(f"{flag} must be between {low:g} and {high:g}, got {value!r}")
        if self.seed is not None and not 0 <= self.seed < 0xFFFFFFFF:
            raise EdgemergeError(
                f"--seed must be between 0 and {0xFFFFFFFF - 1} (or -1 for a new one each run)"
            )

    @property
    def greedy(self) -> bool:
        """Temperature 0: the most likely token every time, as the evaluation decodes."""
        return self.temperature == 0

    def modelfile_parameters(self) -> list[tuple[str, str]]:
        """The Ollama `PARAMETER` lines that make Ollama sample as this does (repeat_penalty 1: llama.cpp has
        none by default, Ollama's is 1.1)."""
        params = [
            ("temperature", f"{self.temperature:g}"),
            ("top_k", str(self.top_k)),
            ("top_p", f"{self.top_p:g}"),
            ("min_p", f"{self.min_p:g}"),
            ("repeat_penalty", "1"),
            ("num_ctx", str(CHAT_CTX)),
        ]
        if self.seed is not None:
            params.append(("seed", str(self.seed)))
        return params
