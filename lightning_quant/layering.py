"""The package's layers, lowest first: a module imports only from its own layer or the layers below it.

This tuple is the one statement of that order; ``tests/test_layering.py`` walks every import of
``lightning_quant`` (statically, with ``ast``, function-level imports included) and fails on an import from
a lower layer to a higher one, or on any import cycle between modules. ``docs/architecture.md`` explains
each layer. Entries are top-level modules or packages of ``lightning_quant`` (``""`` is the package root).
"""

from __future__ import annotations

__all__ = ["LAYERS", "layer_of"]

#: ``(name, members)`` lowest first.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vocabulary", ("_lazy", "layering", "spec")),
    ("tensor maths", ("primitives", "packing")),
    ("result type", ("quantized", "observers")),
    ("model structure", ("adapters", "targets")),
    ("calibration engine", ("calibration",)),
    ("solvers", ("algorithms",)),
    ("kernels", ("kernels",)),
    ("layers", ("layers",)),
    ("method drivers", ("methods",)),
    ("entry points and training", ("api", "qat", "metrics", "data", "models")),
    ("integrations", ("integrations", "evaluation")),
    ("formats and reports", ("export", "report")),
    ("Lightning adapters and tools", ("callbacks", "plugins", "cli", "testing", "lit")),
    ("public namespace", ("",)),
)


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of a module path (``"lightning_quant.methods.awq"`` -> the method drivers)."""
    parts = module.split(".")
    if parts[0] != "lightning_quant":
        raise ValueError(f"{module!r} is not a lightning_quant module.")
    top = parts[1] if len(parts) > 1 else ""
    for i, (_, members) in enumerate(LAYERS):
        if top in members:
            return i
    raise ValueError(f"lightning_quant.{top} is in no layer of lightning_quant.layering.LAYERS; add it to the "
                     "layer it belongs to (what it imports decides the lowest layer it may sit in).")
