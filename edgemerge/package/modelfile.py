"""The Ollama Modelfile: chat template, BOS and stop tokens read from the GGUF's metadata (and the instruct
model's generation_config.json), and the `PARAMETER stop` lines read back."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..chat_format import ChatFormat, derive_chat_format
from ..errors import EdgemergeError
from ..gguf.inspect import kv
from ..sampling import Sampling

MODELFILE = "Modelfile"


@dataclass
class ChatInfo:
    """Chat-relevant metadata of a GGUF: template, BOS and every end-of-generation token."""

    template: str | None
    bos: str
    stops: list[str]


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def chat_info(gguf_path: Path, instruct_dir: Path | None = None) -> ChatInfo:
    """Template, BOS and stop tokens: the GGUF's EOS/EOT/EOM ids plus the instruct model's
    generation_config.json `eos_token_id` list (chat models often stop on several tokens)."""

    meta = kv(gguf_path)
    get = meta.get

    tokens = get("tokenizer.ggml.tokens") or []
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        ids += _ids(get(f"tokenizer.ggml.{key}"))
    if instruct_dir is not None and (instruct_dir / "generation_config.json").exists():
        gen = json.loads((instruct_dir / "generation_config.json").read_text(encoding="utf-8"))
        ids += _ids(gen.get("eos_token_id"))
    stops = []
    for i in ids:
        if 0 <= i < len(tokens) and tokens[i] not in stops:
            stops.append(tokens[i])
    bos_id = get("tokenizer.ggml.bos_token_id")
    bos = tokens[bos_id] if bos_id is not None and 0 <= bos_id < len(tokens) else ""
    return ChatInfo(template=get("tokenizer.chat_template"), bos=bos, stops=stops)


def _quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def modelfile(gguf_name: str, info: ChatInfo, system: str | None) -> tuple[str, str | None]:
    """The Ollama Modelfile text, and a warning when the chat template has no Ollama equivalent.

    TEMPLATE renders what the GGUF's chat template renders for any conversation ending with a user turn
    (checked by re-rendering, see chat_format); one `PARAMETER stop` per EOS/EOT token; the sampling and
    context of `edgemerge chat` (llama.cpp's defaults, not Ollama's: see edgemerge.sampling).
    """
    lines = [f"FROM ./{gguf_name}", ""]
    warning = None
    fmt: ChatFormat | None = None
    if info.template:
        try:
            fmt = derive_chat_format(info.template, bos=info.bos, eos=info.stops[0] if info.stops else "")
            go_template = fmt.to_go_template()
        except EdgemergeError as e:
            fmt = None
            warning = f"{e.message}; Ollama will fall back to its own template detection"
    else:
        warning = "the GGUF has no chat template; Ollama will use a plain prompt"
    if fmt is not None:
        lines += [f'TEMPLATE """{go_template}"""', ""]
        if fmt.system_prefix is None and system:
            system = None
            warning = "the chat template has no system role, so the Modelfile has no SYSTEM line"
    if system:
        if '"""' in system:
            raise EdgemergeError('the system prompt cannot contain """ (Ollama Modelfile quoting)')
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f"PARAMETER stop {_quote(s)}" for s in info.stops]
    lines += [f"PARAMETER {key} {value}" for key, value in Sampling().modelfile_parameters()]
    return "\n".join(lines) + "\n", warning


def parse_modelfile_stops(text: str) -> list[str]:
    """The `PARAMETER stop` values of a Modelfile (quoted JSON-style strings)."""
    return [json.loads(m) for m in re.findall(r"^PARAMETER stop (.+)$", text, flags=re.MULTILINE)]
