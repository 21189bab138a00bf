"""A Jinja chat template seen as per-role wrappers, and the equivalent Ollama (Go) template.

Ollama wants a Go text/template and no maintained library converts Jinja to Go templates, so we derive the
wrappers by rendering sentinel conversations with the real template (transformers' renderer) and check that
the wrappers reproduce the template on several conversations before trusting them:

    render(messages) = [system_prefix + S + system_user_join | head + user_prefix] + U1 + user_suffix
                       + Σ (assistant_prefix + A + assistant_suffix | user_prefix + U + user_suffix)
                       + generation_prompt (when the last message is from the user)

BOS is left out: llama.cpp and Ollama add it from the GGUF's add_bos_token flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import EdgemergeError

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


def render_template(
    template: str, messages: list[dict], *, add_generation_prompt: bool, bos: str = "", eos: str = ""
) -> str:
    """Render a Jinja chat template the way transformers' apply_chat_template does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos,
        eos_token=eos,
    )
    return rendered[0]


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

    def r(msgs: list[dict], gen: bool) -> str:
        text = render_template(template, msgs, add_generation_prompt=gen, bos=bos, eos=eos)
        return text[len(bos) :] if bos and text.startswith(bos) else text

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
            s = r([msg("system", _S), msg("user", _U1)], False)
            system_prefix, join, tail = _split(s, _S, _U1)
            if tail != user_suffix:
                raise ValueError("a system message changes the first user block's end")
        except ValueError:
            raise
        except Exception:  # noqa: BLE001 (the template rejects system messages: no system role)
            system_prefix = join = None
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
