"""Recipes: a typed description of what to merge, how, which quants to ship and which gates to pass.

A recipe is a YAML file validated by `Recipe`; errors name the bad field. The method is a name of the
registry in `merge.methods`, and `options` are checked against that method's own options model. Relative local
paths in it resolve against the recipe file's folder. Bundled recipes live in `edgemerge/recipes/` (installed
with the package; `edgemerge recipes copy NAME FILE` starts your own from one).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import EdgemergeError
from .limits import (
    MAX_RECIPE_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    field_error,
    finite_number,
    read_limited,
    shown,
)
from .merge.methods import DEFAULT_METHOD, get_method

DType = Literal["bfloat16", "float16", "float32"]

BUNDLED_DIR = Path(__file__).resolve().parent / "recipes"
# the paper's other methods at its settings: found by name, listed apart, never chosen by --lang
EXAMPLES_DIR = BUNDLED_DIR / "examples"

MAX_NAME = 128  # the name becomes file names (<name>-Q4_K_M.gguf): well under 255 bytes
MAX_REF = 4096  # a model reference is a hub id or a local path (PATH_MAX)
MAX_LANGUAGES = 64
MAX_QUANTS = 32
MAX_TEXT = 10_000  # description (it goes into the model card)
IMATRIX_CHOICES = ("auto", "none")  # else the recipe's imatrix is a file
AFTER_MERGE = (
    "quants",
    "imatrix",
    "eval",
    "sweep",
    "quant_auto",
)  # recipe fields of the stages after the merge
MAX_SWEEP = 32  # candidates per method: each is a merge, a quantization and an evaluation
BENCH_FIELDS = (
    "tasks",
    "fewshot",
    "limit",
    "data",
    "chat_template",
)  # the eval: section's benchmark settings
HIGH_WEIGHT = 2.0  # above it task arithmetic collapses in the paper and in the miniature: said, not refused


def _model_ref(what: str, v: str) -> str:
    """A hub id or local path: bounded, and without control characters (a NUL makes every path call fail)."""
    if len(v) > MAX_REF:
        raise ValueError(f"{what} is {len(v)} characters long; a hub id or path has at most {MAX_REF}")
    if not v.strip() or not v.isprintable():
        raise ValueError(f"{what} must be a hub id or a folder path, got {shown(v)}")
    return v


class Language(BaseModel):
    """One language model and its weight w_i in the merge."""

    model_config = ConfigDict(extra="forbid")
    code: str = Field(description="ISO 639-1 code of the language, e.g. eu")
    model: str | None = Field(description="HF repo id (owner/name[@revision]) or local folder")
    weight: float = 1.0

    @field_validator("code")
    @classmethod
    def _code(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z]{2,3}", v):
            raise ValueError(f"language code must be 2-3 lowercase letters (ISO 639), got {shown(v)}")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        return None if v is None else _model_ref("model", v)

    @field_validator("weight", mode="before")
    @classmethod
    def _weight(cls, v: Any) -> float:
        return finite_number("weight", v)


class Gates(BaseModel):
    """Evaluation thresholds: a failed gate makes `eval`/`build` exit with code 3. None disables a gate."""

    model_config = ConfigDict(extra="forbid")
    min_language_fidelity: float | None = None
    min_stop_rate: float | None = None
    min_instruction_following: float | None = None
    max_perplexity: float | None = None
    max_kld_mean: float | None = None
    min_top1_agreement: float | None = None
    max_ppl_ratio: float | None = None
    # benchmarks run on every shipped file (evaluate/bench.py): lm-eval task names, shots, questions per task,
    # and the folder of their data (relative to the recipe's folder)
    tasks: list[str] = Field(default_factory=list, max_length=64)
    fewshot: int | None = Field(default=None, ge=0, le=1 << 16)
    limit: int | None = Field(default=None, ge=1)
    data: str | None = Field(default=None, max_length=MAX_REF)
    chat_template: bool = False  # ask through the model's chat template (lm-eval's --apply_chat_template)

    def thresholds(self) -> dict[str, float]:
        """The gates that are set (not the benchmark settings)."""
        return {k: v for k, v in self.model_dump(exclude_none=True).items() if k not in BENCH_FIELDS}

    @field_validator(
        "min_language_fidelity",
        "min_stop_rate",
        "min_instruction_following",
        "max_perplexity",
        "max_kld_mean",
        "min_top1_agreement",
        "max_ppl_ratio",
        mode="before",
    )
    @classmethod
    def _threshold(cls, v: Any, info) -> float | None:
        if v is None:
            return None
        x = finite_number(info.field_name, v)
        if info.field_name.startswith("min_") and not 0 <= x <= 1:
            raise ValueError(f"{info.field_name} is a fraction: it must be between 0 and 1, got {shown(v)}")
        if x < 0:
            raise ValueError(f"{info.field_name} must not be negative, got {shown(v)}")
        return x


class SweepRule(BaseModel):
    """The grid `edgemerge sweep` and `build --weight auto` measure, and the rule that chooses in it (sweep/rule.py):
    among the candidates whose English retention, end-of-turn ratio and (when measured) chat metrics reach the
    thresholds, the lowest teacher-forced answer perplexity in the target language. None disables a threshold."""

    model_config = ConfigDict(extra="forbid")
    weights: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.25])
    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic", "linear"])
    min_english_retention: float | None = 0.5
    min_eot_ratio: float | None = 0.5
    min_stop_rate: float | None = None
    min_language_fidelity: float | None = None
    min_instruction_following: float | None = None

    @field_validator("weights", mode="before")
    @classmethod
    def _weights(cls, v: Any) -> list[float]:
        return check_weights(v)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one method, e.g. [task_arithmetic, linear]")
        if len(v) > MAX_SWEEP:
            raise ValueError(f"at most {MAX_SWEEP} methods, got {len(v)}")
        for m in v:
            try:
                method = get_method(m)
            except EdgemergeError as e:
                raise ValueError(e.message) from None
            if method.two_models:
                raise ValueError(
                    f"{m} has no language weight to sweep (options.t sets its mix); leave it out"
                )
        return list(dict.fromkeys(v))

    @field_validator(
        "min_english_retention",
        "min_eot_ratio",
        "min_stop_rate",
        "min_language_fidelity",
        "min_instruction_following",
        mode="before",
    )
    @classmethod
    def _threshold(cls, v: Any, info) -> float | None:
        if v is None:
            return None
        x = finite_number(info.field_name, v)
        if not 0 <= x <= 1:
            raise ValueError(f"{info.field_name} is a fraction: it must be between 0 and 1, got {shown(v)}")
        return x


def check_quant_names(v: list[str]) -> list[str]:
    """At most MAX_QUANTS names shaped like llama.cpp's (which exist is checked when llama.cpp is loaded)."""
    if len(v) > MAX_QUANTS:
        raise ValueError(f"at most {MAX_QUANTS} quantization types, got {len(v)}")
    for q in v:
        if not re.fullmatch(r"[A-Za-z0-9_]{1,32}", q):
            raise ValueError(f"a quantization type is a llama.cpp name such as Q4_K_M, got {shown(q)}")
    return v


# llama.cpp's usual file types, the sizes of an 8B model falling from 8.5 to 3.0 bits per weight; none needs an
# importance matrix (IQ4_XS and the K types use one when the build has it)
DEFAULT_LADDER = [
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q4_K_M",
    "Q4_K_S",
    "IQ4_XS",
    "Q3_K_L",
    "Q3_K_M",
    "Q3_K_S",
    "Q2_K",
]


class QuantAuto(BaseModel):
    """The ladder `build --quant auto` measures and its drift gate (build/ladder.py): the smallest type of the
    ladder that fits the budget (--max-size, --max-ram) and whose next-token distributions on held-out text of
    the target language stay within the gate against the unquantized file: mean KL divergence at most
    `max_kld_mean` and top-1 agreement at least `min_top1_agreement`. None disables one of the two.

    The defaults are a starting point, not a measured optimum: about where llama.cpp's published KL-divergence
    measurements of 8B models on English text place the step from 4-bit to 3-bit K types. A language the
    instruct model knows less tends to drift more, which is what the gate measures.
    """

    model_config = ConfigDict(extra="forbid")
    ladder: list[str] = Field(default_factory=lambda: list(DEFAULT_LADDER))
    max_kld_mean: float | None = 0.05
    min_top1_agreement: float | None = 0.9

    @field_validator("ladder")
    @classmethod
    def _ladder(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one llama.cpp type, e.g. [Q8_0, Q6_K, Q4_K_M, Q3_K_M]")
        return list(dict.fromkeys(check_quant_names(v)))

    @field_validator("max_kld_mean", "min_top1_agreement", mode="before")
    @classmethod
    def _gate(cls, v: Any, info) -> float | None:
        if v is None:
            return None
        x = finite_number(info.field_name, v)
        if info.field_name == "min_top1_agreement" and not 0 <= x <= 1:
            raise ValueError(f"min_top1_agreement is a fraction: it must be between 0 and 1, got {shown(v)}")
        if x <= 0 and info.field_name == "max_kld_mean":
            raise ValueError(f"max_kld_mean must be above 0 (0 would refuse every quant), got {shown(v)}")
        return x

    @model_validator(mode="after")
    def _some_gate(self) -> QuantAuto:
        if self.max_kld_mean is None and self.min_top1_agreement is None:
            raise ValueError(
                "give max_kld_mean or min_top1_agreement (or both): without a drift gate the smallest type "
                "would always win"
            )
        return self


def check_weights(v: Any) -> list[float]:
    """A sweep's language weights: a non-empty list of finite numbers >= 0, at most MAX_SWEEP, de-duplicated in
    order (a weight above HIGH_WEIGHT is allowed: the sweep says it is unusual)."""
    if not isinstance(v, list) or not v:
        raise ValueError(
            f"weights is a non-empty list of numbers, e.g. [0.25, 0.5, 0.75, 1.0], got {shown(v)}"
        )
    if len(v) > MAX_SWEEP:
        raise ValueError(f"at most {MAX_SWEEP} weights, got {len(v)}")
    out: list[float] = []
    for x in v:
        w = finite_number("weight", x)
        if w < 0:
            raise ValueError(
                f"a sweep weight must not be negative (it would subtract the language), got {shown(x)}"
            )
        if w not in out:
            out.append(w)
    return out


class Recipe(BaseModel):
    """W = W_instruct + sum_i w_i (W_lang_i - W_base), or another method over the same task vectors."""

    model_config = ConfigDict(extra="forbid")
    name: str
    instruct: str
    base: str
    languages: list[Language] = Field(min_length=1)
    method: str = DEFAULT_METHOD  # a name of merge.methods' registry
    # as written (so the recipe dumps as it was read); checked against the method's options model
    options: dict[str, Any] = Field(default_factory=dict)
    dtype: DType = "bfloat16"
    quants: list[str] = Field(default_factory=lambda: ["Q4_K_M", "Q8_0"])
    # importance matrix for the quants that use one: computed in the build on the recipe's languages (auto), none,
    # or a file (GGUF or legacy .dat; a relative path resolves against the recipe's folder)
    imatrix: str = "auto"
    license: str | None = None
    description: str | None = None
    eval: Gates = Field(default_factory=Gates)
    sweep: SweepRule = Field(default_factory=SweepRule)
    quant_auto: QuantAuto = Field(default_factory=QuantAuto)
    # Folder the recipe was read from: relative local paths resolve against it (not part of the YAML).
    root: Path | None = Field(default=None, exclude=True)
    # The file it was read from (also a bundled one): an input of the command, never one of its outputs.
    file: Path | None = Field(default=None, exclude=True)

    @field_validator("languages")
    @classmethod
    def _unique_codes(cls, v: list[Language]) -> list[Language]:
        # a code names its input in the build's cache key and manifest: two with one code would collide
        seen: dict[str, int] = {}
        for i, lang in enumerate(v):
            if lang.code in seen:
                raise ValueError(
                    f"language code {lang.code!r} appears twice (languages.{seen[lang.code]} and languages.{i}); "
                    "give each language once (merge two models of one language before, or weight one of them)"
                )
            seen[lang.code] = i
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > MAX_NAME:
            raise ValueError(f"name is used in file names: at most {MAX_NAME} characters, got {len(v)}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(
                f"name is used in file names: letters, digits, '.', '_' and '-' only, got {shown(v)}"
            )
        return v

    @field_validator("instruct", "base")
    @classmethod
    def _ref(cls, v: str, info) -> str:
        return _model_ref(info.field_name, v)

    @field_validator("languages")
    @classmethod
    def _languages(cls, v: list[Language]) -> list[Language]:
        if len(v) > MAX_LANGUAGES:
            raise ValueError(f"at most {MAX_LANGUAGES} languages, got {len(v)}")
        return v

    @field_validator("quants")
    @classmethod
    def _quants(cls, v: list[str]) -> list[str]:
        return check_quant_names(v)

    @field_validator("imatrix")
    @classmethod
    def _imatrix(cls, v: str) -> str:
        if v in IMATRIX_CHOICES:
            return v
        if len(v) > MAX_REF or not v.strip() or not v.isprintable():
            raise ValueError(
                f"imatrix is auto, none or the path of an importance matrix file, got {shown(v)}"
            )
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        try:
            get_method(v)
        except EdgemergeError as e:
            raise ValueError(e.message) from None
        return v

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "method" in info.data:  # else the method is what is wrong, and reported
            # its ValidationError is reported at options.<name> (pydantic nests a validator's ValidationError)
            get_method(info.data["method"]).validate_options(v)
        return v

    @model_validator(mode="after")
    def _two_models(self) -> Recipe:
        # slerp and nearswap mix the instruct model with one language model and have no weights: a second
        # language or a weight would be ignored (mergekit ignores the weight, and fails on a third model)
        method = get_method(self.method)
        if not method.two_models:
            return self
        if len(self.languages) > 1:
            raise field_error(
                ("languages",),
                f"{method.name} merges the instruct model with one language model, got {len(self.languages)} "
                "languages; make one recipe per language, or use a method of several (task_arithmetic, ties, ...)",
            )
        if self.languages[0].weight != 1.0:
            raise field_error(
                ("languages", 0, "weight"),
                f"{method.name} does not weight the language model (options.t sets the mix), got "
                f"{self.languages[0].weight:g}; remove the weight",
            )
        return self

    @field_validator("license")
    @classmethod
    def _license(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[\w.+-]{1,64}", v):
            raise ValueError(f"license is an identifier such as apache-2.0 or llama3.1, got {shown(v)}")
        return v

    @field_validator("description")
    @classmethod
    def _description(cls, v: str | None) -> str | None:
        if v is not None and len(v) > MAX_TEXT:
            raise ValueError(f"description: at most {MAX_TEXT} characters, got {len(v)}")
        return v

    @property
    def lang_codes(self) -> list[str]:
        return [lang.code for lang in self.languages]

    def to_yaml_dict(self) -> dict[str, Any]:
        """The recipe as written to provenance files."""
        return self.model_dump(mode="json", exclude={"root"})

    def merge_dict(self) -> dict[str, Any]:
        """The fields that decide the merged model (its cache key, its GGUF metadata): all but AFTER_MERGE."""
        return {k: v for k, v in self.to_yaml_dict().items() if k not in AFTER_MERGE}


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _format_validation_error(source: str, err: ValidationError) -> str:
    """One line: the first few errors, each as `field.path: what is wrong`, input values shortened."""
    errors = err.errors(include_url=False, include_context=False)
    parts = []
    for e in errors[:3]:
        loc = ".".join(_clip(str(p), 40) if isinstance(p, (int, str)) else shown(p, 40) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "literal_error":
            msg = f"{msg}, got {shown(e.get('input'))}"
        parts.append(f"{loc or '(top level)'}: {msg[:300]}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"recipe {source}: " + "; ".join(parts) + more


def parse_recipe(data: Any, *, source: str = "<recipe>", root: Path | None = None) -> Recipe:
    """Validate a recipe given as a mapping; errors name the bad field."""
    if not isinstance(data, dict):
        raise EdgemergeError(f"recipe {source}: expected a mapping of fields (name, instruct, base, ...)")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise EdgemergeError(_format_validation_error(source, e)) from None
    recipe.root = root
    return recipe


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that build Python objects) for recipes, with a bound on nesting: the
    composer recurses once per level, and past a few hundred levels the scanner's bookkeeping (one possible
    key per open bracket) makes each further level slower (seconds for 1,000 brackets)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], open_: set[int]) -> int:
    """How many nodes `node` stands for once every alias is expanded (as pydantic and any dump would walk
    it); stops counting past MAX_YAML_NODES. An alias shares its anchor's node, so the sizes are memoized by
    node: the work is one visit per distinct node however large the expansion."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_:
        raise yaml.YAMLError("an anchor is used inside itself (a recursive alias)")
    open_.add(key)
    n = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [c for pair in node.value for c in pair]
    else:
        children = []
    for child in children:
        n += _expanded_nodes(child, memo, open_)
        if n > MAX_YAML_NODES:
            break
    open_.discard(key)
    memo[key] = n
    return n


def load_yaml(text: str, source: str) -> Any:
    """Parse one YAML document with the safe loader, refusing (before building anything) a document whose
    aliases expand to more than MAX_YAML_NODES nodes: a few hundred bytes of nested aliases ("billion
    laughs") would otherwise expand to gigabytes when validated or written back."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}, set()) > MAX_YAML_NODES:
            raise EdgemergeError(
                f"recipe {source}: more than {MAX_YAML_NODES} values once its aliases (*name) are expanded; "
                "a recipe is a short list of fields: write them out"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise EdgemergeError(f"recipe {source}: not valid YAML ({str(e).splitlines()[0][:200]})") from None
    except RecursionError:
        raise EdgemergeError(f"recipe {source}: nested too deeply to be a recipe") from None
    except ValueError:  # e.g. an integer of more than 4300 digits, which Python refuses to convert
        raise EdgemergeError(
            f"recipe {source}: holds a value that is not a recipe value (e.g. an integer of thousands of digits)"
        ) from None
    finally:
        loader.dispose()


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file, or a bundled recipe by name (e.g. `llama3.1-8b-eu`)."""
    p = Path(path)
    try:
        exists = p.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        exists = False
    if not exists:
        bundled = _named_file(str(path))
        if bundled is not None:
            p = bundled
        else:
            raise EdgemergeError(
                f"recipe {_clip(str(path), 300)} not found: give a YAML file or one of the bundled recipes: "
                + ", ".join(bundled_recipes())
            )
    raw = read_limited(p, MAX_RECIPE_BYTES, "recipe")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgemergeError(f"recipe {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    data = load_yaml(text, str(p))
    recipe = parse_recipe(data, source=str(p), root=p.resolve().parent)
    recipe.file = p
    return recipe


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped with edgemerge."""
    return sorted(f.stem for f in BUNDLED_DIR.glob("*.yaml"))


def example_recipes() -> list[str]:
    """Names of the example recipes shipped with edgemerge (EXAMPLES_DIR)."""
    return sorted(f.stem for f in EXAMPLES_DIR.glob("*.yaml"))


def _named_file(name: str) -> Path | None:
    """The file of a bundled or example recipe called `name`, if there is one."""
    if not re.fullmatch(r"[\w.-]{1,128}", name):
        return None
    return next((f for d in (BUNDLED_DIR, EXAMPLES_DIR) if (f := d / f"{name}.yaml").is_file()), None)


def bundled_languages(summaries: list[dict[str, Any]] | None = None) -> str:
    """The language codes the bundled recipes cover, each with its recipes (a `*` on those whose language model
    is not set yet): `ca (llama3.1-8b-ca*, qwen3-8b-ca*), ..., eu,ca,gl,es (llama3.1-8b-multi*, ...)`."""
    by_codes: dict[str, list[str]] = {}
    for r in summaries if summaries is not None else recipe_summaries():
        by_codes.setdefault(",".join(r["languages"]), []).append(r["name"] + ("*" if r["missing"] else ""))
    order = sorted(by_codes, key=lambda c: ("," in c, c))  # single languages first
    return ", ".join(f"{c} ({', '.join(by_codes[c])})" for c in order)


def recipe_for_languages(codes: list[str], *, require_models: bool = True) -> str:
    """The bundled recipe name for `--lang` (one code, or several for the multilingual recipe): one whose every
    model is set (unless not `require_models`), preferring the default family (Llama 3.1); EdgemergeError saying
    what exists otherwise."""
    summaries = recipe_summaries()
    wanted = sorted(set(codes))
    matches = [r for r in summaries if sorted(r["languages"]) == wanted]
    start = "start from one (edgemerge recipes copy NAME my-recipe.yaml), set"
    if not matches:
        raise EdgemergeError(
            f"no bundled recipe for --lang {','.join(codes)}; the bundled recipes cover {bundled_languages(summaries)}"
            f" (*: a language model not public yet). For another language {start} its languages (code and "
            "model) and build with --recipe my-recipe.yaml"
        )
    complete = [r["name"] for r in matches if not r["missing"] or not require_models]
    if not complete:
        best = min(matches, key=lambda r: (len(r["missing"]), r["name"]))  # the fewest models to set
        lacks = "; ".join(f"{r['name']} lacks {','.join(r['missing'])}" for r in matches)
        raise EdgemergeError(
            f"--lang {','.join(codes)}: no bundled recipe for it has every language model public yet ({lacks}); "
            f"{start.replace('NAME', best['name'])} the model of {','.join(best['missing'])} (a hub id or a "
            "local folder) and build with --recipe my-recipe.yaml"
        )
    complete.sort(key=lambda n: (not n.startswith("llama"), n))
    return complete[0]


def recipe_summaries(*, examples: bool = False) -> list[dict[str, Any]]:
    """Each bundled recipe (then, with `examples`, each example): name, languages, instruct model, and the
    languages whose model is not set yet (such a recipe cannot be built until it is: copy it and fill it in)."""
    out = []
    files = [(BUNDLED_DIR / f"{n}.yaml", False) for n in bundled_recipes()]
    files += [(EXAMPLES_DIR / f"{n}.yaml", True) for n in example_recipes()] if examples else []
    for file, example in files:
        r = load_recipe(file)
        out.append(
            {
                "name": file.stem,
                "example": example,
                "languages": r.lang_codes,
                "instruct": r.instruct,
                "method": r.method,
                "quants": r.quants,
                "missing": [lang.code for lang in r.languages if not lang.model],
                "description": r.description,
            }
        )
    return out


def bundled_recipe_file(name: str) -> Path:
    """The file of bundled (or example) recipe `name`; EdgemergeError listing the bundled ones otherwise."""
    file = _named_file(name)
    if file is None:
        raise EdgemergeError(
            f"no bundled recipe {shown(name)}; bundled: {', '.join(bundled_recipes())}; examples: "
            + ", ".join(example_recipes())
        )
    return file
