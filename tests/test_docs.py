"""Docs stay true to the code: the generated reference is current, and every page linked from
docs/index.md exists."""

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reference_is_up_to_date():
    render = runpy.run_path(str(ROOT / "docs" / "gen_reference.py"))["render"]
    assert (ROOT / "docs" / "reference.md").read_text() == render(), "run: .venv/bin/python docs/gen_reference.py"


def test_index_links_exist():
    index = (ROOT / "docs" / "index.md").read_text()
    links = re.findall(r"\]\(([^)#]+\.md)\)", index)
    assert links
    for link in links:
        assert (ROOT / "docs" / link).exists(), link
