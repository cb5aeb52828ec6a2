"""Runtime selection shared by the kernel families: Triton on CUDA, the pure-torch reference elsewhere.

* ``LIGHTNING_QUANT_FORCE_REFERENCE=1`` (read at every call) forces the reference everywhere;
  every public wrapper also takes ``force_reference=True`` for one call.
* On CPU the wrappers always run the reference (the CPU path *is* the reference); the Triton
  launchers themselves can be called directly on CPU tensors under ``TRITON_INTERPRET=1``.
* ``TRITON_INTERPRET=1`` runs the Triton kernels on CPU tensors through Triton's interpreter
  (slow; used by the tests on small shapes). It is read when a kernel is first *built*, so each
  family keeps one compiled and one interpreted build.

Triton is imported lazily, the first time a kernel is built (``import lightning_quant`` never
imports it).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

__all__ = [
    "FORCE_REFERENCE_ENV",
    "check_device",
    "force_reference_from_env",
    "interpreting",
    "launch",
    "load_triton",
    "on_device",
    "recording_launches",
    "reference_forced",
    "split_workspace",
]

FORCE_REFERENCE_ENV = "LIGHTNING_QUANT_FORCE_REFERENCE"
_TRUE = {"1", "true", "yes", "on"}


def force_reference_from_env() -> bool:
    """True when ``LIGHTNING_QUANT_FORCE_REFERENCE`` is set to 1/true/yes/on."""
    return os.environ.get(FORCE_REFERENCE_ENV, "0").strip().lower() in _TRUE


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def load_triton():
    """``(triton, triton.language)``, imported on first use, with an install hint when missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError as err:  # pragma: no cover - triton is a Linux dependency
        raise ImportError(
            "The CUDA kernels of lightning_quant need Triton: `pip install triton` (Linux), or pass "
            f"force_reference=True / set {FORCE_REFERENCE_ENV}=1 to use the pure-torch reference."
        ) from err
    return triton, tl


def build_kernels(module_globals: dict, kernel, interpret: bool, tuned: dict[str, tuple], helpers: tuple = ()) -> dict:
    """``{"jit": triton.jit(kernel), name: autotuned jit, ...}`` for one kernel family, built on first use.

    ``module_globals`` (the kernel module's ``globals()``) receives ``tl``, which the kernel body reads when
    it compiles, and each of ``helpers`` (plain functions the kernel calls, e.g.
    :func:`lightning_quant.kernels._packed.packed_step`) jitted under its own name; the helper's own module
    receives ``tl`` too. ``tuned`` maps a name to ``(configs(triton) -> list, autotune keyword arguments)``;
    the interpreter cannot benchmark, so ``interpret`` returns the plain jit only (callers pass a fixed
    config).
    """
    triton, tl = load_triton()
    module_globals["tl"] = tl
    for helper in helpers:  # jitted once; bound in the kernel's module and in its own (helpers calling helpers)
        fn = getattr(helper, "fn", helper)
        fn.__globals__["tl"] = tl
        fn.__globals__["INTERPRETED"] = tl.constexpr(interpret)
        bound = fn.__globals__.get(fn.__name__)  # an earlier family's build already jitted it: reuse that
        jitted = bound if getattr(bound, "fn", None) is fn else helper if fn is not helper else triton.jit(helper)
        module_globals[fn.__name__] = fn.__globals__[fn.__name__] = jitted
    jit = triton.jit(kernel)
    if interpret:
        return {"jit": jit}
    return {"jit": jit, **{name: triton.autotune(configs=configs(triton), **kw)(jit)
                           for name, (configs, kw) in tuned.items()}}


def reference_forced(force_reference: bool | None) -> bool:
    """The per-call argument when given (``True``/``False``), else the environment variable."""
    return force_reference_from_env() if force_reference is None else bool(force_reference)


def check_device(*tensors: Tensor | None) -> torch.device:
    """All tensors on one device; returns it."""
    devs = {t.device for t in tensors if t is not None}
    if len(devs) != 1:
        raise ValueError(f"Kernel inputs must live on one device, got {sorted(str(d) for d in devs)}; move them with .to().")
    return devs.pop()


def on_device(t: Tensor):
    """Context making ``t``'s CUDA device current (Triton launches on the current device); no-op on CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


_RECORDER: list | None = None


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: every Triton launch of the package goes through here, so
    :func:`recording_launches` can count them (and skip them) on a machine without a GPU."""
    if _RECORDER is not None:
        _RECORDER.append(getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel)))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording_launches():
    """Within the block, Triton launches are recorded by kernel name (in the yielded list) instead of run."""
    global _RECORDER
    previous, _RECORDER = _RECORDER, []
    try:
        yield _RECORDER
    finally:
        _RECORDER = previous


_WORKSPACES: dict = {}


def split_workspace(device: torch.device, numel: int, tiles: int) -> tuple[Tensor, Tensor]:
    """The zeroed float32 partial-sum buffer (``>= numel`` elements, flat) and int32 tile arrival counters
    (``>= tiles``) of ``device``'s current stream, for the split-K kernels (decode GEMV, tensor-core
    split-K): created or grown once, left zeroed by every call (the last split of a tile resets its rows
    and its counter), so no memset per call."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (str(device), stream)
    ws, cnt = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < numel or cnt.numel() < tiles:
        ws = torch.zeros(max(numel, 0 if ws is None else ws.numel()), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(tiles, 0 if cnt is None else cnt.numel()), dtype=torch.int32, device=device)
        _WORKSPACES[key] = (ws, cnt)
    return ws, cnt
