"""`edgemerge chat`: an interactive local chat through llama.cpp with the GGUF's own chat template."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import EdgemergeError
from ..evaluate.prompts import language_info
from ..gguf.inspect import kv as gguf_kv
from ..limits import MAX_THREADS, check_count
from ..runtime import Generation, Model, check_gguf
from ..sampling import CHAT_CTX, Sampling
from .common import MODEL_OPTION, app, err_console, examples, the_model

MIN_CHAT_CTX = 64
DEFAULTS = Sampling()
HELP_LINE = "/clear starts a new conversation, /bye (or Ctrl-D) quits, /? lists the commands."
# Ollama's in-chat commands, with edgemerge's earlier names kept as aliases
COMMANDS = {
    "/bye": "bye",
    "/exit": "bye",
    "/clear": "clear",
    "/reset": "clear",
    "/?": "help",
    "/help": "help",
}
HELP_TEXT = (
    "/clear (or /reset)  forget the conversation and start a new one\n"
    "/bye (or /exit)     quit (Ctrl-D too)\n"
    "/? (or /help)       this list\n"
    "Any other line is sent to the model; start it with a space to send a line that begins with '/'."
)


@app.command(
    epilog=examples(
        "edgemerge chat dist/qwen3-8b-eu/qwen3-8b-eu-Q4_K_M.gguf",
        "edgemerge chat -m model.gguf -l eu -c 8192 -t 4",
        'edgemerge chat model.gguf --system "Erantzun beti euskaraz eta laburki."',
    )
)
def chat(
    model_arg: Annotated[
        Path | None,
        typer.Argument(
            help="The GGUF file to chat with (it must carry a chat template).",
            metavar="MODEL",
            show_default=False,
        ),
    ] = None,
    lang: Annotated[
        str | None,
        typer.Option(
            "--lang",
            "-l",
            help="Use this language's default system prompt (eu, ca, gl, es, en; default: the GGUF's language "
            "when it names one).",
        ),
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="A system prompt of your own.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Token limit per answer.")] = 512,
    ctx: Annotated[
        int, typer.Option("--ctx", "-c", help="Context size in tokens (older turns are dropped to fit).")
    ] = CHAT_CTX,
    temp: Annotated[
        float,
        typer.Option("--temp", help="Temperature; 0 is greedy (the most likely token, as eval decodes)."),
    ] = DEFAULTS.temperature,
    top_k: Annotated[
        int, typer.Option("--top-k", help="Keep the k most likely tokens (0: all).")
    ] = DEFAULTS.top_k,
    top_p: Annotated[
        float, typer.Option("--top-p", help="Keep the most likely tokens up to this probability (1: off).")
    ] = DEFAULTS.top_p,
    min_p: Annotated[
        float,
        typer.Option("--min-p", help="Drop tokens below this share of the top one's probability (0: off)."),
    ] = DEFAULTS.min_p,
    seed: Annotated[
        int, typer.Option("--seed", "-s", help="Random seed for sampling (-1: a new one each run).")
    ] = -1,
    threads: Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads for llama.cpp.")] = None,
    model_opt: Annotated[Path | None, MODEL_OPTION] = None,
) -> None:
    """Chat with a GGUF in the terminal through llama.cpp, tokens streamed as they come.

    Sampling as llama-cli's defaults (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05), which the Modelfile of
    a build also gives Ollama; --temp 0 is greedy.

    Type a message and press Enter. /clear starts a new conversation, /bye or Ctrl-D quits, /? lists the
    commands (Ollama's). Without --lang or --system, the system prompt is that of the GGUF's language
    (general.languages, as edgemerge writes it) when edgemerge has one for it.
    """
    model = the_model(model_arg, model_opt, "chat")

    check_count(
        "--ctx", ctx, MIN_CHAT_CTX, 1 << 24, ": a chat turn needs room for the template and an answer"
    )
    check_count("--max-tokens", max_tokens, 1, ctx - 1, " (the answer must fit the context with a prompt)")
    check_count("--threads", threads, 1, MAX_THREADS)
    sampling = Sampling(temp, top_k, top_p, min_p, None if seed == -1 else seed)
    check_gguf(model)
    m = Model(model, n_ctx=ctx, n_threads=threads)
    try:
        lang = lang or gguf_language(gguf_kv(model))
        if system is None and lang is not None:
            system = language_info(lang)["system"]
        if m.chat_template is None:
            raise EdgemergeError(
                f"{model.name} has no chat template (a base model?); chat needs an instruct model's GGUF"
            )
        m.check_chat_template()  # a template that cannot render fails before the prompt, in one line
        name = m.metadata.get("general.name") or model.name
        err_console.print(
            f"[bold]{name}[/bold] · context {m.n_ctx} tokens · {_describe(sampling)} · {HELP_LINE}",
            highlight=False,
        )
        _loop(m, system, max_tokens, sampling)
    finally:
        m.close()


def gguf_language(metadata: dict) -> str | None:
    """The one language a GGUF's metadata names in general.languages, if edgemerge has a system prompt for it."""
    langs = metadata.get("general.languages")
    if isinstance(langs, str):
        langs = [langs]
    if not isinstance(langs, list) or len(langs) != 1 or not isinstance(langs[0], str):
        return None
    try:
        language_info(langs[0])
    except EdgemergeError:
        return None
    return langs[0]


def _describe(s: Sampling) -> str:
    if s.greedy:
        return "greedy"
    seed = "" if s.seed is None else f", seed {s.seed}"
    return f"temp {s.temperature:g}, top-k {s.top_k}, top-p {s.top_p:g}, min-p {s.min_p:g}{seed}"


def _loop(m, system: str | None, max_tokens: int, sampling: Sampling) -> None:

    base = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            sys.stdout.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if line.startswith("/"):
            word = text.split()[0]
            command = COMMANDS.get(word.lower())
            if command == "bye":
                return
            if command == "clear":
                history = []
                err_console.print("[dim](new conversation)[/dim]")
            elif command == "help":
                err_console.print(HELP_TEXT, highlight=False, markup=False)
            else:
                err_console.print(f"unknown command {word}; /? lists the commands", markup=False)
            continue
        history.append({"role": "user", "content": text})
        tokens = m.chat_tokens(base + history)
        while len(tokens) + max_tokens > m.n_ctx and len(history) > 1:
            history = history[2:]  # drop the oldest exchange to fit the context
            tokens = m.chat_tokens(base + history)
        if len(tokens) >= m.n_ctx:
            history.pop()
            err_console.print("[red]that message does not fit the context; try a shorter one or --ctx[/red]")
            continue
        result = None
        for piece in m.stream(tokens, max_tokens, sampling):
            if isinstance(piece, Generation):
                result = piece
            else:
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        if result is not None and not result.stopped:
            err_console.print(f"[dim](stopped at the {max_tokens}-token limit)[/dim]")
        history.append({"role": "assistant", "content": result.text if result else ""})
