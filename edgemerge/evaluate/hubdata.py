"""A benchmark's files from the Hugging Face hub, when no --data folder is given: the public dataset repo that
lm-eval 0.4.13 reads (the task file's `dataset_path`, config `dataset_name`), fetched by huggingface_hub into
its cache (HF_HUB_CACHE), so a second run reads them from there, also offline.

Which file holds a split is what the dataset's card says: its `configs` metadata (config_name, data_files with
split and path), the rule the `datasets` library applies when lm-eval calls load_dataset; the card is read with
huggingface_hub's DatasetCard. We have not seen every repo's card from here: EusExams' card names
data/eu/<exam>/<subset>.jsonl per eu_<subset> config and truthfulqa-multi's files are <lang>/train.json and
<lang>/validation.json, but EusTrivia's layout is unknown to us. A card without a file for the task's split
(or one naming a glob, or parquet) stops with one line naming the file to give with --data, never a guess.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import EdgemergeError
from ..limits import shown
from .harness import task_splits
from .taskfile import Task

_GLOB = set("*?[")


def config_files(meta: dict[str, Any], config: str) -> dict[str, str]:
    """split -> file of `config` in a dataset card's metadata (`configs: [{config_name, data_files}]`, the
    data_files a list of {split, path} with one path each, or a single path for the train split)."""
    for c in meta.get("configs") or []:
        if not isinstance(c, dict) or c.get("config_name", "default") != config:
            continue
        files = c.get("data_files")
        if isinstance(files, str | list) and not (
            isinstance(files, list) and files and isinstance(files[0], dict)
        ):
            files = [{"split": "train", "path": files}]
        out = {}
        for f in files if isinstance(files, list) else []:
            path = f.get("path") if isinstance(f, dict) else None
            path = path[0] if isinstance(path, list) and len(path) == 1 else path
            if isinstance(path, str) and isinstance(f.get("split"), str) and not _GLOB & set(path):
                out[f["split"]] = path
        return out
    return {}


def _config(task: Task) -> str:
    name = task.spec.dataset_name
    return name.format(subset=task.subset or "") if name else "default"


def _local_hint(task: Task, split: str) -> str:
    """The way out: the file to give under --data."""
    spec = task.spec
    want = spec.data_files[split].format(subset=task.subset or "")
    return (
        f"download the {split} split of {spec.dataset_path} (config {_config(task)}) elsewhere and give --data DIR "
        f"with {want} in it (JSON or JSON Lines)"
    )


def _hub_message(task: Task, split: str, e: Exception) -> str:
    """One line for a failed download, chosen by huggingface_hub's typed errors."""
    from huggingface_hub import constants  # a third of a second to import: only when the hub is used
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    head = f"task {task.name} needs {task.spec.dataset_path} from the Hugging Face hub"
    if isinstance(e, OfflineModeIsEnabled) or isinstance(e.__cause__, OfflineModeIsEnabled):
        why = f"it is not in the cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set"
    elif isinstance(e, LocalEntryNotFoundError):  # nothing cached and the hub could not be asked
        why = f"it is not in the cache ({constants.HF_HUB_CACHE}) and the hub cannot be reached"
    elif isinstance(e, RepositoryNotFoundError):
        why = "the hub has no such dataset (or a private one)"
    else:
        line = shown((str(e).strip().splitlines() or [""])[0], 120)
        missing = isinstance(e, EntryNotFoundError)
        why = (
            f"the hub has no such file ({line})"
            if missing
            else f"the download failed ({type(e).__name__}: {line})"
        )
    return f"{head}: {why}; {_local_hint(task, split)}"


def hub_files(task: Task) -> dict[str, Path]:
    """split -> the file in the hub cache, for the task's eval and few-shot splits (module docstring)."""
    from huggingface_hub import DatasetCard, hf_hub_download  # see _hub_message

    spec = task.spec
    splits = task_splits(task)
    out: dict[str, Path] = {}
    split = splits[0]
    try:
        meta = DatasetCard.load(spec.dataset_path).data.to_dict()
        files = config_files(meta, _config(task))
        for split in splits:
            if split not in files:
                raise EdgemergeError(
                    f"task {task.name}: the card of {spec.dataset_path} names no single JSON file for the "
                    f"{split} split of config {_config(task)}; {_local_hint(task, split)}"
                )
            out[split] = Path(hf_hub_download(spec.dataset_path, files[split], repo_type="dataset"))
    except EdgemergeError:
        raise
    except Exception as e:  # noqa: BLE001 (network, auth, missing repo or file: all become one line)
        raise EdgemergeError(_hub_message(task, split, e)) from None
    return out
