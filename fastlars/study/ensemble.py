"""K small models trained as one: the study's vectorisation.

Every member keeps its own parameter tensors (so LARS/LAMB compute each member's own
layer norms, and each member can sit in its own param groups with its own lr); the
forward concatenates them and runs all members at once: grouped ``conv1d``
(``groups=K``) for the convolutions, a batched matmul for the linear layers, and one
normalisation over the ``K * C`` channels, which is per member because batch norm is
per channel. Members see the same input batch; the loss is the sum of the members'
mean losses, so each member's gradient is its own mean-loss gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlars.nn import GhostBatchNorm1d

__all__ = ["EnsembleCNN", "EnsembleResNet", "EnsembleMLP", "ensemble_loss", "member_accuracy", "member_loss"]


class _MemberParams(nn.Module):
    """One member's parameters: conv/linear weights and biases, BN affine parameters."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def uniform(self, name: str, shape: tuple[int, ...], fan_in: int) -> None:
        # nn.Conv1d / nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(fan_in)
        self.register_parameter(name, nn.Parameter(torch.empty(shape).uniform_(-bound, bound,
                                                                               generator=self.generator)))

    def norm(self, i: int, channels: int) -> None:
        self.register_parameter(f"bn{i}_weight", nn.Parameter(torch.ones(channels)))
        self.register_parameter(f"bn{i}_bias", nn.Parameter(torch.zeros(channels)))


def _expand(x: Tensor, members: int) -> Tensor:
    """(N, L) shared by all members, or (N, K, L) one input per member -> (N, K, L)."""
    return x.unsqueeze(1).expand(-1, members, -1) if x.ndim == 2 else x


class _Ensemble(nn.Module):
    def __init__(self, members: int, norm_channels: list[int], virtual_batch_size: int | None) -> None:
        super().__init__()
        self.members = members
        self.virtual_batch_size = virtual_batch_size
        # Normalisation without affine over K*C channels (statistics per channel, hence per member);
        # the affine part is each member's own weight/bias, applied after.
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(members * c, affine=False) if virtual_batch_size is None
            else GhostBatchNorm1d(members * c, virtual_batch_size, affine=False) for c in norm_channels)

    def member_parameters(self, k: int) -> list[nn.Parameter]:
        return list(self.member[k].parameters())

    def _norm(self, i: int, x: Tensor) -> Tensor:
        w = torch.cat([m.get_parameter(f"bn{i}_weight") for m in self.member])
        b = torch.cat([m.get_parameter(f"bn{i}_bias") for m in self.member])
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return self.norms[i](x) * w.view(shape) + b.view(shape)

    def _linear(self, x: Tensor, name: str) -> Tensor:
        """x: (N, K, in) -> (N, K, out) with each member's own weight (out, in) and bias."""
        w = torch.stack([m.get_parameter(f"{name}_weight") for m in self.member])  # (K, out, in)
        b = torch.stack([m.get_parameter(f"{name}_bias") for m in self.member])  # (K, out)
        return torch.einsum("nki,koi->nko", x, w) + b


class EnsembleCNN(_Ensemble):
    """K copies of a small 1-D CNN with batch norm, in the spirit of the MNIST-1D paper's
    CNN: three conv(kernel 3) + BN + ReLU layers (the last two with stride 2), then a
    linear layer on the flattened feature map.
    Member k is initialised from ``seeds[k]``. Input (N, L) shared by the members or
    (N, K, L), one input per member; output (N, K, classes)."""

    def __init__(self, seeds: list[int], length: int, classes: int = 10, channels: int = 16,
                 virtual_batch_size: int | None = None) -> None:
        members = len(seeds)
        super().__init__(members, [channels] * 3, virtual_batch_size)
        self.channels, self.strides = channels, (1, 2, 2)
        out_len = length
        for s in self.strides[1:]:
            out_len = (out_len - 1) // s + 1
        self.features = channels * out_len
        self.member = nn.ModuleList()
        for seed in seeds:
            m = _MemberParams(seed)
            for i, c_in in enumerate((1, channels, channels)):
                m.uniform(f"conv{i}_weight", (channels, c_in, 3), 3 * c_in)
                m.norm(i, channels)
            m.uniform("fc_weight", (classes, self.features), self.features)
            m.uniform("fc_bias", (classes,), self.features)
            self.member.append(m)

    def _conv(self, i: int, h: Tensor, stride: int) -> Tensor:
        w = torch.cat([m.get_parameter(f"conv{i}_weight") for m in self.member])  # (K*C, C_in, 3)
        # conv bias omitted: batch norm removes it
        return self._norm(i, F.conv1d(h, w, stride=stride, padding=1, groups=self.members))

    def forward(self, x: Tensor) -> Tensor:
        k = self.members
        h = _expand(x, k)  # (N, K, L): one input channel per member
        for i, stride in enumerate(self.strides):
            h = F.relu(self._conv(i, h, stride))
        return self._linear(h.reshape(h.shape[0], k, self.features), "fc")


class EnsembleResNet(EnsembleCNN):
    """K copies of a deeper residual 1-D network with batch norm: a conv stem (stride 2),
    then ``blocks`` residual blocks of two conv(3) + BN layers each (the second block
    strides 2, its shortcut subsamples), a linear layer on the flattened feature map:
    2 * blocks + 2 weight layers (14 with the default 6 blocks). The last BN of each block
    starts at zero weight (Goyal et al.), so each block starts as the identity."""

    def __init__(self, seeds: list[int], length: int, classes: int = 10, channels: int = 16, blocks: int = 6,
                 virtual_batch_size: int | None = None) -> None:
        members = len(seeds)
        _Ensemble.__init__(self, members, [channels] * (1 + 2 * blocks), virtual_batch_size)
        self.channels, self.blocks = channels, blocks
        self.strides = (2,) + tuple(s for b in range(blocks) for s in ((2 if b == 1 else 1), 1))
        out_len = length
        for s in self.strides:
            out_len = (out_len - 1) // s + 1
        self.features = channels * out_len
        self.member = nn.ModuleList()
        for seed in seeds:
            m = _MemberParams(seed)
            for i in range(1 + 2 * blocks):
                c_in = 1 if i == 0 else channels
                m.uniform(f"conv{i}_weight", (channels, c_in, 3), 3 * c_in)
                m.norm(i, channels)
                if i > 0 and i % 2 == 0:
                    nn.init.zeros_(m.get_parameter(f"bn{i}_weight"))
            m.uniform("fc_weight", (classes, self.features), self.features)
            m.uniform("fc_bias", (classes,), self.features)
            self.member.append(m)

    def forward(self, x: Tensor) -> Tensor:
        k = self.members
        h = F.relu(self._conv(0, _expand(x, k), self.strides[0]))
        for b in range(self.blocks):
            i, stride = 1 + 2 * b, self.strides[1 + 2 * b]
            inner = F.relu(self._conv(i, h, stride))
            h = F.relu(self._conv(i + 1, inner, 1) + h[..., ::stride])
        return self._linear(h.reshape(h.shape[0], k, self.features), "fc")


class EnsembleMLP(_Ensemble):
    """K copies of an MLP: Linear + BN + ReLU twice, then a linear layer; inputs and
    outputs as :class:`EnsembleCNN`."""

    def __init__(self, seeds: list[int], length: int, classes: int = 10, hidden: int = 100,
                 virtual_batch_size: int | None = None) -> None:
        members = len(seeds)
        super().__init__(members, [hidden, hidden], virtual_batch_size)
        self.member = nn.ModuleList()
        for seed in seeds:
            m = _MemberParams(seed)
            for i, (fan_in, fan_out) in enumerate(((length, hidden), (hidden, hidden), (hidden, classes))):
                m.uniform(f"fc{i}_weight", (fan_out, fan_in), fan_in)
                m.uniform(f"fc{i}_bias", (fan_out,), fan_in)
                if i < 2:
                    m.norm(i, fan_out)
            self.member.append(m)

    def forward(self, x: Tensor) -> Tensor:
        k = self.members
        h = _expand(x, k)
        for i in range(2):
            h = self._linear(h, f"fc{i}")  # (N, K, H)
            h = F.relu(self._norm(i, h.reshape(h.shape[0], -1)).view(h.shape))
        return self._linear(h, "fc2")


def ensemble_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Sum over members of each member's mean cross-entropy: logits (N, K, classes),
    targets (N,) shared or (N, K) one per member."""
    n, k, c = logits.shape
    y = y.unsqueeze(1).expand(n, k) if y.ndim == 1 else y
    return F.cross_entropy(logits.reshape(n * k, c), y.reshape(n * k), reduction="sum") / n


@torch.no_grad()
def member_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of each member on (x, y), in eval mode (K,)."""
    was_training = model.training
    model.eval()
    logits = model(x)
    n, k, c = logits.shape
    loss = F.cross_entropy(logits.reshape(n * k, c), y.unsqueeze(1).expand(n, k).reshape(n * k), reduction="none")
    model.train(was_training)
    return loss.view(n, k).mean(0)


@torch.no_grad()
def member_accuracy(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 4096) -> Tensor:
    """Accuracy of each member, in eval mode (K,)."""
    was_training = model.training
    model.eval()
    correct = sum((model(xc).argmax(-1) == yc.unsqueeze(1)).sum(0) for xc, yc in zip(x.split(chunk), y.split(chunk)))
    model.train(was_training)
    return correct.float() / len(y)
