"""Atomic export directories and safetensors/JSON I/O (never pickle).

An export is written into a temporary sibling directory and moved into place only once every
file is complete and flushed, so a crash, an exception or Ctrl-C mid-write leaves the previous
export (if any) untouched and loadable. Replacing an existing export is two renames: the old
directory is moved aside, the new one moved in, then the old one deleted; if the second rename
fails the old directory is moved back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "INDEX_NAME",
    "SAFE_NAME",
    "atomic_directory",
    "check_dtype",
    "check_shape",
    "read_json",
    "read_tensors",
    "write_json",
    "write_tensors",
]

SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: shards above this size are split (the transformers default is 5 GB as well)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``path`` when the block exits normally.

    Raises ``FileExistsError`` when ``path`` exists and ``overwrite`` is False. On any exception
    (including ``KeyboardInterrupt``) the temporary directory is removed and ``path`` is unchanged.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"Export path {str(final)!r} already exists; pass overwrite=True to replace it "
                              "or choose another path.")
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"Export path {str(final)!r} is a file, not a directory; remove it or choose another path.")
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _move_into_place(tmp, final, final.parent / f".{final.name}.old-{tag}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, final: Path, aside: Path) -> None:
    if not final.exists():
        os.rename(tmp, final)
        return
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(path)!r} is missing; is this a lightning_quant export directory?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); the export is corrupted — re-export it.") from None
    if not isinstance(obj, dict):
        # the file's content is wrong (a corrupted export), not an argument's type
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(obj).__name__}.")  # noqa: TRY004
    return obj


def write_tensors(directory: Path, tensors: dict[str, Tensor], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  metadata: dict[str, str] | None = None) -> list[str]:
    """Write ``tensors`` as ``model.safetensors`` or, above ``max_shard_bytes``, as shards plus the
    transformers index file. Returns the file names written."""
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SAFE_NAME), metadata=meta)
        return [SAFE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(directory / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [INDEX_NAME]


def read_tensors(directory: str | os.PathLike) -> dict[str, Tensor]:
    """Read every tensor of an export (single file or sharded). Only safetensors; pickles are refused."""
    directory = Path(directory)
    if (directory / INDEX_NAME).exists():
        index = read_json(directory / INDEX_NAME)
        files = sorted(set(index.get("weight_map", {}).values()))
        if not files:
            raise ValueError(f"{str(directory / INDEX_NAME)!r} lists no shard files; the export is corrupted.")
    elif (directory / SAFE_NAME).exists():
        files = [SAFE_NAME]
    else:
        pickles = [p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES] if directory.is_dir() else []
        hint = (f" Found {pickles}: pickle files are never loaded (they can run code); convert them to "
                "safetensors first." if pickles else "")
        raise FileNotFoundError(f"No {SAFE_NAME} (or {INDEX_NAME}) in {str(directory)!r}.{hint}")
    tensors: dict[str, Tensor] = {}
    for fname in files:
        tensors.update(_read_safetensors(directory / fname))
    return tensors


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"Shard {str(path)!r} is missing; the export is incomplete — re-export it.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a valid safetensors file ({e}); only safetensors are read — "
                         "pickled checkpoints are refused. Re-export the model.") from None


def check_dtype(name: str, t: Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    """Raise ``ValueError`` naming the tensor when its dtype is not one of ``allowed``."""
    if t.dtype not in allowed:
        raise ValueError(f"Tensor {name!r} has dtype {t.dtype}; this format stores it as "
                         f"{' or '.join(str(a) for a in allowed)}. The file is corrupted or from another format.")


def check_shape(name: str, t: Tensor, expected: tuple[int, ...]) -> None:
    """Raise ``ValueError`` naming the tensor when its shape differs from ``expected``."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"Tensor {name!r} has shape {tuple(t.shape)} but the model's layer needs {tuple(expected)}; "
                         "the checkpoint does not match this model config (wrong bits/group size or architecture).")
