"""The embedded default benchmark: realistic healthy and pathological T1w slices that need no download.

Healthy "subjects" are drawn from the real ICBM 2009a nonlinear symmetric T1 template (1 mm, skull-stripped)
that nilearn ships offline. Each slice is a random oblique plane through the template volume:

- a random axial level in a mid-brain band (template voxel z in [``z_band``], MNI z ~ +4 to +26 mm, the level
  of the lateral ventricles, as the mid-axial slices of the reference study), tilted by up to 4 degrees
  (pitch/roll), rotated in plane by up to 8 degrees, scaled by 0.92-1.08 per axis, shifted by up to 4 mm;
- a smooth random elastic displacement (6x6 control grid, ~1.5-3 mm);
- a smooth multiplicative bias field (exp of a random quadratic, up to about +-25 %), a gamma change (0.85-1.15)
  and Rician noise (sigma 0.8-2.5 % of the white-matter level).

A subject has ``slices_per_subject`` parallel slices ``slice_spacing`` mm apart along the template z axis (its
*anchor* slice, index ``(k - 1) // 2``, at the drawn level): every draw above is the subject's, only the noise
draw is the slice's own. The plane is rendered at twice ``size`` and area-averaged, so the slices are not aliased.
Intensities are stored in fixed units, ``clip(x / ref, 0, 1)`` with ``ref`` = the subject's healthy brain 99th
percentile divided by 0.85 (white matter ~0.8) on its anchor slice, the same for all its slices (one scaling per
volume, as for real scans), so a lesion never changes the scaling of the healthy tissue around it; configs read
them with ``intensity: unit``. Brain masks are the template brain mask sampled with the same geometry.

Pathological classes (T1w appearance; each pathological subject is a fresh subject, and each of its slices is
rendered from the same random draws as its healthy *source* slice, i.e. the same subject, bias field and noise
draw, plus the pathology). The pathology is drawn once per subject on its anchor slice and is a 3-D object across
its slices: lesions are ellipsoids whose z semi-axis reaches 1.5 times beyond the outermost slice (so each slice
shows at least ~0.75 of the lesion's radius), the mass deforms less away from its centre, the ventricles are
dilated by the same strength on every slice:

- ``hyperintense_lesion``: a bright, irregular lesion (1.1-1.22 x white matter; e.g. subacute haemorrhage);
- ``hypointense_lesion``: a dark, irregular lesion (CSF-like to grey-matter-like; e.g. infarct, cavity);
- ``mass_effect``: a heterogeneous mass (darker core, slightly brighter rim) that displaces the surrounding tissue;
- ``enlarged_ventricles``: lateral ventricles dilated by a radial deformation; the anomaly is the newly CSF area;
- ``multifocal_lesions``: 3-14 small T1-hypointense foci (radius 1-5.5 px at 128) in white matter
  (MS-like "black holes").

Lesion sizes are balanced over three bins (per subject, on its anchor slice) defined on 128x128 pixels like the
reference study's ATLAS bins (small 1-70, medium 71-569, large >= 570 px; scaled by (size/128)^2 at other sizes);
every image's actual lesion size in pixels and its bin are columns of its class CSV (``lesion_px``, ``size_bin``).
The sizes of ``enlarged_ventricles`` follow from the dilation strength and are recorded the same way.

Masks. A pixel is *changed* when the noise-free pathological slice and its noise-free healthy source differ by
more than ``CHANGE`` = 0.05 in stored units (white matter ~0.8). Because both stored images carry the same
Rician noise draw and the noise and the clipping move two values by at most their difference, every pixel
whose *stored* images differ by more than 0.05 is changed in this sense. Per slice:

- the **anomaly mask** (inside the brain mask) is the lesion by design (soft lesion >= 0.5 at the rendering
  resolution, area-downsampled at >= 0.5) united with every pixel the lesion itself changed by more than 0.05
  (its soft rim included). For the lesion classes that is every changed brain pixel. ``mass_effect``'s
  anomaly is the mass (compared with the deformed slice it sits in); the displacement around it is not.
  ``enlarged_ventricles``' anomaly is the newly CSF area; the displaced tissue around it is not;
- the **healthy-tissue mask** is the brain mask minus the anomaly mask minus every changed pixel. For the
  deformation classes it excludes the displaced tissue (which a deformation moves everywhere near it); for
  the lesion classes it is the brain minus the anomaly. It is what the pathological sets' ``_mask.csv``
  lists, the same convention as the fastMRI+ preparer (``data/prepare.py``), so ``Batch.healthy_tissue`` and
  CACI's healthy region exclude every changed pixel and pixel-level metrics restricted to "brain" count
  anomaly and healthy tissue only (displaced tissue is neither).

Files (under ``root``, default ``cache/embedded/<version>-<params hash>`` in the repository root), all NPY, named
``<subject index>_<slice index>``: ``images/<set>/<s>_<j>.npy`` float32 [size,size] in [0,1];
``brain/<set>/<s>_<j>.npy``, ``anomaly/<class>/<s>_<j>.npy`` and ``healthy/<class>/<s>_<j>.npy`` (healthy tissue)
uint8 {0,1}; split CSVs in ``splits/``: ``healthy_{train,val,test}.csv`` + ``_mask.csv`` (brain masks) and per
class ``<class>.csv`` / ``<class>_label.csv`` (anomaly) / ``<class>_mask.csv`` (healthy tissue) /
``<class>_brain.csv`` (brain), row-aligned. The image CSVs have the columns ``subject`` (``<set>-<s>``: no subject
is in two sets) and ``slice`` (j). Paths in CSVs are relative to the repository root when ``root`` is inside it,
else absolute. Everything is a pure function of the parameters: every subject has its own random generator seeded
with (seed, set, subject index), so the same seed gives the same bytes and :func:`render_subject` re-renders any
single subject.

Copyright notice of the template (ICBM 2009a nonlinear symmetric, distributed with nilearn), kept with every
derived image (also written to ``NOTICE`` in the benchmark folder):

    Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,
    McGill University. Permission to use, copy, modify, and distribute this software and its documentation
    for any purpose and without fee is hereby granted, provided that the above copyright notice appear in all
    copies. The authors and McGill University make no representations about the suitability of this software
    for any purpose. It is provided "as is" without express or implied warranty. The authors are not
    responsible for any data loss, equipment damage, property loss, or injury to subjects or patients
    resulting from the use or misuse of this software package.

CLI: ``python -m data.embedded [--root DIR] [--size 128] [--grid docs/embedded_examples.png]`` builds (or finds)
the benchmark and optionally writes a grid of examples with their masks.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from data.preparer import DatasetPreparer

logger = logging.getLogger(__name__)

VERSION = "embedded-v4"
REPO_ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("hyperintense_lesion", "hypointense_lesion", "mass_effect", "enlarged_ventricles", "multifocal_lesions")
# Subject counts of a smoke-sized benchmark (the test suite, tools.gpu_check --smoke): every set and size bin keeps
# images, so every evaluation task runs, at a fifth of the default's evaluation cost.
SMOKE_COUNTS = {"n_train": 48, "n_val": 12, "n_test": 12, "n_per_class": 12}
HEALTHY_SETS = ("healthy_train", "healthy_val", "healthy_test")
SIZE_BINS = ("small", "medium", "large")
BIN_EDGES_128 = (71, 570)  # px at 128x128: small < 71 <= medium < 570 <= large
# Target lesion radii per bin, in output pixels at 128x128 (area ~ pi r^2 lands inside each bin).
RADII_128 = ((2.0, 3.4), (5.0, 11.5), (14.0, 21.5))
# Multifocal foci per bin: ((min count, max count), (min radius, max radius) in output px at 128x128).
MULTIFOCAL_128 = (((3, 4), (1.0, 1.5)), ((4, 8), (2.0, 3.5)), ((10, 14), (4.0, 5.5)))
NOTICE = (
    "Images derived from the ICBM 2009a nonlinear symmetric T1 template and brain mask (distributed with nilearn).\n\n"
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,\n"
    "McGill University. Permission to use, copy, modify, and distribute this software and its documentation\n"
    "for any purpose and without fee is hereby granted, provided that the above copyright notice appear in all\n"
    "copies. The authors and McGill University make no representations about the suitability of this software\n"
    "for any purpose. It is provided \"as is\" without express or implied warranty. The authors are not\n"
    "responsible for any data loss, equipment damage, property loss, or injury to subjects or patients\n"
    "resulting from the use or misuse of this software package.\n"
)
# A pixel is "changed" when the noise-free pathological and healthy source slices differ by more than this (in
# stored units, white matter ~0.8); see the module docstring, "Masks".
CHANGE = 0.05
_SET_IDS = {name: i for i, name in enumerate((*HEALTHY_SETS, *CLASSES))}


@functools.lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template T1 [197,233,189] float32 in [0,1], brain mask and lateral-ventricle mask (float32 {0,1})."""
    from nilearn import datasets

    t1 = np.asarray(datasets.load_mni152_template(resolution=1).dataobj, dtype=np.float32)
    brain = (np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0)
    # Ventricles: dark voxels deep inside the brain, central box, large connected components only.
    csf = (t1 < 0.35) & ndi.binary_erosion(brain, iterations=8)
    box = np.zeros_like(csf)
    box[60:140, 70:170, 60:110] = True
    labels, n = ndi.label(csf & box)
    sizes = ndi.sum(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes > 1000) + 1
    ventricles = np.isin(labels, keep)
    return t1, brain.astype(np.float32), ventricles.astype(np.float32)


def size_bin(lesion_px: int, size: int) -> str:
    """The size bin of a lesion of ``lesion_px`` pixels in a ``size`` x ``size`` image."""
    factor = (size / 128.0) ** 2
    if lesion_px < BIN_EDGES_128[0] * factor:
        return "small"
    return "medium" if lesion_px < BIN_EDGES_128[1] * factor else "large"


# ------------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class _Subject:
    """The random draws that define one healthy subject's slice."""

    z: float
    angles: tuple[float, float, float]
    scale: tuple[float, float]
    shift: tuple[float, float]
    elastic: np.ndarray  # [2,6,6] control-point displacements in mm
    bias: np.ndarray  # [5] quadratic bias-field coefficients
    gamma: float
    noise: float
    noise_seed: int


def _draw_subject(rng: np.random.Generator, z_band: tuple[float, float]) -> _Subject:
    return _Subject(
        z=float(rng.uniform(*z_band)),
        angles=(float(rng.uniform(-8, 8)), float(rng.uniform(-4, 4)), float(rng.uniform(-4, 4))),
        scale=(float(rng.uniform(0.92, 1.08)), float(rng.uniform(0.92, 1.08))),
        shift=(float(rng.uniform(-4, 4)), float(rng.uniform(-4, 4))),
        elastic=rng.normal(0.0, 1.0, size=(2, 6, 6)) * float(rng.uniform(1.5, 3.0)),
        bias=rng.uniform(-0.2, 0.2, size=5),
        gamma=float(rng.uniform(0.85, 1.15)),
        noise=float(rng.uniform(0.008, 0.025)),
        noise_seed=int(rng.integers(2**31)),
    )


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    a, b, c = (math.radians(v) for v in (yaw, pitch, roll))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    ry = np.array([[math.cos(c), 0, math.sin(c)], [0, 1, 0], [-math.sin(c), 0, math.cos(c)]])
    return rz @ rx @ ry


def _plane(res: int) -> np.ndarray:
    """Display-plane coordinates [2,res,res] in mm: (right, anterior), centred, field of view 233 mm."""
    fov = 233.0
    centres = ((np.arange(res) + 0.5) / res - 0.5) * fov
    right = np.broadcast_to(centres[None, :], (res, res))
    anterior = np.broadcast_to(-centres[:, None], (res, res))
    return np.stack([right, anterior]).astype(np.float64)


@functools.lru_cache(maxsize=4)
def _upsampler(res: int) -> np.ndarray:
    """[res,6] matrix of 1-D cubic-spline zoom from 6 control points to ``res`` (zoom is linear and separable)."""
    return np.stack([ndi.zoom(np.eye(6)[k], res / 6.0, order=3, mode="nearest") for k in range(6)], axis=1)


def _sample(subject: _Subject, plane: np.ndarray,
            ventricles: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Render the subject's oblique slice on ``plane`` (mm): T1, brain mask and (if asked) ventricle mask."""
    volumes = _template()
    res = plane.shape[-1]
    up = _upsampler(res)
    elastic = np.einsum("hk,ckl,wl->chw", up, subject.elastic, up)
    u = plane[0] * subject.scale[0] + subject.shift[0] + elastic[0]
    w = plane[1] * subject.scale[1] + subject.shift[1] + elastic[1]
    rot = _rotation(*subject.angles)
    centre = np.array([(volumes[0].shape[0] - 1) / 2.0, (volumes[0].shape[1] - 1) / 2.0, subject.z])
    coords = np.einsum("ij,jhw->ihw", rot, np.stack([u, w, np.zeros_like(u)])) + centre[:, None, None]
    out = [ndi.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0, prefilter=False)
           for vol in volumes[: 3 if ventricles else 2]]
    return (out[0].astype(np.float32), (out[1] > 0.5).astype(np.float32),
            (out[2] > 0.5).astype(np.float32) if ventricles else None)


def _radial_warp(plane: np.ndarray, centre: np.ndarray, sigma: float, strength: float) -> np.ndarray:
    """Plane whose content near ``centre`` (mm) is magnified (pushed outwards): a smooth expansion."""
    d = plane - centre[:, None, None]
    r2 = (d**2).sum(0)
    factor = 1.0 - strength * np.exp(-r2 / (2.0 * sigma**2))
    return centre[:, None, None] + d * factor[None]


# ------------------------------------------------------------------------------------------------ lesions
@dataclass(frozen=True)
class _Shape:
    """The random outline of a blob: an anisotropic stretch along ``angle`` and four boundary harmonics."""

    stretch: float
    angle: float
    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) of the harmonics k = 2..5


def _draw_shape(rng: np.random.Generator, irregularity: float = 0.2) -> _Shape:
    stretch, angle = rng.uniform(0.75, 1.3), rng.uniform(0, math.pi)
    harmonics = []
    for k in range(2, 6):
        amplitude = irregularity / k * rng.uniform(0.3, 1.0)
        harmonics.append((amplitude, rng.uniform(0, 2 * math.pi)))
    return _Shape(stretch=stretch, angle=angle, harmonics=tuple(harmonics))


def _blob(res: int, centre: tuple[float, float], radius: float, shape: _Shape) -> np.ndarray:
    """Soft irregular blob [res,res] in [0,1] (1 inside, ~1 px soft edge), radius in pixels."""
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float64)
    dy, dx = yy - centre[0], xx - centre[1]
    ca, sa = math.cos(shape.angle), math.sin(shape.angle)
    u, v = (ca * dx + sa * dy) * shape.stretch, (-sa * dx + ca * dy) / shape.stretch
    theta, dist = np.arctan2(v, u), np.hypot(u, v)
    boundary = np.ones_like(theta)
    for k, (amplitude, phase) in enumerate(shape.harmonics, start=2):
        boundary += amplitude * np.cos(k * theta + phase)
    return 1.0 / (1.0 + np.exp(-(radius * boundary - dist) / 0.7))


def _pick_centre(allowed: np.ndarray, rng: np.random.Generator, margin_px: float,
                 depth: np.ndarray | None = None) -> tuple[float, float]:
    """A random pixel of ``allowed`` at least ``margin_px`` from its border (smaller margins if none is).

    Args:
        allowed: [H,W] bool region.
        rng: random generator.
        margin_px: wanted distance to the region's border.
        depth: precomputed ``distance_transform_edt(allowed)`` (computed when None).
    """
    depth = ndi.distance_transform_edt(allowed) if depth is None else depth
    for margin in (margin_px, margin_px / 2, 1.0, 0.0):
        idx = np.flatnonzero(depth > margin)
        if idx.size:
            i = int(idx[rng.integers(idx.size)])
            return float(i // allowed.shape[1]), float(i % allowed.shape[1])
    raise ValueError("no brain tissue in the slice to place a lesion")


def _texture(shape: tuple[int, int], rng: np.random.Generator, sigma: float = 2.0) -> np.ndarray:
    field = ndi.gaussian_filter(rng.normal(0.0, 1.0, size=shape), sigma)
    return field / (field.std() + 1e-8)


@dataclass(frozen=True)
class Rendered:
    """One rendered slice; every array is [size,size].

    Attributes:
        image: float32 in [0,1], stored units.
        brain: uint8 {0,1}, the slice's brain mask.
        anomaly: uint8 {0,1}, the anomaly mask (None for healthy slices).
        healthy_tissue: uint8 {0,1}, brain minus anomaly minus changed region (None for healthy slices).
        source: float32 in [0,1], the healthy slice the pathological one was made from: same subject, same
            noise draw (None for healthy slices).
    """

    image: np.ndarray
    brain: np.ndarray
    anomaly: np.ndarray | None = None
    healthy_tissue: np.ndarray | None = None
    source: np.ndarray | None = None


class _Renderer:
    """Renders healthy and pathological slices at ``2 * size`` and finishes them at ``size``."""

    def __init__(self, size: int, z_band: tuple[float, float]) -> None:
        self.size, self.res, self.z_band = size, 2 * size, z_band
        self.plane = _plane(self.res)
        self.px_mm = 233.0 / self.res  # mm per supersampled pixel
        yy, xx = np.mgrid[0:self.res, 0:self.res].astype(np.float64) / self.res * 2.0 - 1.0
        self.poly = np.stack([xx, yy, xx * yy, xx**2, yy**2])

    def radius(self, rng: np.random.Generator, bin_index: int) -> float:
        """A lesion radius in supersampled pixels for size bin ``bin_index``."""
        low, high = RADII_128[bin_index]
        return float(rng.uniform(low, high)) * self.size / 128.0 * 2.0

    def clean(self, image: np.ndarray, subject: _Subject) -> np.ndarray:
        """Bias field, 2x area downsampling and gamma, before noise and scaling: [size,size] >= 0."""
        biased = image * np.exp(np.tensordot(subject.bias, self.poly, axes=1))
        small = biased.reshape(self.size, 2, self.size, 2).mean(axis=(1, 3))
        return np.clip(small, 0.0, None) ** subject.gamma

    def finish(self, image: np.ndarray, subject: _Subject, ref: float | None = None) -> tuple[np.ndarray, float]:
        """:meth:`clean`, Rician noise, fixed scaling; returns ([size,size] float32 in [0,1], ref)."""
        small = self.clean(image, subject)
        noise_rng = np.random.default_rng(subject.noise_seed)
        if ref is None:
            ref = float(np.percentile(small[small > 0.05], 99)) / 0.85
        n1, n2 = noise_rng.normal(0.0, subject.noise * ref * 0.8, size=(2, *small.shape))
        noisy = np.sqrt((small + n1) ** 2 + n2**2)
        return np.clip(noisy / ref, 0.0, 1.0).astype(np.float32), ref

    def down_mask(self, mask: np.ndarray) -> np.ndarray:
        return (mask.reshape(self.size, 2, self.size, 2).mean(axis=(1, 3)) >= 0.5).astype(np.uint8)

    def at_offset(self, subject: _Subject, j: int, dz: float) -> _Subject:
        """The subject's slice ``j``, ``dz`` mm from its anchor slice along the template z axis: same draws, its
        own noise draw (the anchor, dz = 0, keeps the subject's)."""
        if dz == 0.0:
            return subject
        return replace(subject, z=subject.z + dz,
                       noise_seed=int(np.random.default_rng([subject.noise_seed, j]).integers(2**31)))

    def extent(self, radius: float, dz: float, reach: float) -> float:
        """In-plane scale of an ellipsoidal lesion of radius ``radius`` (supersampled px) on a slice ``dz`` mm from
        its centre. Its z semi-axis is max(radius in mm, 1.5 ``reach``), ``reach`` being the distance of the
        subject's outermost slice, so every slice shows at least sqrt(1 - 1/1.5^2) ~ 0.75 of its radius."""
        if dz == 0.0:
            return 1.0
        rz = max(radius * self.px_mm, 1.5 * reach)
        return math.sqrt(max(0.0, 1.0 - (dz / rz) ** 2))

    def healthy(self, rng: np.random.Generator, offsets: Sequence[float] = (0.0,)) -> list[Rendered]:
        """One healthy subject's slices at ``offsets`` (mm from its anchor slice; one of them 0)."""
        subject = _draw_subject(rng, self.z_band)
        slices = [self.at_offset(subject, j, dz) for j, dz in enumerate(offsets)]
        sampled = [_sample(s, self.plane) for s in slices]
        _, ref = self.finish(sampled[list(offsets).index(0.0)][0], subject)
        return [Rendered(image=self.finish(t1, s, ref)[0], brain=self.down_mask(brain))
                for s, (t1, brain, _) in zip(slices, sampled, strict=True)]

    def pathological(self, cls: str, rng: np.random.Generator, bin_index: int,
                     offsets: Sequence[float] = (0.0,)) -> list[Rendered]:
        """A pathological subject of class ``cls``: its slices at ``offsets`` (mm from the anchor slice), each with
        its healthy source slice and its masks (see :class:`Rendered`).

        The pathology is drawn once, on the anchor slice (its position, size bin, shape and intensity), and is a
        3-D object: lesions are ellipsoids (:meth:`extent`), the mass deforms less away from its centre, the
        ventricles are dilated by the same strength on every slice. Every class yields per slice the
        supersampled image, the lesion by design (soft, in [0,1]) and the image the lesion was composited onto
        (the template slice, or for ``mass_effect`` the deformed one); the masks are then derived from the
        noise-free outputs (see the module docstring, "Masks").
        """
        subject = _draw_subject(rng, self.z_band)
        slices = [self.at_offset(subject, j, dz) for j, dz in enumerate(offsets)]
        sampled = [_sample(s, self.plane, ventricles=cls == "enlarged_ventricles") for s in slices]
        t1, brain, ventricles = sampled[list(offsets).index(0.0)]
        _, ref = self.finish(t1, subject)
        tissue = (brain > 0) & (t1 > 0.55)
        if cls == "enlarged_ventricles":
            lesion = self._ventricles(ventricles, rng)
        elif cls == "mass_effect":
            lesion = self._mass(subject, tissue, rng, bin_index)
        elif cls == "multifocal_lesions":
            lesion = self._multifocal(t1, tissue, rng, bin_index)
        elif cls in ("hyperintense_lesion", "hypointense_lesion"):
            lesion = self._focal(cls, t1, brain, tissue, rng, bin_index)
        else:
            raise ValueError(f"unknown class {cls!r}; valid classes: {', '.join(CLASSES)}")
        reach = max(abs(dz) for dz in offsets)
        return [self._finish_pathological(s, ref, t1_j, *lesion(s, dz, reach, t1_j, brain_j, vent_j))
                for s, dz, (t1_j, brain_j, vent_j) in zip(slices, offsets, sampled, strict=True)]

    def _finish_pathological(self, subject: _Subject, ref: float, t1: np.ndarray, image: np.ndarray,
                             design: np.ndarray, base: np.ndarray, brain_p: np.ndarray) -> Rendered:
        """Noise, scaling and the masks of one pathological slice (``t1``: its healthy source, supersampled)."""
        final, _ = self.finish(image, subject, ref)
        source, _ = self.finish(t1, subject, ref)
        clean = self.clean(image, subject) / ref
        brain_small = self.down_mask(brain_p).astype(bool)
        composited = np.abs(clean - self.clean(base, subject) / ref) > CHANGE
        anomaly = (self.down_mask(design >= 0.5).astype(bool) | composited) & brain_small
        changed = np.abs(clean - self.clean(t1, subject) / ref) > CHANGE
        healthy_tissue = brain_small & ~anomaly & ~changed
        return Rendered(image=final, brain=brain_small.astype(np.uint8), anomaly=anomaly.astype(np.uint8),
                        healthy_tissue=healthy_tissue.astype(np.uint8), source=source)

    # Each class draws its pathology once and returns ``lesion(subject, dz, reach, t1, brain, ventricles) ->
    # (image, design, base, brain)`` that renders it on one slice of the subject.
    def _focal(self, cls: str, t1: np.ndarray, brain: np.ndarray, tissue: np.ndarray, rng: np.random.Generator,
               bin_index: int) -> _Lesion:
        radius = self.radius(rng, bin_index)
        centre = _pick_centre(tissue, rng, radius)
        shape = _draw_shape(rng, 0.35)
        wm = float(np.percentile(t1[tissue], 90))
        if cls == "hyperintense_lesion":
            level = wm * rng.uniform(1.1, 1.22) * (1.0 + 0.04 * _texture(t1.shape, rng))
        else:
            level = wm * rng.uniform(0.2, 0.45) * (1.0 + 0.08 * _texture(t1.shape, rng))

        def lesion(subject: _Subject, dz: float, reach: float, t1: np.ndarray, brain: np.ndarray,
                   ventricles: np.ndarray | None) -> tuple[np.ndarray, ...]:
            design = _blob(self.res, centre, radius * self.extent(radius, dz, reach), shape) * brain
            return t1 * (1.0 - design) + level * design, design, t1, brain

        return lesion

    def _ventricles(self, ventricles: np.ndarray | None, rng: np.random.Generator) -> _Lesion:
        if ventricles is None or ventricles.sum() < 4:
            raise ValueError("the slice shows no ventricles")
        strength = rng.uniform(0.3, 0.5)

        def lesion(subject: _Subject, dz: float, reach: float, t1: np.ndarray, brain: np.ndarray,
                   ventricles: np.ndarray | None) -> tuple[np.ndarray, ...]:
            if ventricles is None or ventricles.sum() < 4:
                raise ValueError(f"the slice {dz:+g} mm from the anchor shows no ventricles")
            cy, cx = ndi.center_of_mass(ventricles)
            centre = self.plane[:, int(round(cy)), int(round(cx))]
            extent = math.sqrt(float(ventricles.sum()) / math.pi) * self.px_mm
            warped = _radial_warp(self.plane, centre, sigma=max(extent, 8.0) * 1.6, strength=strength)
            image, brain_p, new_vent = _sample(subject, warped, ventricles=True)
            assert new_vent is not None
            anomaly = ((new_vent > 0) & (ventricles == 0)).astype(np.float32)
            return image, anomaly, image, brain_p  # the deformation itself is the lesion: nothing is composited

        return lesion

    def _mass(self, subject: _Subject, tissue: np.ndarray, rng: np.random.Generator, bin_index: int) -> _Lesion:
        """A heterogeneous mass (darker core, brighter rim) that deforms the tissue around it."""
        radius = self.radius(rng, bin_index)
        centre = _pick_centre(tissue, rng, radius * 1.5)
        centre_mm = self.plane[:, int(centre[0]), int(centre[1])]
        sigma, strength = radius * self.px_mm * 1.3, rng.uniform(0.5, 0.75)
        shape = _draw_shape(rng, 0.25)
        core_factor = rng.uniform(0.4, 0.7)
        core_shape = _draw_shape(rng, 0.3)
        anchor, anchor_brain, _ = _sample(subject, _radial_warp(self.plane, centre_mm, sigma=sigma, strength=strength))
        wm = float(np.percentile(anchor[(anchor_brain > 0) & (anchor > 0.55)], 90))
        texture = _texture(anchor.shape, rng, sigma=1.5)

        def lesion(subject: _Subject, dz: float, reach: float, t1: np.ndarray, brain: np.ndarray,
                   ventricles: np.ndarray | None) -> tuple[np.ndarray, ...]:
            f = self.extent(radius, dz, reach)
            warped = _radial_warp(self.plane, centre_mm, sigma=sigma, strength=strength * f)
            image, brain_p, _ = _sample(subject, warped)
            blob = _blob(self.res, centre, radius * f, shape) * brain_p
            core = _blob(self.res, centre, radius * f * core_factor, core_shape)
            level = wm * (0.62 + 0.05 * texture) * (1.0 - 0.35 * core) + wm * 0.12 * (blob - core).clip(0, 1)
            return image * (1.0 - blob) + level * blob, blob, image, brain_p

        return lesion

    def _multifocal(self, t1: np.ndarray, tissue: np.ndarray, rng: np.random.Generator, bin_index: int) -> _Lesion:
        wm_level = float(np.percentile(t1[tissue], 75))
        free = tissue & (t1 > wm_level * 0.95)  # white matter not yet next to a focus
        # Small, separate foci; the size bin sets how many and how big (radii in output pixels at 128x128).
        count_range, radius_range = MULTIFOCAL_128[bin_index]
        count = int(rng.integers(count_range[0], count_range[1] + 1))
        foci = []
        yy, xx = np.mgrid[0:self.res, 0:self.res]
        for _ in range(count):
            r = float(rng.uniform(*radius_range)) * self.size / 128.0 * 2.0
            centre = _pick_centre(free, rng, r * 0.5)
            foci.append((centre, r, _draw_shape(rng, 0.2)))
            free &= (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 > (2.5 * r) ** 2
        level = wm_level * rng.uniform(0.45, 0.6)

        def lesion(subject: _Subject, dz: float, reach: float, t1: np.ndarray, brain: np.ndarray,
                   ventricles: np.ndarray | None) -> tuple[np.ndarray, ...]:
            union = np.zeros_like(t1)
            for centre, r, shape in foci:
                union = np.maximum(union, _blob(self.res, centre, r * self.extent(r, dz, reach), shape))
            return t1 * (1.0 - union) + level * union, union, t1, brain

        return lesion


_Lesion = Callable[[_Subject, float, float, np.ndarray, np.ndarray, "np.ndarray | None"], tuple[np.ndarray, ...]]


@functools.lru_cache(maxsize=2)
def _renderer(size: int, z_band: tuple[float, float]) -> _Renderer:
    return _Renderer(size, z_band)


def slice_offsets(slices: int, spacing: float) -> tuple[float, ...]:
    """Offsets (mm) of a subject's ``slices`` slices from its anchor slice (index ``(slices - 1) // 2``)."""
    return tuple((j - (slices - 1) // 2) * float(spacing) for j in range(slices))


def render_subject(seed: int, size: int, z_band: tuple[float, float], name: str, s: int, *, slices: int = 1,
                   spacing: float = 3.0) -> list[Rendered]:
    """Subject ``s`` of set ``name`` (a healthy set or a class): its ``slices`` slices, ``spacing`` mm apart,
    exactly as the benchmark stores them.

    Its generator is seeded with (seed, set id, s) only, so any subject can be re-rendered on its own (e.g. to
    compare a pathological slice with its healthy source). A subject of one slice is the single-slice benchmark's
    image ``s``.
    """
    rng = np.random.default_rng([seed, _SET_IDS[name], s])
    offsets = slice_offsets(slices, spacing)
    if name in HEALTHY_SETS:
        return _renderer(size, z_band).healthy(rng, offsets)
    return _renderer(size, z_band).pathological(name, rng, s % 3, offsets)


def render(seed: int, size: int, z_band: tuple[float, float], name: str, i: int) -> Rendered:
    """Image ``i`` of set ``name`` of the single-slice benchmark (``slices_per_subject: 1``)."""
    return render_subject(seed, size, z_band, name, i)[0]


def _render_task(task: tuple[int, int, tuple[float, float], str, int, int, float]) -> tuple[str, int, list[Rendered]]:
    seed, size, z_band, name, s, slices, spacing = task
    return name, s, render_subject(seed, size, z_band, name, s, slices=slices, spacing=spacing)


# ------------------------------------------------------------------------------------------------ the block
class EmbeddedBenchmark(DatasetPreparer):
    """Generator of the embedded default benchmark (see the module docstring); a ``data.params.prepare`` block.

    Args:
        root: output folder; None means ``cache/embedded/<version>-<params hash>`` under the repository root.
            Relative paths are resolved against the repository root.
        seed: master seed; the same parameters give the same bytes.
        n_train: healthy training subjects.
        n_val: healthy validation subjects (thresholds, calibration).
        n_test: healthy test subjects.
        n_per_class: pathological subjects per class, balanced over the three size bins.
        slices_per_subject: slices of every subject (each set has ``n * slices_per_subject`` slices).
        slice_spacing: distance in mm between a subject's neighbouring slices.
        size: image side in pixels (square).
        classes: pathological classes to generate (subset of :data:`CLASSES`).
        z_band: (low, high) template voxel z of a subject's anchor slice (MNI z = voxel z - 72 mm).
        workers: processes used to render (forked; the output does not depend on it).
    """

    def __init__(self, *, root: str | None = None, seed: int = 0, n_train: int = 600, n_val: int = 60,
                 n_test: int = 60, n_per_class: int = 60, slices_per_subject: int = 1, slice_spacing: float = 3.0,
                 size: int = 128, classes: Sequence[str] = CLASSES, z_band: Sequence[float] = (76.0, 98.0),
                 workers: int = 1) -> None:
        for key, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("n_per_class", n_per_class),
                           ("slices_per_subject", slices_per_subject)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if not 0.5 <= slice_spacing <= 10.0:
            raise ValueError(f"slice_spacing must be in [0.5, 10] mm, got {slice_spacing}")
        if size < 16 or size % 2:
            raise ValueError(f"size must be an even number >= 16, got {size}")
        unknown = [c for c in classes if c not in CLASSES]
        if unknown or not classes:
            raise ValueError(f"classes {unknown or list(classes)!r} invalid; valid classes: {', '.join(CLASSES)}")
        if len(z_band) != 2 or not 40 <= z_band[0] <= z_band[1] <= 140:
            raise ValueError(f"z_band must be (low, high) within [40, 140], got {z_band!r}")
        self.params = {"version": VERSION, "seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test,
                       "n_per_class": n_per_class, "slices_per_subject": slices_per_subject,
                       "slice_spacing": float(slice_spacing), "size": size, "classes": list(classes),
                       "z_band": [float(z_band[0]), float(z_band[1])]}
        digest = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:12]
        default = REPO_ROOT / "cache" / "embedded" / f"{VERSION}-{digest}"
        self.root = (Path(root) if Path(root).is_absolute() else REPO_ROOT / root) if root else default
        self.seed, self.size, self.classes = seed, size, tuple(classes)
        self.counts = {"healthy_train": n_train, "healthy_val": n_val, "healthy_test": n_test}
        self.n_per_class = n_per_class
        self.slices, self.spacing = slices_per_subject, float(slice_spacing)
        self.z_band = (float(z_band[0]), float(z_band[1]))
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers

    def is_built(self) -> bool:
        """True when ``root`` holds a complete build with these parameters."""
        manifest = self.root / "manifest.json"
        return manifest.is_file() and json.loads(manifest.read_text())["params"] == self.params

    def prepare(self) -> Path:
        """Build the benchmark into ``root`` unless a complete build with the same parameters is there."""
        if self.is_built():
            return self.root
        if self.root.exists() and any(self.root.iterdir()):
            raise FileExistsError(f"{self.root} exists but holds no complete build with these parameters; "
                                  "delete it or choose another root")
        start = time.perf_counter()
        self.root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.root.name}-", dir=self.root.parent))
        self._write(tmp)
        try:
            os.rename(tmp, self.root)  # atomic; replaces an empty folder, fails on a non-empty one
        except OSError:
            # Another process finished the same build first; the builds are identical (deterministic).
            shutil.rmtree(tmp)
            if not self.is_built():
                raise
        logger.info("embedded benchmark built in %s (%.1f s)", self.root, time.perf_counter() - start)
        return self.root

    def _rel(self, path: Path, tmp: Path) -> str:
        final = self.root / path.relative_to(tmp)
        try:
            return final.relative_to(REPO_ROOT).as_posix()
        except ValueError:
            return final.as_posix()

    def _write(self, tmp: Path) -> None:
        sets = [*self.counts.items(), *((cls, self.n_per_class) for cls in self.classes)]
        tasks = [(self.seed, self.size, self.z_band, name, s, self.slices, self.spacing)
                 for name, n in sets for s in range(n)]
        _template()  # load once before forking, so workers share it
        if self.workers > 1:
            with multiprocessing.get_context("fork").Pool(self.workers) as pool:
                self._save_all(tmp, pool.imap(_render_task, tasks, chunksize=8))
        else:
            self._save_all(tmp, map(_render_task, tasks))
        (tmp / "NOTICE").write_text(NOTICE, encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps({"params": self.params}, indent=1, sort_keys=True))

    def _save_all(self, tmp: Path, results: Iterable[tuple[str, int, list[Rendered]]]) -> None:
        (tmp / "splits").mkdir(parents=True)
        rows: dict[str, dict[str, list[dict]]] = {}
        for name, s, slices in results:
            for j, out in enumerate(slices):
                paths = self._save(tmp, name, f"{s:05d}_{j}", out)
                table = rows.setdefault(name, {"": [], "_mask": [], "_label": [], "_brain": []})
                where = {"filename": paths["images"], "subject": f"{name}-{s:05d}", "slice": j}
                if out.anomaly is None:
                    table[""].append(where)
                    table["_mask"].append({"filename": paths["brain"]})
                    continue
                px = int(out.anomaly.sum())
                table[""].append({**where, "class": name, "lesion_px": px, "size_bin": size_bin(px, self.size)})
                table["_label"].append({"filename": paths["anomaly"]})
                table["_mask"].append({"filename": paths["healthy"]})
                table["_brain"].append({"filename": paths["brain"]})
        for name, table in rows.items():
            for suffix, entries in table.items():
                if entries:
                    self._csv(tmp / "splits" / f"{name}{suffix}.csv", entries)

    def _save(self, tmp: Path, name: str, stem: str, out: Rendered) -> dict[str, str]:
        paths = {}
        for kind, array in (("images", out.image), ("brain", out.brain), ("anomaly", out.anomaly),
                            ("healthy", out.healthy_tissue)):
            if array is None:
                continue
            path = tmp / kind / name / f"{stem}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, array)
            paths[kind] = self._rel(path, tmp)
        return paths

    @staticmethod
    def _csv(path: Path, rows: list[dict]) -> None:
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


# ------------------------------------------------------------------------------------------------ CLI
def write_grid(root: Path, out: Path, *, per_row: int = 6) -> Path:
    """Draw ``per_row`` examples of the healthy test set and of each class.

    Outlines: brain in blue, anomaly in red, changed tissue outside the anomaly (brain minus healthy tissue minus
    anomaly) in yellow.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rows_of(name: str) -> list[dict]:
        with (root / "splits" / f"{name}.csv").open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def load(path: str) -> np.ndarray:
        p = Path(path)
        return np.load(p if p.is_absolute() else REPO_ROOT / p)

    names = ["healthy_test", *[c for c in CLASSES if (root / "splits" / f"{c}.csv").is_file()]]
    fig, axes = plt.subplots(len(names), per_row, figsize=(1.6 * per_row, 1.7 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        images = rows_of(name)
        healthy = name == "healthy_test"
        labels = None if healthy else rows_of(f"{name}_label")
        tissues = None if healthy else rows_of(f"{name}_mask")
        brains = rows_of(f"{name}_mask" if healthy else f"{name}_brain")
        step = max(len(images) // per_row, 1)
        for c in range(per_row):
            ax = axes[r, c]
            ax.axis("off")
            i = c * step
            if i >= len(images):
                continue
            ax.imshow(load(images[i]["filename"]), cmap="gray", vmin=0, vmax=1)
            brain = load(brains[i]["filename"])
            ax.contour(brain, levels=[0.5], colors="deepskyblue", linewidths=0.4)
            if labels is not None and tissues is not None:
                anomaly = load(labels[i]["filename"])
                displaced = brain * (1 - load(tissues[i]["filename"])) * (1 - anomaly)
                if displaced.any():
                    ax.contour(displaced, levels=[0.5], colors="yellow", linewidths=0.4)
                ax.contour(anomaly, levels=[0.5], colors="red", linewidths=0.6)
                ax.set_title(f"{images[i]['lesion_px']} px", fontsize=6)
        axes[r, 0].text(-0.05, 0.5, name.replace("_", "\n"), transform=axes[r, 0].transAxes, ha="right",
                        va="center", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.suptitle("Embedded benchmark (ICBM 2009a template, (C) 1993-2009 Louis Collins, MNI, McGill); "
                 "red: anomaly, yellow: changed tissue outside it (not healthy tissue), blue: brain", fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: build (or find) the benchmark, optionally write the example grid."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--root", default=None, help="output folder (default: cache/embedded/<version-hash>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-val", type=int, default=60)
    parser.add_argument("--n-test", type=int, default=60)
    parser.add_argument("--n-per-class", type=int, default=60)
    parser.add_argument("--slices-per-subject", type=int, default=1)
    parser.add_argument("--slice-spacing", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--grid", type=Path, default=None, help="write a PNG grid of examples here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bench = EmbeddedBenchmark(root=args.root, seed=args.seed, size=args.size, n_train=args.n_train, n_val=args.n_val,
                              n_test=args.n_test, n_per_class=args.n_per_class,
                              slices_per_subject=args.slices_per_subject, slice_spacing=args.slice_spacing,
                              workers=args.workers)
    root = bench.prepare()
    print(root)
    if args.grid is not None:
        print(write_grid(root, args.grid))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

