"""What this process may use (memory, CPU threads) and what each stage of a build needs from it.

Memory: a laptop's RAM, or less inside a container or a memory cgroup (`../shared/tools/laptop-sim`, systemd
slices, Docker): a plan that reads only the machine's RAM would plan for memory the kernel will not give.
Threads: llama.cpp's threads spin while waiting for each other, so on a machine where other programs run,
all cores is slower than fewer (issue 12: a 0.3B Q4_K_M generated about 1 token/s with 2 threads on 2 busy
cores, faster with one). Estimates: the peak memory of each stage (merge, quantize, llama.cpp evaluation)
from a model's shape, each formula stated with the measurements it was fitted to.

cgroup files are read by hand because psutil does not read cgroup limits; RAM and cores come from psutil.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from .errors import EdgemergeError
from .files import human_bytes
from .gguf.inspect import read_gguf
from .limits import shown
from .tensors.sinks import PENDING_BYTES
from .tensors.stream import BLOCK_ELEMENTS

MiB = 1 << 20
# cgroup v1 says "no limit" with a huge page-counter maximum (9223372036854771712 on x86-64 with 4K pages)
UNLIMITED = 1 << 60
_SMALL_FILE = 64 * 1024  # /proc/self/cgroup and cgroup control files are a few lines


# --- cgroups -------------------------------------------------------------------------------------------------


def _read_small(path: Path) -> str | None:
    """The text of a small pseudo-file, or None when it cannot be read (absent, no permission, a folder)."""
    try:
        with open(path, "rb") as f:
            return f.read(_SMALL_FILE).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None


def _memberships(proc_root: Path) -> tuple[str | None, dict[str, tuple[str, str]]]:
    """The process's cgroups from `<proc_root>/self/cgroup`: the v2 path (line `0::/path`) and, per v1
    controller, (the hierarchy's controller list, path) from lines `N:cpu,cpuacct:/path`."""
    v2: str | None = None
    v1: dict[str, tuple[str, str]] = {}
    for line in (_read_small(proc_root / "self" / "cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        else:
            for c in controllers.split(","):
                if c:
                    v1[c] = (controllers, path)
    return v2, v1


def _chain(mount: Path, path: str) -> list[Path]:
    """The group's folder under `mount` and its ancestors up to `mount`, innermost first, those that exist.

    In a container the path names the host's hierarchy, which does not exist under the container's mount (the
    container's own group is mounted as the root): then only the mount itself is left, which is that group.
    A path going up (`/..`, outside a cgroup namespace) says nothing about the mount: the root only."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        parts = []
    dirs = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _group_dirs(controller: str, proc_root: Path, cgroup_root: Path) -> tuple[list[Path], list[Path]]:
    """(v2 folders, v1 folders) whose limits for `controller` apply to this process, innermost first."""
    v2_path, v1 = _memberships(proc_root)
    v2 = _chain(cgroup_root, v2_path) if v2_path is not None else []
    v1_dirs: list[Path] = []
    if controller in v1:
        controllers, path = v1[controller]
        # a v1 hierarchy is mounted under its controller list ("cpu,cpuacct"), usually linked as each name too
        for name in dict.fromkeys((controller, controllers)):
            if (cgroup_root / name).is_dir():
                v1_dirs = _chain(cgroup_root / name, path)
                break
    return v2, v1_dirs


def _limit_value(text: str | None) -> int | None:
    """A memory limit in bytes from a cgroup file; None for "max", the v1 "unlimited" value, or garbage."""
    try:
        value = int((text or "").strip())
    except ValueError:
        return None
    return value if 0 < value < UNLIMITED else None


@dataclass(frozen=True)
class MemoryLimit:
    bytes: int  # what this process may use: min(ram, cgroup)
    ram: int  # the machine's physical memory
    cgroup: int | None  # the smallest memory limit of this process's cgroup and its ancestors; None: none
    source: str  # "RAM" or "cgroup limit (<the file it came from>)"

    def __str__(self) -> str:
        return f"{human_bytes(self.bytes)}, {self.source}"


def memory_limit(
    *, proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup"), ram: int | None = None
) -> MemoryLimit:
    """The memory this process may use: the smaller of the physical RAM (psutil, macOS too) and the memory
    limit of its cgroup, v2 (`memory.max`) or v1 (`memory.limit_in_bytes`), the smallest on the way from the
    process's own group up to the root (a limit on an ancestor applies to everything below it). A file that
    is missing or does not hold a number gives no limit; nothing here raises."""
    ram = psutil.virtual_memory().total if ram is None else ram
    v2, v1 = _group_dirs("memory", proc_root, cgroup_root)
    found = [(d / "memory.max", _limit_value(_read_small(d / "memory.max"))) for d in v2]
    found += [
        (d / "memory.limit_in_bytes", _limit_value(_read_small(d / "memory.limit_in_bytes"))) for d in v1
    ]
    limits = [(value, file) for file, value in found if value is not None]
    if not limits:
        return MemoryLimit(ram, ram, None, "RAM")
    cgroup, file = min(limits)
    if cgroup >= ram:
        return MemoryLimit(ram, ram, cgroup, "RAM")
    where = file.relative_to(cgroup_root) if file.is_relative_to(cgroup_root) else file
    return MemoryLimit(cgroup, ram, cgroup, f"cgroup limit ({where})")


def _quota_value(quota: str | None, period: str | None) -> int | None:
    """CPUs a quota allows, rounded up (a 1.5-CPU quota still runs two threads); None: no quota or garbage."""
    try:
        q, p = int((quota or "").strip()), int((period or "").strip())
    except ValueError:
        return None
    return math.ceil(q / p) if q > 0 and p > 0 else None


def cpu_quota(*, proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPUs this process's cgroup CPU quota allows (the smallest on the way up to the root), or None:
    v2 `cpu.max` ("QUOTA PERIOD", "max PERIOD" for none), v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`
    (quota -1 for none), ceil(quota / period)."""
    v2, v1 = _group_dirs("cpu", proc_root, cgroup_root)
    quotas = []
    for d in v2:
        fields = (_read_small(d / "cpu.max") or "").split()
        quotas.append(_quota_value(*fields) if len(fields) == 2 else None)
    for d in v1:
        quotas.append(_quota_value(_read_small(d / "cpu.cfs_quota_us"), _read_small(d / "cpu.cfs_period_us")))
    return min((q for q in quotas if q is not None), default=None)


# --- threads -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Threads:
    n: int  # threads for llama.cpp
    cores: int  # cores this process may use: physical, within its CPU affinity and cgroup quota
    busy: float  # CPUs other processes keep busy
    reason: str  # e.g. "2 physical cores, 1.0 busy with other processes"

    def __str__(self) -> str:
        return f"{self.n} ({self.reason})"


def choose_threads(*, physical: int, allowed: int | None, quota: int | None, busy: float) -> Threads:
    """n = max(1, cores - round(busy)), at most cores, where cores = physical cores limited by the CPUs the
    affinity allows and by the cgroup quota. Affinity counts logical CPUs: without the topology, fewer allowed
    CPUs than physical cores is taken as that many cores (a core's second hyperthread adds little to
    llama.cpp, whose work is memory-bound). Busy CPUs are subtracted because a llama.cpp thread that has to
    share its core with another program makes every other thread wait at each synchronisation."""
    physical = max(1, physical)
    cores, why = physical, []
    if allowed is not None and allowed < cores:
        cores, why = max(1, allowed), [f"CPU affinity {allowed}"]
    if quota is not None and quota < cores:
        cores, why = max(1, quota), [*why, f"cgroup CPU quota {quota}"]
    busy = max(0.0, busy)
    n = min(cores, max(1, cores - round(busy)))
    what = f"{physical} physical core{'s' if physical != 1 else ''}"
    if why:
        what = f"{cores} of {what} ({', '.join(why)})"
    load = "idle" if busy < 0.05 else f"{busy:.1f} busy with other processes"
    return Threads(n, cores, busy, f"{what}, {load}")


def _allowed_cpus() -> set[int] | None:
    """The logical CPUs this process may run on; None where the platform does not say (macOS)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def busy_cpus(allowed: set[int] | None = None, interval: float = 0.25) -> float:
    """How many CPUs (of `allowed`, else all) are busy over the next `interval` seconds. Called between stages,
    this process is idle meanwhile, so it is other processes' load. Not the load average: it lags by minutes
    and would count our own previous stage."""
    per_cpu = psutil.cpu_percent(interval=interval, percpu=True)
    if allowed and max(allowed) < len(per_cpu):
        per_cpu = [per_cpu[i] for i in allowed]
    return sum(per_cpu) / 100


THREADS_ENV = "LLAMA_ARG_THREADS"  # llama.cpp's own environment variable for -t (llama-server, llama-cli)


def threads_from_env(value: str) -> int:
    """`LLAMA_ARG_THREADS` as llama.cpp's tools take it: a positive thread count."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 1024:
        raise EdgemergeError(
            f"{THREADS_ENV}={shown(value)} is not a thread count; set it to a number from 1 to 1024"
        )
    return n


def default_threads(
    *, busy: float | None = None, proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> Threads:
    """The thread count for llama.cpp now: `LLAMA_ARG_THREADS` when set (as llama.cpp's tools read it), else
    `choose_threads` on this machine; `busy` measured when not given (0.25 s)."""
    logical = psutil.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    if os.environ.get(THREADS_ENV):
        n = threads_from_env(os.environ[THREADS_ENV])
        return Threads(n, max(n, physical), 0.0, f"{THREADS_ENV}={n}")
    allowed = _allowed_cpus()
    if busy is None:
        busy = busy_cpus(allowed)
    quota = cpu_quota(proc_root=proc_root, cgroup_root=cgroup_root)
    return choose_threads(
        physical=physical, allowed=len(allowed) if allowed else None, quota=quota, busy=busy
    )


# --- model shapes and memory estimates -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    file_bytes: int
    n_layer: int
    n_embd: int
    n_ff: int  # the largest feed-forward width of any layer
    n_vocab: int
    kv_bytes_per_token: int  # llama.cpp's KV cache (f16 K and V) per token of context, all layers
    largest_tensor_elements: int
    n_head: int  # attention heads (the most of any layer): the compute buffer's K*Q grows with it


_MAX_COUNT = 1 << 32  # llama.cpp reads these keys as uint32


def _count(
    path: Path, kv: dict[str, Any], key: str, n_layer: int | None, default: Any = None
) -> list[int] | int:
    """A non-negative count from the header: an int, or with `n_layer` given a per-layer array of that length."""
    value = kv.get(key, default)
    if value is None:
        raise EdgemergeError(f"{path} has no {key}; it is not a model llama.cpp can load")
    items = value if isinstance(value, list) and n_layer is not None else [value]
    if not items or any(
        isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < _MAX_COUNT for v in items
    ):
        raise EdgemergeError(f"{path}: {key} is {shown(value)}, not a count; re-create the file")
    if isinstance(value, list):
        if len(value) != n_layer:
            raise EdgemergeError(
                f"{path}: {key} has {len(value)} values for {n_layer} layers; re-create the file"
            )
        return value
    return value


def kv_bytes_per_token(
    n_layer: int,
    head_count: list[int] | int,
    head_count_kv: list[int] | int,
    n_embd: int,
    key_length: int | None,
    value_length: int | None,
) -> int:
    """sum over layers of n_head_kv * (k_dim + v_dim) * 2 bytes (llama.cpp's default f16 cache), k_dim and v_dim
    the key/value head sizes (`attention.key_length` / `value_length`, else n_embd / n_head). Scalars are
    multiplied out, not looped over: a header's block_count is untrusted."""

    def dims(h: int) -> int:  # key + value head size of a layer with h heads
        k = key_length if key_length is not None else (n_embd // h if h else 0)
        return k + (value_length if value_length is not None else (n_embd // h if h else 0))

    if not isinstance(head_count, list) and not isinstance(head_count_kv, list):
        return n_layer * head_count_kv * dims(head_count) * 2
    heads = head_count if isinstance(head_count, list) else [head_count] * n_layer
    kv_heads = head_count_kv if isinstance(head_count_kv, list) else [head_count_kv] * n_layer
    return sum(hkv * dims(h) * 2 for h, hkv in zip(heads, kv_heads))


def model_shape(path: Path) -> ModelShape:
    """The shape of a GGUF model from its header (`<arch>.block_count`, `embedding_length`,
    `feed_forward_length`, `attention.head_count[_kv]` as an int or per layer, `attention.key_length` /
    `value_length`; the vocabulary from `tokenizer.ggml.tokens` or `<arch>.vocab_size`). A file without tensors
    (a vocabulary-only GGUF) gets the largest of the embedding and a feed-forward matrix as its largest
    tensor."""
    path = Path(path)
    info = read_gguf(path)
    kv = info.kv
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise EdgemergeError(f"{path} has no general.architecture; it is not a model llama.cpp can load")
    n_layer = _count(path, kv, f"{arch}.block_count", None)
    n_embd = _count(path, kv, f"{arch}.embedding_length", None)
    n_ff = _count(path, kv, f"{arch}.feed_forward_length", n_layer, default=0)
    heads = _count(path, kv, f"{arch}.attention.head_count", n_layer)
    kv_heads = _count(path, kv, f"{arch}.attention.head_count_kv", n_layer, default=heads)
    k_len = (
        _count(path, kv, f"{arch}.attention.key_length", None)
        if f"{arch}.attention.key_length" in kv
        else None
    )
    v_len = (
        _count(path, kv, f"{arch}.attention.value_length", None)
        if f"{arch}.attention.value_length" in kv
        else None
    )
    tokens = kv.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens) if isinstance(tokens, list) else _count(path, kv, f"{arch}.vocab_size", None)
    n_ff_max = max(n_ff) if isinstance(n_ff, list) else n_ff
    largest = max((math.prod(t.shape) for t in info.tensors), default=0) or n_embd * max(n_vocab, n_ff_max)
    return ModelShape(
        file_bytes=path.stat().st_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=n_ff_max,
        n_vocab=n_vocab,
        kv_bytes_per_token=kv_bytes_per_token(n_layer, heads, kv_heads, n_embd, k_len, v_len),
        largest_tensor_elements=largest,
        n_head=max(heads) if isinstance(heads, list) else heads,
    )


# Python, numpy, torch and llama-cpp-python in the build's process: README's merge table measures 0.23 GB for
# Python + torch; llama.cpp's library and the evaluation's data add a little
PROCESS_BASELINE = 250 * MiB


KV_PAD = 256  # llama.cpp rounds the context up to a multiple of 256 cells


def compute_buffer(shape: ModelShape, *, n_kv: int, n_ubatch: int = 512, flash_attn: bool = False) -> int:
    """llama.cpp's CPU compute buffer (the graph's scratch for one micro-batch, reserved at context creation):

        4 bytes * n_ubatch * max(n_vocab + 2 * n_embd,                      the output layer
                                 n_head * n_kv + n_kv + 7 * n_embd)         one layer's attention

    n_kv is the KV cells one attention spans (the whole context with a unified cache or one sequence, n_ctx /
    n_seq per sequence otherwise). The attention holds the K*Q scores of every head (softmax runs in place),
    the mask and about 5 * n_embd + 2 * n_embd_kv per token (7 * n_embd covers a cache without GQA); flash
    attention (`flash_attn`) never materialises K*Q, so its term drops. The feed-forward phase is smaller
    than the output layer on these shapes.

    Fitted to llama.cpp's "compute buffer size" log lines (llama-cpp-python 0.3.36, CPU, 2 Dec 2026); MiB
    measured -> this formula:
    bench-1b-eu (Llama 1.1B: n_vocab 32000, n_embd 2048, n_head 32; F16 and Q4_K_M alike), n_ubatch 512:
    n_kv 512: 70.50 -> 70.50, 1024: 87.01 -> 94.0, 2048: 153.01 -> 160.0, 2048 with n_ubatch 256: 76.50 ->
    80.0, 2048 with flash attention: 70.50 -> 70.50, 4 sequences of 512 (not unified): 70.50 -> 70.50;
    stories260K (n_vocab 512, n_embd 64, n_head 8): n_kv 512: 9.76 -> 9.88, 2048: 36.76 -> 36.88, 2048 with
    n_ubatch 256: 18.38 -> 18.44, 2048 with flash attention: 3.52 -> 4.88.
    """
    attention = (0 if flash_attn else shape.n_head * n_kv) + n_kv + 7 * shape.n_embd
    return 4 * n_ubatch * max(shape.n_vocab + 2 * shape.n_embd, attention)


def eval_memory(
    shape: ModelShape,
    *,
    n_seq: int,
    n_ctx_seq: int,
    n_batch: int = 512,
    flash_attn: bool = False,
    kv_unified: bool = False,
) -> dict[str, int]:
    """The parts of one llama.cpp evaluation's peak memory, in bytes:

    - weights: the whole file (memory-mapped: page cache, but a cgroup counts it and a laptop must hold it, or
      every batch reads it from disk again);
    - kv_cache: n_seq * n_ctx_seq * kv_bytes_per_token (f16 K and V, every layer; the context rounded up to
      KV_PAD cells as llama.cpp does);
    - compute: llama.cpp's compute buffer (`compute_buffer`) for micro-batches of min(n_batch, 512, context)
      tokens; attention spans n_ctx_seq cells, or the whole context with `kv_unified` (llama.cpp's default is
      not unified; flash attention off is llama-cpp-python's default);
    - logits: n_batch * n_vocab * 4 bytes of llama.cpp's output buffer, and as much again for our numpy copy;
    - process: PROCESS_BASELINE.
    """
    if min(n_seq, n_ctx_seq, n_batch) < 1:
        raise ValueError(
            f"n_seq, n_ctx_seq and n_batch must be positive, got {n_seq}, {n_ctx_seq}, {n_batch}"
        )
    n_ctx = -(-n_seq * n_ctx_seq // KV_PAD) * KV_PAD
    n_kv = n_ctx if kv_unified or n_seq == 1 else n_ctx // n_seq
    n_ubatch = min(n_batch, 512, n_seq * n_ctx_seq)  # llama.cpp caps the batch at the requested context
    return {
        "weights": shape.file_bytes,
        "kv_cache": n_ctx * shape.kv_bytes_per_token,
        "compute": compute_buffer(shape, n_kv=n_kv, n_ubatch=n_ubatch, flash_attn=flash_attn),
        "logits": 2 * n_batch * shape.n_vocab * 4,
        "process": PROCESS_BASELINE,
    }


# llama.cpp's quantizer in its child process (quantize.py): Python started with -I and llama-cpp-python
QUANTIZE_BASELINE = 60 * MiB


def quantize_memory(shape: ModelShape) -> int:
    """Peak memory of quantizing `shape`'s file: llama.cpp converts one tensor at a time to float32 (4 bytes an
    element), keeps its f16 source read (2) and writes the quantized copy (at most 1, Q8_0's 1.06), so
    largest_tensor_elements * (4 + 2 + 1) + QUANTIZE_BASELINE. Fitted to README's "quantizing alone" peaks for
    the bench families (largest tensor: the 32000-token embedding, 512 / 1024 / 2048 wide): 0.18, 0.29,
    0.51 GB measured, 0.18, 0.29, 0.52 GB by this formula."""
    return shape.largest_tensor_elements * (4 + 2 + 1) + QUANTIZE_BASELINE


# the merge's streaming state uses the tensor layer's own constants (BLOCK_ELEMENTS, PENDING_BYTES); fitted so that merge_memory(2048) is README's measured peak of `edgemerge merge --gguf` at 1b (0.54 GB, a
# 1.1B Llama, hidden 2048, instruct + base + one language); at 50m and 300m it measured 0.42 and 0.43 GB
MERGE_MEASURED = (2048, 540_000_000)


def _merge_streaming(n_embd: int, n_inputs: int) -> int:
    reads = 2 * n_inputs * BLOCK_ELEMENTS * 2  # one bf16 block of each input merged, the next one read ahead
    work = (n_inputs + 1) * BLOCK_ELEMENTS * 4  # float32 copies of the inputs' blocks and the result
    whole = (
        3 * n_embd * n_embd * 2
    )  # a q projection the GGUF sink permutes: assembled, permuted, queued (f16)
    return reads + work + PENDING_BYTES + whole


MERGE_BASELINE = MERGE_MEASURED[1] - _merge_streaming(MERGE_MEASURED[0], 3)


def merge_memory(n_embd: int, n_inputs: int = 3) -> int:
    """Peak memory of the streaming merge into GGUF: MERGE_BASELINE (Python, torch, transformers, the
    vocabulary) + the streaming state, which does not grow with the model's size: 2 * n_inputs blocks of
    BLOCK_ELEMENTS bf16 values (merged, read ahead), (n_inputs + 1) float32 blocks, PENDING_BYTES bytes
    queued for the writer, and the one tensor assembled whole, a Llama q projection of n_embd^2 f16 values,
    three times (assembled, permuted, queued). An 8B Llama (hidden 4096, 3 inputs): 0.62 GB."""
    return MERGE_BASELINE + _merge_streaming(n_embd, n_inputs)


def fits(need: int, limit: MemoryLimit, margin: float = 0.9) -> bool:
    """Whether `need` bytes fit in `limit`, leaving (1 - margin) of it for the operating system, the page cache
    of everything else and the other programs running (a laptop's browser)."""
    return need <= margin * limit.bytes
