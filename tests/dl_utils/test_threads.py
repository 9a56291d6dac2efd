"""The CPU thread policy: settings refused at their YAML path, idle cores from /proc/stat, what each policy sets."""

from __future__ import annotations

import pytest
import torch

from dl_utils import threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("value", "message"), [
    (0, "experiment.threads: a thread count must be >= 1, got 0"),
    ("fast", "experiment.threads: 'fast' is not one of auto, torch, free (or a positive integer)"),
    (True, "experiment.threads: expected one of auto, torch, free or a positive integer, got True"),
    (1.5, "experiment.threads: expected one of auto, torch, free or a positive integer, got 1.5"),
])
def test_bad_settings_are_refused_naming_the_key(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        threads.check_setting(value)


def test_free_cores_counts_the_idle_share_of_the_machine(monkeypatch):
    # two samples of (idle, total) jiffies: 150 of 400 idle in between, on 4 cores = 1.5 idle cores -> 2
    samples = iter([(1000, 4000), (1150, 4400)])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    assert threads.free_cores(sample_s=0.0) == 2
    samples = iter([(1000, 4000), (1000, 4400)])  # nothing idle: still one thread
    assert threads.free_cores(sample_s=0.0) == 1
    monkeypatch.setattr(threads, "_cpu_times", lambda: None)  # no /proc/stat: every core
    assert threads.free_cores(sample_s=0.0) == 4


def test_free_cores_on_this_machine_is_between_one_and_its_cores():
    assert 1 <= threads.free_cores(sample_s=0.05) <= threads.available_cores()


def test_a_count_sets_torch_and_is_recorded(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    record = threads.apply_policy(2)
    assert torch.get_num_threads() == 2
    assert (record["setting"], record["policy"], record["threads"]) == (2, 2, 2)


def test_auto_keeps_an_environment_thread_count(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    record = threads.apply_policy("auto")
    assert (record["policy"], record["threads"]) == ("environment", 1)


def test_free_uses_the_idle_cores(monkeypatch, restore_threads):
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    torch.set_num_threads(2)
    record = threads.apply_policy("free")
    assert torch.get_num_threads() == 1 and (record["policy"], record["free_cores"]) == ("free", 1)


def test_prepare_environment_never_overrides_the_users_wait_policy(monkeypatch):
    monkeypatch.setattr(threads, "WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.prepare_environment()
    assert threads.os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    threads.prepare_environment()
    assert threads.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_auto_without_an_environment_count_applies_the_chosen_policy(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    torch.set_num_threads(2)
    record = threads.apply_policy("auto")
    assert threads.AUTO_POLICY == "free"  # docs/performance.md, "CPU threads"
    assert (record["setting"], record["policy"], record["threads"], record["free_cores"]) == ("auto", "free", 1, 1)
