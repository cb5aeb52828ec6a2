"""Read back an offline W&B run (``run-*.wandb``) without the network: history rows as dicts.

The file is a 7-byte header followed by LevelDB-style log records (32 KiB blocks; each record:
crc32 (4 bytes), length (2, little endian), type (1: full, 2: first, 3: middle, 4: last)) whose
payloads are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

_BLOCK = 32768


def read_history(run_dir: str | Path, timeout: float = 60.0) -> list[dict]:
    """The run's history rows, once its datastore holds the ``exit`` record.

    ``run.finish()`` can return before wandb-core has flushed the file (seen on a loaded 2-core CI
    machine: the history rows were printed in the run summary but not yet on disk), so the file is
    read again until the run's last record is there; after ``timeout`` seconds it is an error.
    """
    deadline = time.monotonic() + timeout
    while True:
        rows, finished = _parse(next(Path(run_dir).glob("run-*.wandb")).read_bytes())
        if finished:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"the W&B datastore under {run_dir} has no exit record after {timeout:.0f} s")
        time.sleep(0.2)


def _parse(data: bytes) -> tuple[list[dict], bool]:
    """``(history rows, whether the exit record was read)``; a record cut off by a write in flight ends it."""
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B", "not a W&B datastore file"
    pos, buf, rows = 7, b"", []
    while pos + 7 <= len(data):
        left = _BLOCK - (pos % _BLOCK)
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # not written yet
            break
        pos += 7
        buf += data[pos : pos + length]
        pos += length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            which = rec.WhichOneof("record_type")
            if which == "exit":
                return rows, True
            if which == "history":
                row = {}
                for item in rec.history.item:
                    key = item.key or ".".join(item.nested_key)
                    row[key] = json.loads(item.value_json)
                rows.append(row)
    return rows, False


def offline_run_dir(save_dir: str | Path) -> Path:
    runs = sorted(Path(save_dir).glob("wandb/offline-run-*"))
    assert runs, f"no offline W&B run under {save_dir}"
    return runs[-1]
