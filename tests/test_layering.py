"""The house plan's layering, enforced: each room of edgemerge imports only the rooms it stands on, and no two
modules import each other (directly or in a ring). ../shared/docs/architecture.md draws the picture."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgemerge"

# room -> the modules in it (dotted prefixes under edgemerge); a module belongs to the longest matching prefix
ROOMS: dict[str, tuple[str, ...]] = {
    "util": ("", "errors", "limits", "files", "memory", "progress", "interrupts", "child", "hashes"),
    "tensors": ("tensors",),
    "formats": ("trust", "model_json", "chat_format"),  # what a model folder's JSON and templates may say
    "methods": ("merge.methods", "merge.backends"),
    "recipe": ("recipe",),
    "sources": ("sources", "public"),
    "check": ("check",),
    "merge": ("merge",),
    "gguf": ("gguf",),
    "pipeline": ("pipeline",),
    "resources": ("resources", "memory_plan"),
    "runtime": ("runtime", "matmuls", "cpu_buffers"),
    "imatrix": ("imatrix",),
    "quantize": ("quantize",),
    "evaluate": ("evaluate",),
    "package": ("package",),
    "publish": ("publish",),
    "demo": ("demo",),
    "build": ("build",),
    "sweep": ("sweep",),
    "cli": ("cli", "__main__"),  # `python -m edgemerge` is the command line too
}

# room -> the rooms it may use (besides itself); `util` is open to every room
USES: dict[str, set[str]] = {
    "util": set(),
    "tensors": set(),
    "formats": set(),
    "methods": set(),
    "recipe": {"methods"},
    "sources": {"tensors", "recipe"},
    "check": {"tensors", "formats", "sources"},
    "merge": {"tensors", "methods", "recipe", "sources", "check"},
    "gguf": {"tensors", "formats"},  # never merge
    "pipeline": {"tensors", "formats", "methods", "recipe", "sources", "check", "merge", "gguf"},
    "resources": {"tensors", "gguf"},
    "runtime": {"formats", "gguf", "resources"},
    "imatrix": {"gguf", "runtime", "evaluate"},  # their files, computing them; langid checks the text
    "quantize": {"gguf", "runtime", "imatrix"},
    "evaluate": {"recipe", "gguf", "resources", "runtime"},
    "package": {"formats", "recipe", "sources", "gguf", "evaluate"},
    "publish": {"gguf", "package"},  # a finished folder to the hub: its manifest and card, GGUF shards
    "demo": {"recipe"},
    "build": set(ROOMS) - {"build", "sweep", "cli"},
    "sweep": set(ROOMS) - {"sweep", "cli"},  # a sweep is many builds' stages, scored and compared
    "cli": set(ROOMS) - {"cli"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def room_of(module: str) -> str:
    best, room = -1, None
    for name, prefixes in ROOMS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".") or prefix == "") and len(prefix) > best:
                best, room = len(prefix), name
    assert room is not None, module
    return room


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The edgemerge modules a file imports (relative imports resolved), as dotted names under edgemerge."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and (node.module == "edgemerge" or node.module.startswith("edgemerge.")):
                target = node.module.removeprefix("edgemerge").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import x` may import the submodule x
                sub = f"{target}.{alias.name}" if target else alias.name
                out.add(
                    sub
                    if (PACKAGE / sub.replace(".", "/")).with_suffix(".py").exists()
                    or (PACKAGE / sub.replace(".", "/")).is_dir()
                    else target
                )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("edgemerge."):
                    out.add(alias.name.removeprefix("edgemerge."))
    return out


FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_room():
    assert all(room_of(module_name(f)) for f in FILES)


@pytest.mark.parametrize("path", FILES, ids=[module_name(f) or "edgemerge" for f in FILES])
def test_rooms_use_only_the_rooms_they_stand_on(path):
    room = room_of(module_name(path))
    allowed = USES[room] | {room, "util"}
    bad = {m: room_of(m) for m in imports(path, top_level_only=False) if room_of(m) not in allowed}
    assert not bad, f"{module_name(path)} ({room}) imports {bad}; allowed rooms: {sorted(allowed)}"


def test_the_room_graph_has_no_cycle():
    """Checked on the allowed graph itself, so the table above cannot grow a ring either."""
    done: set[str] = set()

    def visit(room: str, path: tuple[str, ...]) -> None:
        assert room not in path, f"rooms in a ring: {' -> '.join((*path, room))}"
        if room in done:
            return
        for other in USES[room] - {room, "util"}:
            visit(other, (*path, room))
        done.add(room)

    for room in USES:
        visit(room, ())


def test_no_import_cycle_between_modules():
    """No ring of modules importing each other, at any length (function-level imports count too)."""
    graph = {module_name(f): imports(f, top_level_only=False) for f in FILES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph.get(module, ())):
            if other == module or module.startswith(other + "."):
                continue  # a package's own __init__ (its version string, its registry)
            if state.get(other) == 1:
                ring = path[path.index(other) :] + [other]
                raise AssertionError(f"import cycle: {' -> '.join(ring)}")
            if state.get(other) is None and other in graph:
                visit(other, [*path, other])
        state[module] = 2

    for module in sorted(graph):
        if state.get(module) is None:
            visit(module, [module])
