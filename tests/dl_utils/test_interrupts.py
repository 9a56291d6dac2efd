"""Interruptions held back during atomic writes: the file is complete and the interruption still arrives."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from dl_utils import checkpoint as ckpt
from dl_utils.errors import RunInterrupted
from dl_utils.files import write_atomic, write_text_atomic
from dl_utils.interrupts import deferred_interrupts, interrupts_raise


def test_a_signal_raises_at_once_outside_a_write() -> None:
    reached = []
    with pytest.raises(RunInterrupted) as caught, interrupts_raise():
        signal.raise_signal(signal.SIGTERM)
        reached.append("after the signal")
    assert caught.value.signal_name == "SIGTERM" and reached == []


def test_a_signal_inside_a_write_is_raised_when_the_outermost_block_ends() -> None:
    reached = []
    with pytest.raises(RunInterrupted) as caught, interrupts_raise():
        with deferred_interrupts():
            with deferred_interrupts():
                signal.raise_signal(signal.SIGINT)
                reached.append("inner")
            reached.append("outer")  # the inner block does not raise: the outer write is not finished
        reached.append("after")
    assert caught.value.signal_name == "SIGINT" and reached == ["inner", "outer"]
    with interrupts_raise(), deferred_interrupts():  # nothing held over from the previous interruption
        pass


def test_a_failing_write_with_a_held_signal_reports_the_interruption_caused_by_the_failure() -> None:
    with pytest.raises(RunInterrupted) as caught, interrupts_raise(), deferred_interrupts():
        signal.raise_signal(signal.SIGTERM)
        raise OSError(28, "No space left on device", "x.pt")
    assert isinstance(caught.value.__cause__, OSError)


def test_sigterm_during_torch_save_leaves_a_complete_checkpoint_then_interrupts(tmp_path: Path,
                                                                               monkeypatch) -> None:
    real_save = torch.save

    def save_with_a_signal(obj, f, *args, **kwargs):  # the signal lands in the middle of the write
        signal.raise_signal(signal.SIGTERM)
        return real_save(obj, f, *args, **kwargs)

    path = tmp_path / "latest.pt"
    ckpt.save_checkpoint(path, {"step": 1})
    monkeypatch.setattr(torch, "save", save_with_a_signal)
    with pytest.raises(RunInterrupted), interrupts_raise():
        ckpt.save_checkpoint(path, {"step": 2, "weights": torch.arange(1000.0)})
    assert ckpt.load_checkpoint(path)["step"] == 2  # the new file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temporary file left behind


def test_text_writes_are_atomic_and_leave_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    write_text_atomic(path, "one")
    with pytest.raises(RunInterrupted), interrupts_raise(), deferred_interrupts():
        signal.raise_signal(signal.SIGTERM)
        write_text_atomic(path, "two")
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(path, fail)
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
