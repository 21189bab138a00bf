"""The offline demo: `edgemerge build --lang eu --demo` end to end, and its generated family."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

from edgemerge.demo import DATA_DIR, train_tokenizer


def test_demo_tokenizer_is_deterministic(tmp_path):
    lines = (DATA_DIR / "en.txt").read_text(encoding="utf-8").splitlines()
    a = train_tokenizer(lines, tmp_path / "a", 512)
    b = train_tokenizer(lines, tmp_path / "b", 512)
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a)
    assert tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_start|>") != tok.unk_token_id
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Kaixo"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nKaixo<|im_end|>\n<|im_start|>assistant\n"


def test_demo_command_runs_offline(tmp_path):
    env = dict(os.environ, EDGEMERGE_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", NO_COLOR="1")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    exe = shutil.which("edgemerge")
    cmd = [exe] if exe else [sys.executable, "-c", "from edgemerge.cli import main; main()"]
    proc = subprocess.run(
        [*cmd, "build", "--lang", "eu", "--demo", "--out", str(out), "--json"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    stderr = " ".join(proc.stderr.split())
    assert "tiny" in stderr and "meaningless" in stderr
    # the family's generation is said apart (not hidden from "Built in"); no progress bar lands in the log
    family = re.search(r"✓ demo family ([\d.]+) s", stderr)
    assert family is not None and float(family.group(1)) > 1, stderr
    assert "ETA" not in stderr and "━" not in stderr and "╭" not in stderr
    summary = json.loads(proc.stdout)
    assert summary["demo"] is True
    names = [f["name"] for f in summary["files"]]
    assert names[:3] == [f"edgemerge-demo-eu-{t}.gguf" for t in ("F16", "Q4_K_M", "Q8_0")]
    assert set(summary["eval"]) == set(names[:3])
    # the instruct model alone is evaluated too: the Basque language vector lowers Basque perplexity
    f16 = summary["eval"]["edgemerge-demo-eu-F16.gguf"]
    assert summary["parents"]["instruct"]["perplexity"] > f16["perplexity"]
    for name in names:
        assert (out / name).is_file()
    # the generated family lives in the cache, with a real SentencePiece tokenizer beside each model
    family = tmp_path / "cache" / "demo" / "eu-v2"
    assert (family / "instruct" / "tokenizer.model").is_file()
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "tiny" in card and "meaningless" in card
    print(f"demo build: {seconds:.1f} s")  # shown with -s; the README quotes the figure
