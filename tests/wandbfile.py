"""Reading W&B's offline run files (`run-*.wandb`) back in tests, with wandb's own protobuf records."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any


def read_wandb_records(path: Path) -> list[Any]:
    """Records of a .wandb file (a leveldb-style log of protobuf Records: 7-byte file header, 32 KiB blocks,
    7-byte record headers crc32/len/type with FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
    return records
