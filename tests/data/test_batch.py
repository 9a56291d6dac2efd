"""Batch and collate: the subject ids travel with the slices."""

import pytest
import torch

from data.batch import Batch, Sample, collate


def _sample(path: str, subject: str = "") -> Sample:
    return Sample(image=torch.zeros(1, 4, 4), anomaly_mask=None, brain_mask=None, label=0, path=path, subject=subject)


def test_collate_keeps_subjects_and_falls_back_to_the_path():
    batch = collate([_sample("a.npy", "s1"), _sample("b.npy", "s1"), _sample("c.npy")])
    assert batch.subject == ("s1", "s1", "c.npy")
    assert Batch(image=torch.zeros(2, 1, 4, 4), path=("x", "y")).subject == ("x", "y")
    with pytest.raises(ValueError, match="2 entries for 3 paths"):
        Batch(image=torch.zeros(3, 1, 4, 4), path=("x", "y", "z"), subject=("s", "t"))
