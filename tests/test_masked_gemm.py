"""masked_gemm's --groups: ITEMSxTOKENS points through the shared point parser."""

from __future__ import annotations

import pytest

from clients.bench.masked_gemm import parse_groups


def test_groups_are_items_by_tokens() -> None:
    assert parse_groups("16x1024,64x64") == [(16, 1024), (64, 64)]


@pytest.mark.parametrize("bad", ["16", "0x64", "16x", "16x16:128"])
def test_bad_groups_are_refused_with_the_flag_named(bad: str) -> None:
    with pytest.raises(SystemExit, match="--groups entry"):
        parse_groups(bad)
