"""Publishing a build folder to the Hugging Face hub (`edgemerge publish DIR --repo user/name`).

What is uploaded is what manifest.json lists, after checking every file against its size and sha256 (a file
changed after the build is refused) and filling the repo id into the card's commands. A GGUF above the hub's
per-file limit is uploaded as llama.cpp split shards (gguf/split.py), made once and kept beside it.

The upload is huggingface_hub's `upload_folder`, which resumes by itself when run again: with hf_xet (installed
with huggingface_hub) it streams the files through the hub's Xet storage, commits in batches and skips committed
files and stored chunks; without hf_xet (and in older releases) it makes one commit over the LFS protocol, whose
batch endpoint skips every file already stored. (`upload_large_folder`, which resumed from a .cache folder it
wrote inside the uploaded folder, is gone from huggingface_hub 2.)
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import EdgemergeError, one_line
from .files import atomic_output, contained
from .gguf.metadata import is_repo_id
from .gguf.split import shard_names, split_gguf
from .hashes import sha256_file
from .package import CARD, MANIFEST, fill_repo, foreign_files
from .progress import Progress

HUB_FILE_LIMIT = 50 * 10**9  # the hub refuses a file above 50 GB (its repository limits)
SPLIT_BYTES = 48 * 10**9  # tensor data per shard: under the limit with room for the header and padding
AGAIN = "run the same command again: it resumes, and files already on the hub are not sent again"


@dataclass
class PublishResult:
    repo: str
    folder: Path
    url: str | None  # None on a dry run
    files: list[dict[str, Any]]  # {"name", "size"} of every file uploaded (or to be), manifest.json last
    split: dict[str, list[str]] = field(default_factory=dict)  # a file above the hub's limit -> its shards
    not_uploaded: list[str] = field(default_factory=list)  # files of the folder manifest.json does not list
    card_filled: bool = False  # the card's commands now name the repo (False: they already did)
    dry_run: bool = False
    commit: str | None = None
    warnings: list[str] = field(default_factory=list)
    recommended: dict[str, str] | None = None  # manifest's {"file", "type", "why"}

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def check_repo(repo: str, name: str = "name") -> str:
    """`repo` is a hub model id of the form user/name (or org/name)."""
    if not is_repo_id(repo):
        raise EdgemergeError(
            f"--repo {repo!r} is not a hub repo id; give user/name (or org/name), e.g. --repo alice/{name}"
        )
    return repo


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest.json; a folder without one is not an edgemerge build."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgemergeError(f"{folder} is not a folder; give the output folder of `edgemerge build`")
    path = folder / MANIFEST
    if not path.is_file():
        raise EdgemergeError(
            f"{folder} has no {MANIFEST}, so it is not a finished edgemerge build; publish the folder "
            "`edgemerge build` wrote (a build that was interrupted writes it when run again)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgemergeError(f"{path} is not valid JSON ({one_line(str(e))}); rebuild the folder") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and "name" in f for f in files):
        raise EdgemergeError(f"{path} lists no files; it is not edgemerge's manifest: rebuild the folder")
    return data


def check_files(folder: Path, manifest: dict[str, Any], progress: Progress | None = None) -> list[Path]:
    """Every file manifest.json lists is there, with its size and sha256 (sizes first: the cheap check)."""
    paths = []
    for entry in manifest["files"]:
        path = contained(folder, entry["name"])
        if path is None or "/" in entry["name"]:
            raise EdgemergeError(
                f"{folder / MANIFEST} lists {entry['name']!r}, not a file of the folder: rebuild"
            )
        if not path.is_file():
            raise EdgemergeError(
                f"{path.name} is listed in {MANIFEST} but missing from {folder}; restore it or rebuild the folder"
            )
        paths.append(path)
    for entry, path in zip(manifest["files"], paths):
        if path.stat().st_size != entry.get("size"):
            raise _changed(path)
    for entry, path in zip(manifest["files"], paths):
        if sha256_file(path, progress) != entry.get("sha256"):
            raise _changed(path)
    return paths


def _changed(path: Path) -> EdgemergeError:
    return EdgemergeError(
        f"{path.name} changed after the build (its size or sha256 is not the one {MANIFEST} records); "
        "restore it, or rebuild the folder so the manifest and card describe what is uploaded"
    )


def publish(
    folder: Path,
    repo: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    file_limit: int = HUB_FILE_LIMIT,
    split_bytes: int = SPLIT_BYTES,
) -> PublishResult:
    """Upload the build folder `folder` to the hub model repo `repo` (created when missing, `private` then).

    Checks before any upload: the repo id, the folder (a manifest whose every file has its recorded sha256),
    and, unless `dry_run`, a token and the hub not being switched off (HF_HUB_OFFLINE). A dry run writes and
    sends nothing and says what would be uploaded."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    name = str(manifest.get("name") or folder.name)
    check_repo(repo, name)
    if not dry_run:
        _check_hub()
    check_files(folder, manifest, progress)
    names = [e["name"] for e in manifest["files"]]
    result = PublishResult(repo=repo, folder=folder, url=None, files=[], dry_run=dry_run)
    result.recommended = manifest.get("recommended")
    ours = [*names, *_all_shards(manifest), MANIFEST]
    result.not_uploaded = foreign_files(folder, [folder / n for n in ours])
    if result.not_uploaded:
        result.warnings.append(
            f"{folder} also holds {', '.join(result.not_uploaded)}, which {MANIFEST} does not list: not uploaded"
        )

    big = [e for e in manifest["files"] if e["name"].endswith(".gguf") and e["size"] > file_limit]
    for entry in big:
        result.split[entry["name"]] = shard_names(folder / entry["name"], split_bytes)
    card_text = (folder / CARD).read_text(encoding="utf-8") if CARD in names else None
    filled = None if card_text is None else fill_repo(card_text, name, repo, manifest.get("repo"))
    result.card_filled = filled is not None and filled != card_text
    if not dry_run:
        _make_shards(folder, manifest, big, split_bytes, progress)
        if result.card_filled or manifest.get("repo") != repo:
            _write_card(folder, manifest, filled if result.card_filled else None, repo)

    upload = [n for n in names if n not in result.split] + [
        s for shards in result.split.values() for s in shards
    ]
    upload.append(MANIFEST)
    result.files = [
        {"name": n, "size": (folder / n).stat().st_size if (folder / n).exists() else None} for n in upload
    ]
    if dry_run:
        return result
    if progress is not None:  # huggingface_hub draws its own bars (tqdm) for the upload: ours step aside
        progress.stop()
    result.url, result.commit = _upload(folder, repo, upload, private, name, bars=progress is not None)
    return result


def _all_shards(manifest: dict[str, Any]) -> set[str]:
    return {s for e in manifest["files"] for s in e.get("uploaded_as") or []}


def _check_hub() -> None:
    # huggingface_hub takes a third of a second to import: only publishing (and downloading) needs it
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise EdgemergeError("HF_HUB_OFFLINE is set, and publishing needs the hub: unset HF_HUB_OFFLINE")
    if not get_token():
        raise EdgemergeError(
            "no Hugging Face token: run `hf auth login` or set HF_TOKEN (a token with write access)"
        )


def _make_shards(
    folder: Path, manifest: dict[str, Any], big: list[dict], split_bytes: int, progress: Progress | None
) -> None:
    """Split each file above the hub's limit once; the shards are recorded in the manifest (with their hashes),
    so a publish run again checks them instead of splitting again."""
    recorded = {e["name"]: e for e in manifest.get("shards", [])}
    changed = False
    for entry in big:
        shards = entry.get("uploaded_as") or []
        if shards and all(
            (folder / s).is_file() and sha256_file(folder / s, progress) == recorded.get(s, {}).get("sha256")
            for s in shards
        ):
            continue
        paths = split_gguf(folder / entry["name"], split_bytes, folder, progress)
        entry["uploaded_as"] = [p.name for p in paths]
        for p in paths:
            recorded[p.name] = {
                "name": p.name,
                "size": p.stat().st_size,
                "sha256": sha256_file(p, progress),
                "split_of": entry["name"],
            }
        changed = True
    if changed:
        manifest["shards"] = list(recorded.values())
        _write_manifest(folder, manifest)


def _write_card(folder: Path, manifest: dict[str, Any], card: str | None, repo: str) -> None:
    """The card with the repo id, and the manifest with the card's new size and hash and the repo."""
    if card is not None:
        with atomic_output(folder / CARD, force=True) as tmp:
            tmp.write_text(card, encoding="utf-8")
        for entry in manifest["files"]:
            if entry["name"] == CARD:
                entry["size"] = (folder / CARD).stat().st_size
                entry["sha256"] = sha256_file(folder / CARD)
    manifest["repo"] = repo
    _write_manifest(folder, manifest)


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    with atomic_output(folder / MANIFEST, force=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _upload(
    folder: Path, repo: str, names: list[str], private: bool, name: str, *, bars: bool
) -> tuple[str, str | None]:
    """Create the repo (kept as it is when it exists) and upload `names` from `folder`; (url, commit).
    `bars`: let huggingface_hub show its progress bars (else none: a log or a pipe stays clean)."""
    from huggingface_hub import HfApi, constants  # see _check_hub
    from huggingface_hub.utils import disable_progress_bars

    if not bars:
        disable_progress_bars()
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo,
            folder_path=folder,
            repo_type="model",
            allow_patterns=[
                glob.escape(n) for n in names
            ],  # the manifest's files, nothing else of the folder
            commit_message=f"Upload {name} (edgemerge {__version__})",
        )
    except EdgemergeError:
        raise
    except Exception as e:  # noqa: BLE001 (network, auth, refusals: each becomes one line with its way out)
        raise EdgemergeError(upload_error(repo, e)) from None
    return f"{constants.ENDPOINT}/{repo}", getattr(info, "oid", None)


def upload_error(repo: str, e: Exception) -> str:
    """One line for a failed upload, chosen by huggingface_hub's typed errors, saying what to do."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError  # see _check_hub

    head = f"cannot publish to {repo}"
    cause = (
        e.__cause__ if isinstance(e, RuntimeError) and e.__cause__ is not None else e
    )  # a failed file upload
    status = getattr(getattr(cause, "response", None), "status_code", None)
    if isinstance(cause, RepositoryNotFoundError):
        return f"{head}: no such repo, or not yours; check the name, or log in as its owner (`hf auth login`)"
    if status == 401:
        return f"{head}: the hub refused your token (401); log in again with `hf auth login` or set HF_TOKEN"
    if status == 403 and isinstance(e, RuntimeError):
        return f"{head}: the hub refused a file upload (403) and the upload stopped; {AGAIN}"
    if status == 403:
        return (
            f"{head}: your token may not write there (403); use a token with write access (`hf auth login`)"
        )
    if isinstance(cause, HfHubHTTPError) and status is not None:
        return f"{head}: the hub answered {status} ({one_line(str(cause))[:200]}); {AGAIN}"
    if isinstance(cause, ValueError) and "metadata" in str(cause):
        return (
            f"{head}: the hub refused the card's metadata ({one_line(str(cause))[:300]}); rebuild the folder"
        )
    if isinstance(cause, (OSError, ConnectionError)) or type(cause).__module__.startswith(
        ("httpx", "httpcore")
    ):
        return f"{head}: the hub cannot be reached ({one_line(str(cause))[:200]}); check your connection, then {AGAIN}"
    return f"{head} ({type(cause).__name__}: {one_line(str(cause))[:200]}); {AGAIN}"
