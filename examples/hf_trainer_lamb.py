"""LAMB in the Hugging Face Trainer: ``Trainer(optimizers=(fastlars.LAMB(...), schedule))``
on a tiny BERT classifier built from a config (no download, no hub access), with
``fastlars.param_groups`` (biases and LayerNorm weights: no weight decay, no trust ratio)
and the large-batch schedule ``WarmupPolyDecay``, which the Trainer steps every step.

    python examples/hf_trainer_lamb.py           # on the CPU, synthetic token data

Pass ``max_grad_norm=0`` to TrainingArguments: the Trainer's own clipping (1.0 by default)
would otherwise rescale gradients before LAMB (LAMB has its own ``max_grad_norm``).
tests/test_integrations.py checks that Trainer.train ends with the weights of a plain loop.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is built locally: nothing to fetch
import torch  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

import fastlars  # noqa: E402
from fastlars.schedules import WarmupPolyDecay  # noqa: E402

VOCAB, LENGTH, CLASSES = 64, 12, 2


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """Two layers of width 32; no dropout, so a run is a function of the data order alone."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=LENGTH, num_labels=CLASSES,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


class SyntheticTokens(torch.utils.data.Dataset):
    """Random token sequences labelled by whether the second token is below 4."""

    def __init__(self, samples: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, 8, (samples, LENGTH), generator=g)
        self.labels = (self.input_ids[:, 1] < 4).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def lamb_and_schedule(model: torch.nn.Module, steps: int, lr: float = 1e-3, weight_decay: float = 0.01,
                      warmup_steps: int = 0):
    optimizer = fastlars.LAMB(fastlars.param_groups(model, weight_decay=weight_decay), lr=lr)
    return optimizer, WarmupPolyDecay(optimizer, total_steps=steps, warmup_steps=warmup_steps)


def training_arguments(output_dir: str, steps: int, batch_size: int, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
                  max_grad_norm=0.0, report_to="none", use_cpu=True, save_strategy="no", logging_steps=10)
    return TrainingArguments(**{**kwargs, **overrides})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-2)
    args = parser.parse_args(argv)
    model = tiny_bert()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(model=model, args=training_arguments(output_dir, args.steps, args.batch_size),
                          train_dataset=SyntheticTokens(4096),
                          optimizers=lamb_and_schedule(model, args.steps, args.lr, warmup_steps=args.steps // 10))
        print(trainer.train())


if __name__ == "__main__":
    main()
