"""Per-slot metadata tables of the PET types."""

from __future__ import annotations

import torch

from pets.pet.meta import SlotMeta


def test_slot_meta_grows_and_reads_unset_slots_as_fill() -> None:
    meta = SlotMeta((2,), torch.int64, fill=-1)
    meta[3] = torch.tensor([1, 2])
    meta[37] = torch.tensor([5, 6])  # past the initial 16 rows
    got = meta[torch.tensor([3, 37, 40, 100])]  # 40 and 100 were never set
    assert got.tolist() == [[1, 2], [5, 6], [-1, -1], [-1, -1]]
    meta.reset(37)
    assert meta[torch.tensor([37])].tolist() == [[-1, -1]]
    assert meta[torch.tensor([], dtype=torch.long)].shape == (0, 2)
