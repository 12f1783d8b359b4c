"""A Hugging Face Trainer job (a tiny GPT-2 built from a config), for the integration tests.

Run under torchrun for DDP on the CPU (gloo):
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/jobs/train_hf.py --out DIR
"""

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from bsmon.integrations.transformers import BsmonCallback


class CountingSequences(torch.utils.data.Dataset):
    """Sequences counting up from a random start: learnable, so |G|^2 stays well above the noise."""

    def __init__(self, n=512, length=16, vocab=64):
        starts = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="BsmonCallback(profile=True)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    training = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=4, gradient_accumulation_steps=args.accumulate,
        max_steps=args.steps, logging_steps=1, learning_rate=1e-3, report_to=["tensorboard"],
        save_strategy="no", use_cpu=True, disable_tqdm=True, ddp_backend="gloo")
    trainer = Trainer(model=tiny_gpt2(), args=training, train_dataset=CountingSequences(),
                      callbacks=[BsmonCallback(name="hf-ddp", noise_budget=1.0, profile=args.profile)])
    trainer.train()


if __name__ == "__main__":
    main()
