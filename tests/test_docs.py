"""Every ```python block in docs/ runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCKS = [(p.name, i, code) for p in sorted(DOCS.glob("*.md"))
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", p.read_text(), flags=re.S))]


@pytest.mark.parametrize("page,index,code", BLOCKS, ids=[f"{p}-{i}" for p, i, _ in BLOCKS])
def test_doc_example_runs(page, index, code):
    exec(compile(code, f"docs/{page}#{index}", "exec"), {})
