"""`build`: recipe -> merged GGUF -> quantized GGUFs -> evaluation -> a folder ready to upload.

Stages are cached and resumable. Each stage has a key (sha256 of what determines its output: the recipe's
merge fields and the inputs' revisions/hashes for the merge, the merge key and the quant type for a quant, the
file's key and the eval settings for an eval); a finished stage is recorded with its key, its outputs (size,
mtime, sha256) and its time in the work area beside the output folder (`dist/.<name>.edgemerge/state.json`,
outside the folder so it uploads as is), rewritten atomically after every stage. A rerun skips every stage
whose key and outputs are unchanged, so an interrupted build (Ctrl-C, crash, power loss) restarts where it
stopped and a changed recipe redoes only what the change touches. Library calls write through
`atomic_output`, so partial files never carry a final name.

What a build may delete: the output folder and its work area carry edgemerge's marker (`files.MARKER`); only
a marked folder is ever treated as an earlier build, and only the files its state and manifest list (each path
resolved and kept inside the folder or its work area) are removed. The marker also says whether the build
finished: the card, Modelfile, eval.json and manifest are removed when a build starts changing the folder and
written again at its end, so they describe only a finished build.
"""

from .ladder import Budget, LadderChoice, Rung, choose_quant
from .options import BuildOptions, Plan, apply_overrides, check_options, check_quants
from .quant_auto import LadderResult
from .run import BuildResult, build
from .state import (
    PACKAGE_FILES,
    STATE_FILE,
    BuildState,
    StageEvent,
    StageRecord,
    Stages,
    build_lock,
    drop_stale,
    mark_finished,
    mark_unfinished,
    prepare_out,
    work_dir,
)
from .target import choose_recipe, demo_options

__all__ = [
    "PACKAGE_FILES",
    "STATE_FILE",
    "Budget",
    "BuildOptions",
    "BuildResult",
    "BuildState",
    "LadderChoice",
    "LadderResult",
    "Plan",
    "Rung",
    "StageEvent",
    "StageRecord",
    "Stages",
    "apply_overrides",
    "build",
    "build_lock",
    "check_options",
    "check_quants",
    "choose_quant",
    "choose_recipe",
    "demo_options",
    "drop_stale",
    "mark_finished",
    "mark_unfinished",
    "prepare_out",
    "work_dir",
]
