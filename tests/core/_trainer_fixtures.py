"""Tiny model, data and logger for the trainer tests, and a CLI the resume and torchrun tests launch.

CLI (run from the repository root)::

    python -m tests.core._trainer_fixtures --run-dir D --out R.pt [--resume] [--kill-at-step N] ...
    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.core._trainer_fixtures ...
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from data.batch import Batch, Sample, collate
from dl_utils.run import Run
from model_zoo.base import AnomalyModel, AnomalyOutput


class TinyAE(AnomalyModel):
    """Two-layer conv autoencoder on [B,1,8,8]; optional input noise drawn from the global torch RNG."""

    def __init__(self, *, noise_std: float = 0.0, kill_at_call: int | None = None) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.decoder = nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1)
        self.noise_std = noise_std
        self.kill_at_call = kill_at_call
        self.calls = 0

    def reconstruct(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(torch.relu(self.encoder(x))))

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        self.calls += 1
        if self.kill_at_call is not None and self.calls >= self.kill_at_call:
            os.kill(os.getpid(), signal.SIGKILL)  # simulate a crash in the middle of a step
        x = batch.image
        noisy = x + self.noise_std * torch.randn_like(x) if self.noise_std else x
        recon = self.reconstruct(noisy)
        return {"mse": (recon - x).pow(2).mean(), "l1": (recon - x).abs().mean()}

    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        recon = self.reconstruct(x)
        amap = (recon - x).abs()
        return AnomalyOutput(anomaly_map=amap, anomaly_score=amap.flatten(1).mean(1), reconstruction=recon)


class _Images(Dataset):
    def __init__(self, images: Tensor, *, augment: bool) -> None:
        self.images, self.augment = images, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        image = self.images[index]
        if self.augment:  # drawn from the global RNG, so a resume must restore it exactly
            image = (image + 0.05 * torch.rand(()) - 0.025).clamp(0, 1)
        return Sample(image=image, anomaly_mask=None, brain_mask=None, label=0, path=f"img{index}")


class FakeData:
    """DataModule stand-in: ``train_dataloader(rank, world_size, seed)`` and ``val_dataloader()``."""

    def __init__(self, *, n_train: int = 24, n_val: int = 8, batch_size: int = 4, shuffle: bool = True,
                 augment: bool = False, with_val: bool = True) -> None:
        gen = torch.Generator().manual_seed(123)
        self.train_images = torch.rand(n_train, 1, 8, 8, generator=gen)
        self.val_images = torch.rand(n_val, 1, 8, 8, generator=gen)
        self.batch_size, self.shuffle, self.augment, self.with_val = batch_size, shuffle, augment, with_val
        self.seeds: list[int] = []

    def train_dataloader(self, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> DataLoader:
        self.seeds.append(seed)
        dataset = _Images(self.train_images, augment=self.augment)
        generator = torch.Generator().manual_seed(seed)
        if world_size > 1:
            sampler: Any = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=self.shuffle,
                                              seed=seed)
        elif self.shuffle:
            sampler = RandomSampler(dataset, generator=generator)
        else:
            sampler = SequentialSampler(dataset)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate,
                          generator=generator)

    def val_dataloader(self) -> DataLoader | None:
        if not self.with_val:
            return None
        return DataLoader(_Images(self.val_images, augment=False), batch_size=4, collate_fn=collate)


class RecordingLogger:
    """ExperimentLogger stand-in that records every call."""

    def __init__(self) -> None:
        self.train: list[tuple[int, dict[str, float]]] = []
        self.val: list[tuple[int, dict[str, float]]] = []
        self.scalars: list[tuple[int | None, dict[str, float]]] = []
        self.manifest: dict[str, Any] = {}
        self.config: dict[str, Any] = {}

    def log_train(self, terms: Mapping[str, float | Tensor], *, step: int) -> None:
        self.train.append((step, {k: float(v) for k, v in terms.items()}))

    def log_val(self, metrics: Mapping[str, float | Tensor], *, step: int) -> None:
        self.val.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_scalars(self, values: Mapping[str, float], *, step: int | None = None) -> None:
        self.scalars.append((step, dict(values)))

    def update_config(self, **entries: Any) -> None:
        self.config.update(entries)


def make_run(run_dir: Path, **kwargs: Any) -> Run:
    """A CPU :class:`Run` in ``run_dir`` (seed 7) that logs to a new :class:`RecordingLogger` unless given one."""
    return Run(run_dir=Path(run_dir), device=torch.device("cpu"), seed=kwargs.pop("seed", 7),
               config=kwargs.pop("config", {"name": "tiny", "trainer": {"max_epochs": 3}}),
               logger=kwargs.pop("logger", None) or RecordingLogger(), **kwargs)


def resume_params() -> dict[str, Any]:
    """Trainer params for the SIGKILL/resume test: EMA (with warm-up, whose decay follows the restored step),
    per-step scheduler, clipping, mid-epoch checkpoints."""
    return {
        "max_epochs": 3, "checkpoint_every_steps": 4, "log_interval": 3, "ema_decay": 0.9, "ema_warmup": True,
        "grad_clip_norm": 1.0,
        "optimizer": {"module_name": "torch.optim", "class_name": "Adam", "params": {"lr": 0.01}},
        "lr_scheduler": {"module_name": "torch.optim.lr_scheduler", "class_name": "StepLR",
                         "params": {"step_size": 5, "gamma": 0.7}},
        "lr_scheduler_interval": "step", "progress": False,
    }


def _main() -> None:
    from core.Trainer import Trainer
    from dl_utils import checkpoint as ckpt
    from dl_utils.distributed import cleanup, init_distributed

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="final weights and logs (rank 0)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--mode", choices=("resume", "ddp"), default="resume")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    torch.manual_seed(0)
    saves: list[str] = []
    original_save = ckpt.save_checkpoint

    def counting_save(path: str | Path, state: Mapping[str, Any]) -> Path:
        saves.append(str(path))
        return original_save(path, state)

    ckpt.save_checkpoint = counting_save
    if args.mode == "resume":
        model = TinyAE(noise_std=0.1, kill_at_call=args.kill_at_step)
        data = FakeData(augment=True)
        params = resume_params()
    else:  # ddp: global batch 8 split over the ranks; no randomness so it matches one process exactly
        model = TinyAE()
        data = FakeData(n_train=16, batch_size=8 // info.world_size, shuffle=False)
        params = {"max_epochs": 2, "log_interval": 1, "progress": False,
                  "optimizer": {"module_name": "torch.optim", "class_name": "SGD", "params": {"lr": 0.5}}}
    log = RecordingLogger()
    run = make_run(args.run_dir, rank=info.rank, world_size=info.world_size, logger=log,
                   resume_from=args.run_dir / "checkpoints" / "latest.pt" if args.resume else None)
    trainer = Trainer.from_options(model=model, data=data, run=run, **params)
    best = trainer.fit()
    if info.rank == 0:
        torch.save({"model": model.state_dict(), "ema": trainer.ema.state_dict() if trainer.ema else None,
                    "best": str(best), "step": trainer.step}, args.out)
    args.out.with_name(f"{args.out.stem}_rank{info.rank}.json").write_text(
        json.dumps({"saves": saves, "train_logs": log.train, "val_logs": log.val}))
    cleanup()


if __name__ == "__main__":
    _main()
