"""Model sources: a recipe's model references resolved to local folders of safetensors + config + tokenizer.

A reference is a local folder (absolute, or relative to the recipe's folder) or a Hugging Face repo id
`owner/name[@revision]`, downloaded with huggingface_hub into its usual cache. Only safetensors weights, JSON,
tokenizer and chat-template files are fetched: never pickled `.bin` weights, never remote code. The weights still
to download are sized first (the hub's dry run) and checked against the cache disk's free space.

Provenance hashes (`ModelSource.files`) are chosen to be honest and cheap for 16 GB models. Small files
(config, tokenizer, templates) get the sha256 of their content. A safetensors file from the hub cache gets the
sha256 the hub computed for it (the cache names each LFS blob by it), so hub inputs are fully identified, and
the commit sha is kept as `revision`. A local safetensors file gets a sampled hash, "sha256 of its header and
of the first and last MiB of its data, plus its size": it tells released models apart without reading 16 GB,
but would not notice an in-place edit in the middle of a tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgemergeError
from .files import free_bytes, human_bytes
from .hashes import sha256_file
from .progress import Progress, task
from .recipe import BUNDLED_DIR, Recipe
from .tensors.safetensors import (
    index_weight_files,
    parse_safetensors_header,
    safetensors_header,
    weight_files,
)

HF_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")

ALLOW_PATTERNS = [
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "*.jinja",
    "merges.txt",
    "vocab.txt",
    "LICENSE*",
    "USE_POLICY*",
    "NOTICE*",
]
SMALL_FILE_LIMIT = 64 * 1024 * 1024
DOWNLOAD_MARGIN = 256 * 1024 * 1024  # hub cache bookkeeping, partial-file slack
SAMPLE = 1024 * 1024


@dataclass
class ModelSource:
    """A model available locally: where it is, what it was asked as and how to recognise it again."""

    ref: str
    path: Path
    revision: str | None = None
    files: dict[str, str] = field(
        default_factory=dict
    )  # file name -> "sha256:<hex>" | "header-sha256:<hex> size:<n>"

    @property
    def safetensors(self) -> list[Path]:
        return weight_files(self.path)

    def provenance(self) -> dict:
        return {"ref": self.ref, "revision": self.revision, "files": self.files}


@dataclass
class RecipeSources:
    """The resolved inputs of a recipe: instruct, base and one source per language (recipe order)."""

    instruct: ModelSource
    base: ModelSource
    languages: list[ModelSource]
    codes: list[str] = field(default_factory=list)

    def paths(self) -> list[Path]:
        """The folders the inputs are in (what an output may not be, contain or lie inside)."""
        return [src.path for _, src in self.named()]

    def named(self) -> list[tuple[str, ModelSource]]:
        """(role, source) pairs: instruct, base, then each language by code."""
        return [("instruct", self.instruct), ("base", self.base)] + list(zip(self.codes, self.languages))


def _sampled_sha256(path: Path) -> str:
    header = safetensors_header(path)
    size = path.stat().st_size
    parse_safetensors_header(header, path, size - 8 - len(header))
    h = hashlib.sha256(header)
    with open(path, "rb") as f:
        start = 8 + len(header)
        f.seek(start)
        h.update(f.read(SAMPLE))
        f.seek(max(start, size - SAMPLE))
        h.update(f.read(SAMPLE))
    return h.hexdigest()


def fingerprint(folder: Path) -> dict[str, str]:
    """Hashes of a model folder's files (see the module docstring for what is hashed)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix == ".safetensors":
            blob = p.resolve().name
            if p.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", blob):
                out[p.name] = f"sha256:{blob}"
            else:
                out[p.name] = f"sampled-sha256:{_sampled_sha256(p)} size:{p.stat().st_size}"
        elif p.stat().st_size <= SMALL_FILE_LIMIT:
            out[p.name] = f"sha256:{sha256_file(p)}"
    return out


def _check_folder(path: Path, ref: str) -> None:
    if not (path / "config.json").exists():
        raise EdgemergeError(f"model {ref}: {path} has no config.json; point to a Hugging Face model folder")
    if not weight_files(path):
        extra = " (edgemerge never loads pickled .bin weights)" if any(path.glob("*.bin")) else ""
        raise EdgemergeError(
            f"model {ref}: {path} has no .safetensors weights{extra}; convert or download the safetensors version"
        )


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class HubError(EdgemergeError):
    """A model could not be fetched from the hub: `ref` and the hub's error `error`, for a caller that knows more
    (the recipe) to say it again with that context."""

    def __init__(self, ref: str, error: Exception):
        super().__init__(hub_error_message(ref, error))
        self.ref, self.error = ref, error

    @property
    def no_network(self) -> bool:
        """Whether the hub could not be asked at all (offline mode, or no connection) rather than refused."""
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled  # see _small_files

        e = self.error
        return isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)) or isinstance(
            e.__cause__, OfflineModeIsEnabled
        )


_NAME_NOT_RESOLVED = ("[Errno -2]", "[Errno -3]", "[Errno -5]", "Name or service not known",
                      "Temporary failure in name resolution", "nodename nor servname", "getaddrinfo failed")  # fmt: skip


def network_reason(e: BaseException) -> str:
    """Why the hub could not be reached, in words, from the chain of errors under huggingface_hub's (httpx's or
    requests' errors wrapping the socket's): a name that does not resolve, a refused connection, a timeout."""
    from urllib.parse import urlparse

    from huggingface_hub import constants  # see _small_files

    host = urlparse(constants.ENDPOINT).netloc or constants.ENDPOINT
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur)
        if isinstance(cur, socket.gaierror) or any(s in text for s in _NAME_NOT_RESOLVED):
            return f"the name {host} does not resolve: no network, or no DNS"
        if isinstance(cur, ConnectionRefusedError) or "[Errno 111]" in text or "Connection refused" in text:
            return f"{host} refused the connection"
        if isinstance(cur, TimeoutError) or "Timeout" in type(cur).__name__ or "timed out" in text.lower():
            return f"{host} did not answer in time"
        cur = cur.__cause__ or cur.__context__
    return f"no connection to {host}"


def hub_error_message(ref: str, e: Exception) -> str:
    """One line for a failed hub request, saying what to do, chosen by huggingface_hub's typed errors
    (subclasses before their bases: GatedRepoError is a RepositoryNotFoundError, LocalEntryNotFoundError an
    EntryNotFoundError, which may be an HfHubHTTPError)."""
    from huggingface_hub import constants  # see _small_files
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, rev = ref.partition("@")
    head = f"cannot get {ref} from the Hugging Face hub"
    local = "or download it elsewhere and put the local folder path in the recipe instead"
    offline = (
        f"{head}: HF_HUB_OFFLINE is set and the model is not (fully) in the cache ({constants.HF_HUB_CACHE}); "
        f"unset HF_HUB_OFFLINE to download it, {local}"
    )
    if isinstance(e, GatedRepoError):
        return (
            f"{head}: the model is gated; accept its terms at {constants.ENDPOINT}/{repo}, then log in with "
            f"`hf auth login` (or set HF_TOKEN), {local}"
        )
    if isinstance(e, RepositoryNotFoundError):
        return f"{head}: no such model, or a private one; check the id, run `hf auth login` if it is private, {local}"
    if isinstance(e, RevisionNotFoundError):
        return (
            f"{head}: the model has no revision {rev!r}; check the branch, tag or commit after the @, {local}"
        )
    if isinstance(e, OfflineModeIsEnabled) or isinstance(e.__cause__, OfflineModeIsEnabled):
        return offline
    if isinstance(e, LocalEntryNotFoundError):  # nothing cached and the hub could not be asked
        return (
            f"{head}: the hub cannot be reached ({network_reason(e)}) and the model is not in the cache "
            f"({constants.HF_HUB_CACHE}); check your network connection (or HF_ENDPOINT and proxy settings), {local}"
        )
    if isinstance(e, EntryNotFoundError):
        return (
            f"{head}: a file of the model is missing on the hub ({_first_line(e)}); try again later, {local}"
        )
    if isinstance(e, HfHubHTTPError):
        status = getattr(e.response, "status_code", None)
        if status == 401:
            return f"{head}: the hub refused your token (401); log in again with `hf auth login`, {local}"
        if status == 403:
            return f"{head}: your token may not read this model (403); use one that can (`hf auth login`), {local}"
        if status == 429:
            return (
                f"{head}: too many requests (429); wait a few minutes and retry, or log in for a higher limit"
            )
        if status is not None and status >= 500:
            return f"{head}: the hub failed to answer ({status}); try again later, {local}"
    if isinstance(e, HFValidationError):
        return f"{head}: {ref!r} is not a valid hub id ({_first_line(e)}); check it, {local}"
    return (
        f"{head} ({type(e).__name__}: {_first_line(e)}); check the id, your connection and `hf auth login` for "
        f"gated models, {local}"
    )


@contextlib.contextmanager
def _hub_errors(ref: str) -> Iterator[None]:
    """Turn any hub failure (network, auth, missing repo) into one actionable EdgemergeError line."""
    try:
        yield
    except EdgemergeError:
        raise
    except Exception as e:  # noqa: BLE001 (network, auth, missing repo: all become one actionable line)
        raise HubError(ref, e) from None


def _small_files(repo: str, revision: str | None, ref: str) -> tuple[Path, str | None, list[str]]:
    """Fetch the JSON, tokenizer and template files (pinned to the commit they came from); return the snapshot
    folder, the commit and the weight files the model needs (those its index names, else model.safetensors)."""
    # huggingface_hub takes a third of a second to import: loaded only when the hub is used
    from huggingface_hub import snapshot_download

    with _hub_errors(ref):
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS))
    commit = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else revision
    index = path / "model.safetensors.index.json"
    weights = index_weight_files(index) if index.exists() else []
    return path, commit, weights or ["model.safetensors"]


def _weights(repo: str, commit: str | None, weights: list[str], ref: str, *, dry_run: bool = False):
    """Download the weight files (or with `dry_run`, say what downloading them would fetch); a repo without
    the expected names gets all its safetensors files."""
    from huggingface_hub import snapshot_download  # see _small_files

    with _hub_errors(ref):
        got = snapshot_download(repo, revision=commit, allow_patterns=weights, dry_run=dry_run)
        if not got if dry_run else not any(Path(got).glob("*.safetensors")):
            got = snapshot_download(repo, revision=commit, allow_patterns=["*.safetensors"], dry_run=dry_run)
    return got


def _download(
    repo: str, revision: str | None, ref: str, progress: Progress | None
) -> tuple[Path, str | None]:
    with task(progress, f"download {ref}", None):
        _, commit, weights = _small_files(repo, revision, ref)
        path = Path(_weights(repo, commit, weights, ref))
    # snapshot folders are named by the commit sha: the exact revision that was merged
    return path, commit


def local_path(ref: str, root: Path | None) -> Path:
    """Where `ref` would be as a local folder: absolute, or relative to `root` (the recipe's folder)."""
    p = Path(ref).expanduser()
    return p if p.is_absolute() else (root or Path.cwd()) / p


def path_exists(path: Path) -> bool:
    """Path.exists() for any string: a name too long for the file system or with a NUL is not there."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def is_local(ref: str, root: Path | None = None) -> bool:
    """Whether `ref` names a local folder rather than a hub model, by the rule `resolve` applies: an existing
    path, or anything that is not an `owner/name[@revision]` id (or starts like a path)."""
    return path_exists(local_path(ref, root)) or HF_ID.match(ref) is None or ref.startswith((".", "/", "~"))


def local_inputs(recipe: Recipe) -> list[Path]:
    """The recipe's models that are local folders, known without resolving or downloading anything (an output
    is checked against them before any work)."""
    refs = [recipe.instruct, recipe.base, *(lang.model for lang in recipe.languages if lang.model)]
    paths = [local_path(ref, recipe.root) for ref in refs]
    return [p for p in paths if path_exists(p)]


def pending_download(ref: str, root: Path | None = None) -> int:
    """Bytes of weights that resolving `ref` would download (0 for a local folder or a fully cached model).
    Fetches the model's small files to learn which weights it needs, and asks the hub for their sizes."""
    m = HF_ID.match(ref)
    if m is None or path_exists(local_path(ref, root)):
        return 0
    _, commit, weights = _small_files(m["repo"], m["rev"], ref)
    try:
        files = _weights(m["repo"], commit, weights, ref, dry_run=True)
    except HubError:
        return 0  # sizes unknown (e.g. offline with the model cached): the download itself will tell
    return sum(f.file_size or 0 for f in files if f.will_download)


def check_download_space(refs: list[str], root: Path | None = None) -> int:
    """Fail before downloading when the hub cache's disk cannot hold the weights still to fetch for `refs`;
    returns the bytes to download. Without a network every model is still asked about (each answers from the
    cache or fails at once), so the error names all of those that are missing (`Unreachable`)."""

    need, missing, first = 0, [], None
    for ref in dict.fromkeys(refs):
        try:
            need += pending_download(ref, root)
        except HubError as e:
            if not e.no_network:
                raise
            missing.append(ref)
            first = first or e
    if first is not None:
        raise Unreachable(missing, first)
    if need:
        from huggingface_hub import constants  # see _small_files

        cache = Path(constants.HF_HUB_CACHE)
        free = free_bytes(cache)
        if free < need + DOWNLOAD_MARGIN:
            raise EdgemergeError(
                f"not enough disk space to download the models: {human_bytes(need)} of weights to fetch into "
                f"{cache}, {human_bytes(free)} free; free some space or set HF_HUB_CACHE to a larger disk"
            )
    return need


def resolve(ref: str, root: Path | None = None, progress: Progress | None = None) -> ModelSource:
    """A local folder or `owner/name[@revision]` hub id -> ModelSource (downloading if needed)."""
    local = local_path(ref, root)
    if path_exists(local):
        if not local.is_dir():
            raise EdgemergeError(f"model {ref}: {local} is a file; give the model's folder")
        local = local.resolve()
        _check_folder(local, ref)
        return ModelSource(ref=ref, path=local, revision=None, files=fingerprint(local))
    m = HF_ID.match(ref)
    if m is None or ref.startswith((".", "/", "~")):
        raise EdgemergeError(
            f"model {ref}: no such folder ({local}) and not a Hugging Face id (owner/name[@revision])"
        )
    path, revision = _download(m["repo"], m["rev"], ref, progress)
    _check_folder(path, ref)
    return ModelSource(ref=ref, path=path, revision=revision, files=fingerprint(path))


class Unreachable(HubError):
    """Models of a recipe that are not in the cache while the hub cannot be asked (offline): all of them."""

    def __init__(self, refs: list[str], first: HubError):
        super().__init__(first.ref, first.error)
        self.refs = refs


def _params_in_name(ref: str) -> float | None:
    """The parameter count a hub id states (Qwen3-8B, Llama-3.1-8B-Instruct: 8e9), if it states one."""
    m = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)[Bb](?![A-Za-z])", ref.partition("@")[0].split("/")[-1])
    return float(m.group(1)) * 1e9 if m else None


def _fetch_hint(recipe: Recipe, refs: list[str]) -> str:
    """How much the recipe's missing models would download, as far as it can be known offline: 2 bytes per
    parameter (bfloat16) by the sizes their names state."""
    sizes = [_params_in_name(r) for r in refs]
    if all(sizes):
        return f"about {human_bytes(2 * sum(sizes))} to download by the sizes their names give"
    return "their size is known only once the hub answers"


def recipe_hub_message(recipe: Recipe, e: HubError) -> str:
    """A hub failure said with the recipe's context: which recipe (and its file), which models, how much they
    would download, and the two ways out (go online, or point a copy of the recipe at local folders)."""
    from huggingface_hub import constants  # see _small_files

    where = f"recipe {recipe.name}" + (f" ({recipe.file})" if recipe.file else "")
    bundled = recipe.file is not None and recipe.file.parent.resolve() == BUNDLED_DIR.resolve()
    copy = (
        f"edgemerge recipes copy {recipe.file.stem} my-recipe.yaml, put the local folders in it and build with "
        "--recipe my-recipe.yaml"
        if bundled
        else f"put the local folders in {recipe.file.name if recipe.file else 'the recipe'} instead of the hub ids"
    )
    if not e.no_network:
        return f"{where}: {e.message}"
    refs = e.refs if isinstance(e, Unreachable) else [e.ref]
    models = ", ".join(refs)
    them = "it" if len(refs) == 1 else "them"
    if constants.HF_HUB_OFFLINE:
        why, online = "HF_HUB_OFFLINE is set", f"unset HF_HUB_OFFLINE to download {them}"
    else:
        why, online = (
            f"the hub cannot be reached ({network_reason(e.error)})",
            "connect to the network and rerun",
        )
    return (
        f"{where} needs {models} from the Hugging Face hub, not in the cache ({constants.HF_HUB_CACHE}; "
        f"{_fetch_hint(recipe, refs)}), and {why}: {online} (a gated model, as Meta's Llama, needs `hf auth "
        f"login` and its terms accepted first), or download {them} elsewhere and use local folders: {copy}"
    )


def resolve_recipe(recipe: Recipe, progress: Progress | None = None) -> RecipeSources:
    """Resolve every model of the recipe (instruct, base, languages) to a local folder; a hub failure is said
    with the recipe's context (`recipe_hub_message`)."""
    for i, lang in enumerate(recipe.languages):
        if not lang.model:
            where = f"recipe {recipe.file or recipe.name}: languages.{i}.model ({lang.code}) is not set"
            bundled = recipe.file is not None and recipe.file.parent.resolve() == BUNDLED_DIR.resolve()
            fix = (
                f"copy it (edgemerge recipes copy {recipe.file.stem} my-recipe.yaml), put the language model's "
                "Hugging Face id or local folder there and build with --recipe my-recipe.yaml"
                if bundled
                else "put the language model's Hugging Face id or local folder there"
            )
            raise EdgemergeError(f"{where}; {fix}")
    refs = [recipe.instruct, recipe.base, *(lang.model for lang in recipe.languages)]
    try:
        check_download_space(refs, recipe.root)
        return RecipeSources(
            instruct=resolve(recipe.instruct, recipe.root, progress),
            base=resolve(recipe.base, recipe.root, progress),
            languages=[resolve(lang.model, recipe.root, progress) for lang in recipe.languages],
            codes=recipe.lang_codes,
        )
    except HubError as e:
        raise EdgemergeError(recipe_hub_message(recipe, e)) from None
