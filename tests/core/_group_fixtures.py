"""Several-optimizer models for the trainer tests, and a CLI that the SIGKILL-resume and torchrun tests launch.

CLI (run from the repository root)::

    python -m tests.core._group_fixtures --run-dir D --out R.pt [--resume] [--kill-at-step N]
    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.core._group_fixtures --mode ddp ...
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from data.batch import Batch
from model_zoo.base import AnomalyModel, AnomalyOutput
from model_zoo.fanogan import WGANGP
from tests.core._trainer_fixtures import FakeData, RecordingLogger, make_run


class KillableWGAN(WGANGP):
    """A tiny 8x8 WGAN-GP (BatchNorm, dropout, GP, n_critic 2) that SIGKILLs itself inside batch ``kill_at_call``."""

    def __init__(self, *, kill_at_call: int | None = None) -> None:
        super().__init__(image_size=8, latent_dim=4, generator_channels=(8, 4), critic_channels=(4, 8), n_critic=2)
        self.kill_at_call, self.calls = kill_at_call, 0

    def training_step(self, batch: Batch, ctx: Any) -> dict[str, Tensor]:
        self.calls += 1
        if self.kill_at_call is not None and self.calls >= self.kill_at_call:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().training_step(batch, ctx)


class TwoPartAE(AnomalyModel):
    """Deterministic 8x8 autoencoder trained in two sub-steps: the encoder, then the decoder (no randomness)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.decoder = nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1)

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"encoder": list(self.encoder.parameters()), "decoder": list(self.decoder.parameters())}

    def _loss(self, x: Tensor) -> Tensor:
        return (torch.sigmoid(self.decoder(torch.relu(self.encoder(x)))) - x).pow(2).mean()

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        return {"mse": self._loss(batch.image)}

    def training_step(self, batch: Batch, ctx: Any) -> dict[str, Tensor]:
        with ctx.frozen_except("encoder"):
            encoder_loss = self._loss(batch.image)
        ctx.backward_step("encoder", encoder_loss)
        with ctx.frozen_except("decoder"):
            decoder_loss = self._loss(batch.image)
        ctx.backward_step("decoder", decoder_loss)
        return {"encoder_mse": encoder_loss.detach(), "decoder_mse": decoder_loss.detach()}

    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        recon = torch.sigmoid(self.decoder(torch.relu(self.encoder(x))))
        amap = (recon - x).abs()
        return AnomalyOutput(anomaly_map=amap, anomaly_score=amap.flatten(1).mean(1), reconstruction=recon)


def gan_params() -> dict[str, Any]:
    """Trainer params of the GAN resume test: per-group Adam and StepLR (per step), EMA, clipping."""
    return {
        "max_epochs": 3, "checkpoint_every_steps": 4, "log_interval": 3, "ema_decay": 0.9, "grad_clip_norm": 1.0,
        "optimizer": {"module_name": "torch.optim", "class_name": "Adam", "params": {"lr": 0.01, "betas": [0.5, 0.9]}},
        "lr_scheduler": {"module_name": "torch.optim.lr_scheduler", "class_name": "StepLR",
                         "params": {"step_size": 3, "gamma": 0.7}},
        "optimizers": {"generator": {"optimizer": {"module_name": "torch.optim", "class_name": "Adam",
                                                   "params": {"lr": 0.005, "betas": [0.5, 0.999]}}}},
        "lr_scheduler_interval": "step", "progress": False, "monitor": "wasserstein",
    }


def ddp_params() -> dict[str, Any]:
    return {"max_epochs": 2, "log_interval": 1, "progress": False,
            "optimizer": {"module_name": "torch.optim", "class_name": "SGD", "params": {"lr": 0.5}},
            "optimizers": {"decoder": {"optimizer": {"module_name": "torch.optim", "class_name": "SGD",
                                                     "params": {"lr": 0.2}}}}}


def _main() -> None:
    from core.Trainer import Trainer
    from dl_utils.distributed import cleanup, init_distributed

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--mode", choices=("resume", "ddp", "ddp-gan"), default="resume")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    torch.manual_seed(0)
    if args.mode == "resume":
        model: AnomalyModel = KillableWGAN(kill_at_call=args.kill_at_step)
        data, params = FakeData(augment=True), gan_params()
    elif args.mode == "ddp":
        model = TwoPartAE()
        data, params = FakeData(n_train=16, batch_size=8 // info.world_size, shuffle=False), ddp_params()
    else:  # a GAN with BatchNorm, dropout and per-rank random z: the replicas must stay identical
        torch.manual_seed(info.rank)  # different initial weights per rank: rank 0's are broadcast
        model = KillableWGAN()
        torch.manual_seed(100 + info.rank)  # different z, alpha and dropout per rank
        data, params = FakeData(n_train=16, batch_size=4, shuffle=False), {**gan_params(), "max_epochs": 2}
    log = RecordingLogger()
    run = make_run(args.run_dir, rank=info.rank, world_size=info.world_size, logger=log,
                   resume_from=args.run_dir / "checkpoints" / "latest.pt" if args.resume else None)
    trainer = Trainer.from_options(model=model, data=data, run=run, **params)
    trainer.fit()
    if args.mode == "ddp-gan":
        torch.save(model.state_dict(), args.out.with_name(f"{args.out.stem}_rank{info.rank}.pt"))
    if info.rank == 0:
        torch.save({"model": model.state_dict(), "ema": trainer.ema.state_dict() if trainer.ema else None,
                    "step": trainer.step, "train_logs": [values["loss"] for _, values in log.train]}, args.out)
    cleanup()


if __name__ == "__main__":
    _main()
