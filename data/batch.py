"""The one batch type that travels from the loader to the model and the metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sample:
    """One preprocessed slice, as a dataset returns it.

    Attributes:
        image: [1,H,W] float32 in [0,1].
        anomaly_mask: [1,H,W] float32 in {0,1} (ground-truth lesion/box), or None when the set has no labels.
        brain_mask: [1,H,W] float32 in {0,1}; the row-aligned ``mask_dir`` mask (brain mask for healthy sets,
            healthy-tissue mask for fastMRI+-style pathological sets), or None when the set has none.
        label: 0 healthy, 1 pathological (image level).
        path: the image file it came from.
        subject: the subject (volume, scan) the slice belongs to: the split CSV's ``subject`` column, or the
            image path when the CSV has none (each image its own subject); empty means "use ``path``".
    """

    image: Tensor
    anomaly_mask: Tensor | None
    brain_mask: Tensor | None
    label: int
    path: str
    subject: str = ""


@dataclass(frozen=True)
class Batch:
    """A batch of slices; every tensor is [B,1,H,W] float32 except ``label`` ([B] long).

    Attributes:
        image: [B,1,H,W] in [0,1].
        anomaly_mask: [B,1,H,W] in {0,1}, or None when the dataset has no pixel labels.
        brain_mask: [B,1,H,W] in {0,1}, or None when the dataset has no masks.
        label: [B] long, 0 healthy / 1 pathological.
        path: B source paths.
        subject: B subject ids (slices of one volume share one); defaults to ``path`` (each image its own subject).
    """

    image: Tensor
    anomaly_mask: Tensor | None = None
    brain_mask: Tensor | None = None
    label: Tensor | None = None
    path: Sequence[str] = field(default_factory=tuple)
    subject: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.image.ndim != 4 or self.image.shape[1] != 1:
            raise ValueError(f"Batch.image must be [B,1,H,W], got {tuple(self.image.shape)}")
        for name in ("anomaly_mask", "brain_mask"):
            mask = getattr(self, name)
            if mask is not None and mask.shape != self.image.shape:
                raise ValueError(f"Batch.{name} shape {tuple(mask.shape)} != image shape {tuple(self.image.shape)}")
        if self.label is None:
            object.__setattr__(self, "label", torch.zeros(self.image.shape[0], dtype=torch.long,
                                                          device=self.image.device))
        if not self.subject:
            object.__setattr__(self, "subject", tuple(self.path))
        elif len(self.subject) != len(self.path):
            raise ValueError(f"Batch.subject has {len(self.subject)} entries for {len(self.path)} paths")

    def __len__(self) -> int:
        return self.image.shape[0]

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """Move every tensor to ``device``."""
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(self, image=move(self.image), anomaly_mask=move(self.anomaly_mask),
                       brain_mask=move(self.brain_mask), label=move(self.label))

    def pin_memory(self) -> Batch:
        """Pinned copy (DataLoader calls this when ``pin_memory=True``)."""
        def pin(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.pin_memory()

        return replace(self, image=pin(self.image), anomaly_mask=pin(self.anomaly_mask),
                       brain_mask=pin(self.brain_mask), label=pin(self.label))

    @property
    def healthy_tissue(self) -> Tensor | None:
        """[B,1,H,W] brain (or healthy-tissue) mask minus the anomaly mask; None without a brain mask."""
        if self.brain_mask is None:
            return None
        if self.anomaly_mask is None:
            return self.brain_mask
        return self.brain_mask * (1.0 - self.anomaly_mask)


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack samples into a :class:`Batch`; masks must be present in all samples or in none."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")

    def stack(name: str) -> Tensor | None:
        values = [getattr(s, name) for s in samples]
        present = [v is not None for v in values]
        if not any(present):
            return None
        if not all(present):
            missing = [s.path for s, p in zip(samples, present, strict=True) if not p]
            raise ValueError(f"{name} is missing for some samples of a batch: {missing[:3]}")
        return torch.stack(values)

    return Batch(
        image=torch.stack([s.image for s in samples]),
        anomaly_mask=stack("anomaly_mask"),
        brain_mask=stack("brain_mask"),
        label=torch.tensor([s.label for s in samples], dtype=torch.long),
        path=tuple(s.path for s in samples),
        subject=tuple(s.subject or s.path for s in samples),
    )
