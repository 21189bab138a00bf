"""A Jinja chat template seen as per-role wrappers, and the equivalent Ollama (Go) template.

Ollama wants a Go text/template and no maintained library converts Jinja to Go templates, so we derive the
wrappers by rendering sentinel conversations with the real template (transformers' renderer) and check that
the wrappers reproduce the template on several conversations before trusting them:

    render(messages) = [system_prefix + S + system_user_join | head + user_prefix] + U1 + user_suffix
                       + Σ (assistant_prefix + A + assistant_suffix | user_prefix + U + user_suffix)
                       + generation_prompt (when the last message is from the user)

BOS is left out: llama.cpp and Ollama add it from the GGUF's add_bos_token flag.

A chat template is untrusted input. Every render (here, in evaluation, chat and the check) goes through
`TemplateRenderer`: the sandboxed Jinja environment transformers and llama-cpp-python use
(`ImmutableSandboxedEnvironment`, same options and helpers, so the text is theirs), run in a child process with
a time bound, an output-size bound and a memory cap, so a template that loops, grows without end or trips the
sandbox is one error line instead of a hang.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .child import child_command
from .errors import EdgemergeError


def _seconds(value: str | None, default: float = 10.0) -> float:
    """The time bound of one render (and of the worker's start): EDGEMERGE_TEMPLATE_SECONDS, for slow machines."""
    try:
        seconds = float(value) if value else default
    except ValueError:
        return default
    return seconds if 0 < seconds < 3600 else default


RENDER_SECONDS = _seconds(os.environ.get("EDGEMERGE_TEMPLATE_SECONDS"))
RENDER_CHARS = 1_000_000  # a chat prompt is far shorter: more is a runaway template
# real chat templates are under 100 KB; compiling costs time and memory in proportion (README, performance)
MAX_TEMPLATE_CHARS = 1_000_000
WORKER_MEMORY = 1 << 30  # address space of the rendering process
WORKER_CPU_SECONDS = 600  # backstop should the parent vanish while a render spins

_S, _U1, _A1, _U2, _A2, _U3 = (f"EDGEMERGESENTINEL{i}" for i in range(6))


@dataclass(frozen=True)
class ChatFormat:
    head: str  # before the first user message when there is no system message
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    system_prefix: str | None  # None: the template has no system role
    system_user_join: str | None  # between the system text and the first user text

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt these wrappers produce (what the Go template renders)."""
        out = []
        prev = ""
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role == "system":
                if i != 0 or self.system_prefix is None:
                    raise EdgemergeError("this chat format takes a system message only first")
                out.append(self.system_prefix + content)
            elif role == "user":
                if prev == "system":
                    out.append(self.system_user_join)
                elif i == 0:
                    out.append(self.head + self.user_prefix)
                else:
                    out.append(self.user_prefix)
                out.append(content + self.user_suffix)
            elif role == "assistant":
                out.append(self.assistant_prefix + content + self.assistant_suffix)
            prev = role
        if add_generation_prompt and messages and messages[-1]["role"] == "user":
            out.append(self.generation_prompt)
        return "".join(out)

    def to_go_template(self) -> str:
        """An Ollama TEMPLATE rendering exactly what `render` does (no whitespace trimming anywhere)."""
        for part in self._parts():
            if "{{" in part or '"""' in part:
                raise EdgemergeError(
                    "the chat template contains '{{' or '\"\"\"', which an Ollama TEMPLATE cannot hold"
                )
        last = "(eq (len (slice $.Messages $i)) 1)"
        if self.system_prefix is not None:
            system = f'{{{{ if eq .Role "system" }}}}{self.system_prefix}{{{{ .Content }}}}{{{{ else }}}}'
            user_open = (
                f'{{{{ if eq $prev "system" }}}}{self.system_user_join}'
                f"{{{{ else if eq $i 0 }}}}{self.head}{self.user_prefix}"
                f"{{{{ else }}}}{self.user_prefix}{{{{ end }}}}"
            )
            track = "{{ $prev = .Role }}"
        else:  # no system role: system messages are dropped, the first other message opens the prompt
            system = ""
            user_open = f'{{{{ if eq $prev "" }}}}{self.head}{self.user_prefix}{{{{ else }}}}{self.user_prefix}{{{{ end }}}}'
            track = '{{ if ne .Role "system" }}{{ $prev = .Role }}{{ end }}'
        return (
            '{{ $prev := "" }}{{ range $i, $_ := .Messages }}'
            + system
            + f'{{{{ if eq .Role "user" }}}}{user_open}{{{{ .Content }}}}{self.user_suffix}'
            + f"{{{{ if {last} }}}}{self.generation_prompt}{{{{ end }}}}"
            + f'{{{{ else if eq .Role "assistant" }}}}{self.assistant_prefix}{{{{ .Content }}}}{self.assistant_suffix}'
            + "{{ end }}"
            + ("{{ end }}" if system else "")
            + track
            + "{{ end }}"
        )

    def _parts(self) -> list[str]:
        return [
            p
            for p in (
                self.head,
                self.user_prefix,
                self.user_suffix,
                self.assistant_prefix,
                self.assistant_suffix,
                self.generation_prompt,
                self.system_prefix,
                self.system_user_join,
            )
            if p
        ]


class ChatTemplateError(EdgemergeError):
    """The template cannot be used at all: a syntax error, a sandbox violation, or a render that runs too long,
    grows too large or exhausts its memory."""


class ChatTemplateRaised(ChatTemplateError):
    """The template rendered but raised for this conversation (e.g. `raise_exception("no system role")`)."""


class TemplateRenderer:
    """One chat template compiled in a worker process; `render` returns the text or raises a ChatTemplateError
    naming `label`. Use as a context manager (or call `close`): the worker lives until then."""

    def __init__(
        self,
        template: str,
        *,
        label: str = "the chat template",
        seconds: float | None = None,
        max_chars: int = RENDER_CHARS,
    ):
        self.label = label
        self.seconds = RENDER_SECONDS if seconds is None else seconds
        self.max_chars = max_chars
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._broken: ChatTemplateError | None = None
        if not isinstance(template, str):
            raise ChatTemplateError(f"{label}: the chat template is not a string")
        if len(template) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(
                f"{label}: the chat template is {len(template):,} characters long, more than "
                f"{MAX_TEMPLATE_CHARS:,}; restore the model's own chat template"
            )
        self._proc = subprocess.Popen(
            child_command("edgemerge.chat_format", "_worker"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            encoding="utf-8",
        )
        threading.Thread(target=self._read, daemon=True).start()
        self._ask({"template": template, "max_chars": max_chars})

    def _read(self) -> None:
        for line in self._proc.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def _fail(self, error: ChatTemplateError) -> ChatTemplateError:
        self._broken = error
        self.close()
        return error

    def _ask(self, request: dict[str, Any]) -> str:
        if self._broken is not None:
            raise self._broken
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            line = self._replies.get(timeout=self.seconds)
        except (BrokenPipeError, OSError):
            line = None
        except queue.Empty:
            raise self._fail(
                ChatTemplateError(
                    f"{self.label}: rendering took longer than {self.seconds:g} s (a runaway loop?)"
                )
            ) from None
        if line is None:
            raise self._fail(
                ChatTemplateError(
                    f"{self.label}: rendering ran out of memory or crashed (a runaway template?)"
                )
            )
        reply = json.loads(line)
        if "text" in reply:
            return reply["text"]
        message = f"{self.label}: {reply['error']}"
        if reply["kind"] == "raised":
            raise ChatTemplateRaised(message)
        raise self._fail(ChatTemplateError(message))

    def render(self, messages: list[dict], *, add_generation_prompt: bool, **context: Any) -> str:
        """The template's text for `messages`; `context`: the other variables (bos_token, eos_token, ...)."""
        return self._ask(
            {"messages": messages, "add_generation_prompt": add_generation_prompt, "context": context}
        )

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def __enter__(self) -> TemplateRenderer:  # noqa: PYI034 (no typing_extensions dependency for Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:200]}"


def _environment():
    """The Jinja environment of transformers' and llama-cpp-python's chat templates (same options, filters and
    globals; `{% generation %}` blocks render their body, as both do outside assistant-mask tracking).

    Written out rather than taken from transformers' `_compile_jinja_template`: importing transformers would
    cost every renderer's worker seconds of start-up (jinja2 alone: ~0.25 s), and its environment lets an
    unsafe attribute through as an Undefined (`unsafe_undefined` below refuses it)."""

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}  # noqa: RUF012 (jinja2's Extension API)

        def parse(self, parser):
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj, attribute):
            # jinja2 hands out an Undefined that fails only when used; reaching for an unsafe attribute at all
            # (`''.__class__`, `list.append`) is what no chat template does: refuse it where it happens
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
    return env


def _limit_worker() -> None:
    """Caps of the rendering process: memory, CPU time (a backstop), no Ctrl-C (the parent handles it)."""

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import resource
    except ImportError:  # Windows: the parent's time bound still applies
        return
    for which, value in ((resource.RLIMIT_AS, WORKER_MEMORY), (resource.RLIMIT_CPU, WORKER_CPU_SECONDS)):
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass


def _render_one(template, request: dict, max_chars: int) -> dict:

    parts, size = [], 0
    try:
        for chunk in template.generate(
            messages=request["messages"],
            add_generation_prompt=request["add_generation_prompt"],
            **request["context"],
        ):
            size += len(chunk)
            if size > max_chars:
                return {"kind": "broken", "error": f"the rendered prompt exceeds {max_chars} characters"}
            parts.append(chunk)
    except SecurityError as e:
        return {"kind": "broken", "error": f"the template breaks the sandbox ({_short(e)})"}
    except MemoryError:
        return {"kind": "broken", "error": "rendering ran out of memory (a runaway template?)"}
    except RecursionError:
        return {"kind": "broken", "error": "rendering recursed too deep"}
    except (jinja2.TemplateError, ValueError, TypeError, LookupError, AttributeError, ArithmeticError) as e:
        return {"kind": "raised", "error": f"the template failed ({_short(e)})"}
    return {"text": "".join(parts)}


def _worker() -> None:
    """The rendering process: the first line gives the template, every next line a conversation to render."""

    _limit_worker()
    first = json.loads(sys.stdin.readline())
    max_chars = first["max_chars"]
    try:
        template = _environment().from_string(first["template"])
        reply: dict = {"text": ""}
    except jinja2.TemplateSyntaxError as e:
        template, reply = (
            None,
            {"kind": "broken", "error": f"template syntax error on line {e.lineno} ({_short(e)})"},
        )
    except (jinja2.TemplateError, MemoryError, RecursionError, ValueError) as e:
        template, reply = None, {"kind": "broken", "error": f"the template does not compile ({_short(e)})"}
    print(json.dumps(reply), flush=True)
    if template is None:
        return
    for line in sys.stdin:
        print(json.dumps(_render_one(template, json.loads(line), max_chars)), flush=True)


def render_template(
    template: str | TemplateRenderer,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    bos: str = "",
    eos: str = "",
) -> str:
    """Render a Jinja chat template the way transformers' apply_chat_template does (its variables), bounded."""
    context = {"bos_token": bos, "eos_token": eos, "tools": None, "documents": None}
    if isinstance(template, TemplateRenderer):
        return template.render(messages, add_generation_prompt=add_generation_prompt, **context)
    with TemplateRenderer(template) as renderer:
        return renderer.render(messages, add_generation_prompt=add_generation_prompt, **context)


def _split(text: str, *marks: str) -> list[str]:
    parts = []
    for m in marks:
        if text.count(m) != 1:
            raise ValueError(f"sentinel {m} appears {text.count(m)} times")
        before, text = text.split(m)
        parts.append(before)
    parts.append(text)
    return parts


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n :]


def derive_chat_format(template: str, *, bos: str = "", eos: str = "") -> ChatFormat:
    """Per-role wrappers of a Jinja chat template, verified by re-rendering; EdgemergeError if it has none."""
    with TemplateRenderer(template) as renderer:
        return _derive(renderer, bos, eos)


def _derive(renderer: TemplateRenderer, bos: str, eos: str) -> ChatFormat:
    def raw(msgs: list[dict], gen: bool) -> str:  # ChatTemplateRaised when the template rejects `msgs`
        text = render_template(renderer, msgs, add_generation_prompt=gen, bos=bos, eos=eos)
        return text[len(bos) :] if bos and text.startswith(bos) else text

    def r(msgs: list[dict], gen: bool) -> str:
        try:
            return raw(msgs, gen)
        except ChatTemplateRaised as e:
            raise ValueError(e.message.split(": ", 1)[-1]) from None

    def msg(role: str, content: str) -> dict:
        return {"role": role, "content": content}

    try:
        u = r([msg("user", _U1)], False)
        ug = r([msg("user", _U1)], True)
        pre_u, user_suffix = _split(u, _U1)
        # Only conversations ending with a user turn matter for inference (some templates, Qwen3's, render
        # the assistant turn after the last user message differently, which the prompt never contains).
        _, x2, x3, tail = _split(
            r([msg("user", _U1), msg("assistant", _A1), msg("user", _U2)], False), _U1, _A1, _U2
        )
        *_, assistant_suffix = _split(r([msg("user", _U1), msg("assistant", _A1)], False), _U1, _A1)
        if not ug.startswith(u) or tail != user_suffix or not x2.startswith(user_suffix):
            raise ValueError("the template is not a concatenation of per-message blocks")
        assistant_prefix = x2[len(user_suffix) :]
        if not x3.startswith(assistant_suffix):
            assistant_suffix = x3[: len(x3) - len(_common_suffix(x3, pre_u))]
        user_prefix = x3[len(assistant_suffix) :]
        if not pre_u.endswith(user_prefix):
            raise ValueError("the first user message is wrapped differently from the others")
        head = pre_u[: len(pre_u) - len(user_prefix)]
        system_prefix = join = None
        try:
            s = raw([msg("system", _S), msg("user", _U1)], False)
        except ChatTemplateRaised:  # the template rejects system messages: no system role
            s = None
        if s is not None:
            system_prefix, join, tail = _split(s, _S, _U1)
            if tail != user_suffix:
                raise ValueError("a system message changes the first user block's end")
        fmt = ChatFormat(
            head=head,
            user_prefix=user_prefix,
            user_suffix=user_suffix,
            assistant_prefix=assistant_prefix,
            assistant_suffix=assistant_suffix,
            generation_prompt=ug[len(u) :],
            system_prefix=system_prefix,
            system_user_join=join,
        )
    except ValueError as e:
        raise EdgemergeError(f"cannot express this chat template as an Ollama template: {e}") from None
    _verify(fmt, r)
    return fmt


def _verify(fmt: ChatFormat, r) -> None:
    """Conversations ending with a user turn, as prompts always do, must render identically."""
    convs = [
        [{"role": "user", "content": "Kaixo!"}],
        [
            {"role": "user", "content": "a b"},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"},
        ],
    ]
    if fmt.system_prefix is not None:
        convs.append(
            [
                {"role": "system", "content": "Lagun zara."},
                {"role": "user", "content": "Zer moduz?"},
                {"role": "assistant", "content": "Ondo."},
                {"role": "user", "content": "Eta zu?"},
            ]
        )
        convs.append([{"role": "system", "content": "Lagun zara."}, {"role": "user", "content": "Kaixo"}])
    for conv in convs:
        for gen in (True, False):
            if r(conv, gen) != fmt.render(conv, gen):
                raise EdgemergeError(
                    "cannot express this chat template as an Ollama template: re-rendering differs"
                )
