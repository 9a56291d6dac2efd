"""Reads an offline wandb run file back (for tests only; relies on wandb 0.31 internals, pinned).

The ``.wandb`` file uses LevelDB-log framing: a 7-byte header, 32 KiB blocks, records with a 7-byte header
(crc32c u32, length u16, type u8: 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST); each payload is a wandb ``Record``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768


def iter_records(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb run file")
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - (pos % BLOCK)
        if left < 7:
            pos += left
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and rtype == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if rtype == 1:
            yield chunk
        elif rtype == 2:
            buf = chunk
        elif rtype == 3:
            buf += chunk
        elif rtype == 4:
            yield buf + chunk
            buf = b""


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(path: Path) -> dict[str, Any]:
    """History rows, config, summary, file list and run fields (name, group, job type) of one offline
    ``run-<id>.wandb`` file."""
    out: dict[str, Any] = {"history": [], "config": {}, "summary": {}, "files": [], "run": {}}
    for raw in iter_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "run":
            out["run"].update(name=record.run.display_name, group=record.run.run_group,
                              job_type=record.run.job_type)
            out["config"].update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "files":
            out["files"] += [f.path for f in record.files.files]
    return out


def find_run_file(run_dir: Path) -> Path:
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    if len(files) != 1:
        raise AssertionError(f"expected one offline wandb run under {run_dir}, found {files}")
    return files[0]
