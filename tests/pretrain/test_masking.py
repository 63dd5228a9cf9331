from __future__ import annotations

import pytest
import torch

from pretrain.masking import Mask, num_masked_tokens, random_mask, tube_mask


def _check_consistent(mask, batch: int, num_tokens: int, masked: int) -> None:
    assert mask.ids_keep.shape == (batch, num_tokens - masked)
    assert mask.ids_masked.shape == (batch, masked)
    assert mask.mask.shape == (batch, num_tokens) and mask.mask.dtype == torch.bool
    assert (mask.mask.sum(1) == masked).all()
    order = torch.cat([mask.ids_keep, mask.ids_masked], 1)
    assert torch.equal(order.sort(1).values, torch.arange(num_tokens).expand(batch, -1))  # a permutation
    assert not mask.mask.gather(1, mask.ids_keep).any() and mask.mask.gather(1, mask.ids_masked).all()
    assert torch.equal(order.gather(1, mask.ids_restore), torch.arange(num_tokens).expand(batch, -1))


def test_random_mask_hides_floor_ratio_tokens_in_every_sample():
    mask = random_mask(6, 128, 0.8, torch.Generator().manual_seed(0))
    _check_consistent(mask, 6, 128, 102)  # docs/model.md: 102 of 128 audio patches hidden
    assert len({tuple(row.tolist()) for row in mask.mask}) == 6  # samples get different masks


def test_tube_mask_repeats_one_spatial_mask_over_all_time_slices():
    mask = tube_mask(4, 8, 100, 0.9, torch.Generator().manual_seed(1))
    _check_consistent(mask, 4, 800, 720)  # docs/model.md: 80 visible video tokens
    per_slice = mask.mask.view(4, 8, 100)
    assert (per_slice == per_slice[:, :1]).all()
    assert (per_slice[:, 0].sum(1) == 90).all()
    assert not torch.equal(per_slice[0, 0], per_slice[1, 0])


def test_masks_are_reproducible_from_a_seeded_generator():
    a = tube_mask(3, 4, 16, 0.75, torch.Generator().manual_seed(7))
    b = tube_mask(3, 4, 16, 0.75, torch.Generator().manual_seed(7))
    c = tube_mask(3, 4, 16, 0.75, torch.Generator().manual_seed(8))
    assert torch.equal(a.mask, b.mask) and not torch.equal(a.mask, c.mask)


def test_masked_count_is_robust_to_float_rounding():
    assert num_masked_tokens(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996
    assert num_masked_tokens(128, 0.8) == 102
    assert num_masked_tokens(10, 0.0) == 0


@pytest.mark.parametrize("ratio", [1.0, -0.1, 0.9999999])
def test_mask_ratio_that_hides_everything_or_is_out_of_range_is_rejected(ratio):
    with pytest.raises(ValueError, match="ratio"):
        random_mask(2, 4, ratio)


def test_ratio_below_one_still_keeps_a_token_of_a_short_sequence():
    mask = random_mask(2, 4, 0.9)
    assert mask.num_visible == 1 and mask.num_masked == 3


def test_a_given_boolean_mask_becomes_ascending_visible_and_hidden_ids():
    hidden = torch.tensor([[True, False, True, False, False], [False, False, True, True, False]])
    mask = Mask.from_bool(hidden)
    _check_consistent(mask, batch=2, num_tokens=5, masked=2)
    # x[~mask] and x[mask] order, as HiCMAE gathers its visible and masked tokens
    assert mask.ids_keep.tolist() == [[1, 3, 4], [0, 1, 4]]
    assert mask.ids_masked.tolist() == [[0, 2], [2, 3]]
    assert torch.equal(mask.mask, hidden)


def test_a_given_mask_with_uneven_rows_or_the_wrong_type_is_refused():
    with pytest.raises(ValueError, match="same number of tokens"):
        Mask.from_bool(torch.tensor([[True, False, False], [True, True, False]]))
    with pytest.raises(ValueError, match="bool"):
        Mask.from_bool(torch.zeros(2, 3, dtype=torch.long))
