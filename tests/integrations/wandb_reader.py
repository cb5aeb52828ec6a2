"""Read back an offline W&B run (``run-*.wandb``) without the network: history rows as dicts.

The file is a 7-byte header followed by LevelDB-style log records (32 KiB blocks; each record:
crc32 (4 bytes), length (2, little endian), type (1: full, 2: first, 3: middle, 4: last)) whose
payloads are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32768


def read_history(run_dir: str | Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(Path(run_dir).glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B", "not a W&B datastore file"
    pos, buf, rows = 7, b"", []
    while pos + 7 <= len(data):
        left = _BLOCK - (pos % _BLOCK)
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        buf += data[pos : pos + length]
        pos += length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                row = {}
                for item in rec.history.item:
                    key = item.key or ".".join(item.nested_key)
                    row[key] = json.loads(item.value_json)
                rows.append(row)
    return rows


def offline_run_dir(save_dir: str | Path) -> Path:
    runs = sorted(Path(save_dir).glob("wandb/offline-run-*"))
    assert runs, f"no offline W&B run under {save_dir}"
    return runs[-1]
