"""Write the README's table of model families from the registry (edgemerge.gguf.arch.family_table).

python tools/family_table.py          # rewrites the table in README.md in place
python tools/family_table.py --check  # exit 1 if README.md's table is not the registry's
"""

from __future__ import annotations

import sys
from pathlib import Path

from edgemerge.gguf.arch import family_table

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| family | Hugging Face architectures | llama.cpp architecture |"


def readme_with_table(text: str, table: str) -> str:
    """`text` with its family table (the header line up to the first line that is not a table row) replaced."""
    start = text.index(HEADER)
    end = start
    for line in text[start:].splitlines(keepends=True):
        if not line.startswith("|"):
            break
        end += len(line)
    return text[:start] + table + text[end:]


if __name__ == "__main__":
    current = README.read_text(encoding="utf-8")
    wanted = readme_with_table(current, family_table())
    if "--check" in sys.argv:
        sys.exit(0 if wanted == current else 1)
    README.write_text(wanted, encoding="utf-8")
    print(f"family table written to {README}")
