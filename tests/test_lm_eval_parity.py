"""Our benchmark scores equal lm-evaluation-harness's own, run by lm-eval itself (its task files, its `gguf`
model) against llama-cpp-python's server on the same GGUF and the same local data (tools/lm_eval_parity.py):
per question the same chosen answer, per task the same acc / acc_norm within 1e-6, and the same
log-likelihood differences between a question's answers (the SentencePiece offset is explained there)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .shared import need_shared

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import lm_eval_parity


@pytest.mark.slow
def test_scores_equal_lm_eval_through_llama_cpp_server(tmp_path):
    why = lm_eval_parity.missing_requirements()
    if why:
        pytest.skip(why)
    model = need_shared("models", "stories260K", "stories260K.gguf")
    data = need_shared("bench")
    tasks = [  # the prompts at more shots are compared with lm-eval's own in test_eval_harness.py
        ("eus_trivia", 1),
        ("eus_exams_eu_ejadministrari", 0),
        ("truthfulqa-multi_mc1_eu", 0),
        ("truthfulqa-multi_mc2_en", 1),
    ]
    rows = lm_eval_parity.compare(model, data, tasks, 6, tmp_path, threads=1, n_ctx=2048)
    for c in rows:
        assert c.questions == 6
        assert c.same_choice == c.questions, c
        for metric, (theirs, ours) in c.metrics.items():
            assert abs(theirs - ours) <= 1e-6, (c.task, metric, theirs, ours)
        assert c.max_ll_diff < 1e-3, c
