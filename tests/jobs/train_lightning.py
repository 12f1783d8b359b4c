"""A Lightning job whose training_step calls a submodule, for the integration tests.

Run: python tests/jobs/train_lightning.py --devices 2 --logdir DIR   (Lightning's DDP launches
the other rank itself, re-running this script). TensorBoard logs go to DIR/tb.
"""

import argparse
import importlib

import torch
from torch import nn


def regression_module(package: str = "lightning"):
    """A LightningModule of ``package`` ("lightning" or "pytorch_lightning") whose training_step
    calls ``self.net``, never its own forward."""
    pl = importlib.import_module("lightning.pytorch" if package == "lightning" else package)

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))

        def forward(self, x):
            raise AssertionError("training_step calls self.net, not forward")

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    return Regression()


def regression_loader(samples: int, micro_batch: int = 8) -> torch.utils.data.DataLoader:
    """Linear regression with noise: a learnable signal, so |G|^2 stays above the noise."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 6, generator=generator)
    y = x @ torch.randn(6, 1, generator=generator) + 0.5 * torch.randn(samples, 1, generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=micro_batch)


def main() -> None:
    import lightning.pytorch as pl

    from bsmon.integrations.lightning import BsmonCallback

    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--profile", action="store_true", help="BsmonCallback(profile=True)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps, accumulate_grad_batches=args.accumulate, log_every_n_steps=1,
        logger=pl.loggers.TensorBoardLogger(args.logdir, name="tb"),
        callbacks=[BsmonCallback(name="lightning-job", noise_budget=1.0, profile=args.profile)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    samples = args.steps * args.accumulate * args.micro_batch * args.devices
    trainer.fit(regression_module(), regression_loader(samples, args.micro_batch))


if __name__ == "__main__":
    main()
