"""The order questions are visited in: seeded per epoch, split across processes, resumable mid-epoch.

`EpochOrder` is a Sampler whose indices depend only on (seed, epoch, rank, world size):

- shuffle: a permutation drawn from a private generator seeded with seed * 1_000_003 + epoch, so neither the
  global RNG nor the DataLoader's own seeding can change it;
- distributed (world > 1): with `pad` the permutation is padded by repeating its head to a multiple of the
  world size (every rank gets the same number of batches, as DDP needs for training); rank r takes positions
  r, r + world, ...; without `pad` (evaluation) the ranks take disjoint shares that cover every index once;
- `skip`: the first `skip` indices of this rank's share are left out, so a run resumed after n micro-batches
  of batch size b continues with exactly the (n * b)-th sample of that epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochOrder"]


class EpochOrder(Sampler[int]):
    """Indices into a dataset of `size` items for one epoch (rules in the module docstring)."""

    def __init__(
        self,
        size: int,
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        rank: int = 0,
        world: int = 1,
        pad: bool = True,
        skip: int = 0,
    ) -> None:
        if size < 1:
            raise ValueError("an epoch needs at least one item")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.size, self.seed, self.epoch, self.shuffle = size, seed, epoch, shuffle
        self.rank, self.world, self.pad, self.skip = rank, world, pad, skip

    def _share(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.world > 1 and self.pad and self.size % self.world:
            extra = self.world - self.size % self.world
            order += (order * (extra // self.size + 1))[:extra]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._share()[self.skip :])

    def __len__(self) -> int:
        share = (
            -(-self.size // self.world) if self.pad or self.world == 1 else len(range(self.rank, self.size, self.world))
        )
        return max(0, share - self.skip)
