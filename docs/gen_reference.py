"""Generate docs/reference.md from the callbacks' and plugins' signatures and docstrings.

    .venv/bin/python docs/gen_reference.py          # rewrite docs/reference.md
A test (tests/test_docs.py) fails when the file is out of date.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

OUT = Path(__file__).with_name("reference.md")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing
NAMESPACES = ("lightning_quant.callbacks", "lightning_quant.plugins")


def render() -> str:
    lines = ["# Callbacks and plugins reference", "",
             "Generated from the code by `docs/gen_reference.py`; `tests/test_docs.py` keeps it in sync.", ""]
    for ns in NAMESPACES:
        mod = importlib.import_module(ns)
        lines += [f"## `{ns}`", ""]
        for name in sorted(mod._EXPORTS):
            obj = getattr(mod, name)
            sig = str(inspect.signature(obj.__init__)).replace("(self, ", "(").replace("(self)", "()")
            lines += [f"### `{name}`", "", "```python", f"{name}{sig}", "```", "",
                      inspect.cleandoc(obj.__doc__ or "(undocumented)"), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
