"""Every ```python block of the README and of docs/*.md runs as written (on the CPU); a sketch with
placeholder paths is fenced ```py instead."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(page, i, block) for page in PAGES
          for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))]


def test_readme_and_docs_have_examples():
    pages = {page.name for page, _, _ in BLOCKS}
    assert {"README.md", "api.md", "teacher_cache.md"} <= pages, pages


@pytest.mark.parametrize("page, index, block", BLOCKS,
                         ids=[f"{page.relative_to(ROOT)}[{i}]" for page, i, _ in BLOCKS])
def test_example_runs(page, index, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"{page.relative_to(ROOT)}[python block {index}]", "exec"), {"__name__": "__readme__"})
