"""Generator-driven image transforms and epoch-aware, self-sharding samplers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tbps.data.samplers import EpochShuffleSampler, IdentityBalancedSampler
from tbps.data.transforms import ImageTransform, sample_generator

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def _asymmetric_image(width: int = 24, height: int = 48) -> Image.Image:
    """Left half black, right half white, a colour gradient top to bottom: flips and crops show."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, width // 2 :] = 255
    pixels[:, :, 2] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    return Image.fromarray(pixels)


# --------------------------------------------------------------------------- transforms


def test_eval_transform_resizes_and_normalises_only() -> None:
    transform = ImageTransform((32, 16), MEAN, STD, train=False)
    image = Image.new("RGB", (10, 20), (255, 0, 128))
    out = transform(image)
    assert out.shape == (3, 32, 16) and out.dtype == torch.float32 and type(out) is torch.Tensor
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out[:, 5, 5], expected, atol=1e-4)
    # No randomness in eval mode, with or without a generator.
    assert torch.equal(out, transform(image, sample_generator(0, 1, 2)))
    # Non-RGB input is converted.
    assert transform(Image.new("L", (10, 20), 7)).shape == (3, 32, 16)


def test_train_transform_is_reproducible_from_generator() -> None:
    transform = ImageTransform((48, 24), MEAN, STD, train=True, padding=4, random_erasing=0.5)
    image = _asymmetric_image()
    first = transform(image, sample_generator(7, 2, 11))
    second = transform(image, sample_generator(7, 2, 11))
    assert torch.equal(first, second)
    outputs = {transform(image, sample_generator(7, 2, index)).sum().item() for index in range(12)}
    assert len(outputs) > 1  # different indices, different augmentations


def test_flip_happens_for_some_seeds_and_not_others() -> None:
    transform = ImageTransform((48, 24), MEAN, STD, train=True, random_crop=False)
    image = _asymmetric_image()
    plain = ImageTransform((48, 24), MEAN, STD, train=False)(image)
    flipped_reference = torch.flip(plain, dims=[-1])
    flipped = kept = 0
    for index in range(40):
        out = transform(image, sample_generator(0, 0, index))
        if torch.equal(out, flipped_reference):
            flipped += 1
        elif torch.equal(out, plain):
            kept += 1
    assert flipped > 0 and kept > 0 and flipped + kept == 40

    never = ImageTransform((48, 24), MEAN, STD, train=True, flip_prob=0.0, random_crop=False)
    assert all(torch.equal(never(image, sample_generator(0, 0, i)), plain) for i in range(10))


def test_random_crop_shifts_within_padding() -> None:
    transform = ImageTransform((48, 24), MEAN, STD, train=True, flip_prob=0.0, padding=3)
    image = _asymmetric_image()
    plain = ImageTransform((48, 24), MEAN, STD, train=False)(image)
    outs = [transform(image, sample_generator(1, 0, i)) for i in range(20)]
    assert all(out.shape == (3, 48, 24) for out in outs)
    assert any(not torch.equal(out, plain) for out in outs)
    # A shifted crop of the same content: some window of the padded plain image matches exactly.
    padded = torch.nn.functional.pad(plain, (3, 3, 3, 3), value=0.0)
    fill = (0.0 - torch.tensor(MEAN)) / torch.tensor(STD)  # zero padding, then normalised
    padded = torch.where(padded == 0.0, fill[:, None, None], padded)
    padded[:, 3:-3, 3:-3] = plain
    out = outs[0]
    assert any(
        torch.allclose(out, padded[:, top : top + 48, left : left + 24], atol=1e-5)
        for top in range(7)
        for left in range(7)
    )


def test_random_erasing_zeroes_a_box() -> None:
    transform = ImageTransform((48, 24), MEAN, STD, train=True, flip_prob=0.0, random_crop=False,
                               random_erasing=1.0)
    out = transform(_asymmetric_image(), sample_generator(3, 0, 0))
    zero_pixels = (out == 0).all(dim=0)
    assert 0 < int(zero_pixels.sum()) < 48 * 24


def test_global_rng_fallback_follows_manual_seed() -> None:
    transform = ImageTransform((48, 24), MEAN, STD, train=True)
    image = _asymmetric_image()
    torch.manual_seed(5)
    first = [transform(image) for _ in range(4)]
    torch.manual_seed(5)
    second = [transform(image) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_sample_generator_distinct_and_validated() -> None:
    draws = {(s, e, i): torch.rand(3, generator=sample_generator(s, e, i)).tolist()
             for s in range(2) for e in range(2) for i in range(3)}
    assert len({tuple(v) for v in draws.values()}) == len(draws)
    assert torch.equal(torch.rand(3, generator=sample_generator(1, 1, 1)),
                       torch.rand(3, generator=sample_generator(1, 1, 1)))
    with pytest.raises(ValueError):
        sample_generator(0, -1, 0)


def test_transform_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ImageTransform((0, 16), MEAN, STD, train=True)
    with pytest.raises(ValueError):
        ImageTransform((32, 16), MEAN, STD, train=True, flip_prob=1.5)


# --------------------------------------------------------------------------- EpochShuffleSampler


def _indices(sampler) -> list[int]:
    return [index for index, _ in sampler]


def test_epoch_shuffle_yields_index_epoch_and_reshuffles() -> None:
    sampler = EpochShuffleSampler(50, seed=4)
    sampler.set_epoch(3)
    items = list(sampler)
    assert len(items) == len(sampler) == 50
    assert all(epoch == 3 for _, epoch in items)
    assert sorted(_indices(sampler)) == list(range(50))
    again = EpochShuffleSampler(50, seed=4)
    again.set_epoch(3)
    assert _indices(again) == _indices(sampler)
    sampler.set_epoch(4)
    assert _indices(sampler) != [index for index, _ in items]
    assert _indices(EpochShuffleSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_shuffle_ddp_shards_are_disjoint_and_equal(drop_last: bool) -> None:
    ranks = [EpochShuffleSampler(11, seed=1, rank=r, world_size=2, drop_last=drop_last) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(2)
    shards = [_indices(sampler) for sampler in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == (5 if drop_last else 6)
    single = EpochShuffleSampler(11, seed=1)
    single.set_epoch(2)
    order = _indices(single)
    if drop_last:
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == sorted(order[:10])
    else:
        # One index is repeated to even out the ranks; every index is covered.
        assert set(shards[0]) | set(shards[1]) == set(range(11))
        assert len(set(shards[0]) & set(shards[1])) == 1


def test_epoch_shuffle_more_ranks_than_items() -> None:
    shards = [_indices(EpochShuffleSampler(2, rank=r, world_size=4)) for r in range(4)]
    assert all(len(shard) == 1 for shard in shards)
    with pytest.raises(ValueError):
        EpochShuffleSampler(10, rank=2, world_size=2)


# --------------------------------------------------------------------------- IdentityBalancedSampler


def _person_ids() -> list[int]:
    # 9 identities with 1..9 images each (id 100 + k has k + 1 images), interleaved.
    ids = [100 + k for k in range(9) for _ in range(k + 1)]
    return [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]


def _check_pk(batch: list[int], person_ids: list[int], p: int, k: int) -> None:
    counts = Counter(person_ids[index] for index in batch)
    assert len(counts) == p and set(counts.values()) == {k}


def test_identity_balanced_batches_are_p_by_k() -> None:
    person_ids = _person_ids()
    sampler = IdentityBalancedSampler(person_ids, batch_size=8, num_instances=4, seed=2)
    sampler.set_epoch(1)
    items = list(sampler)
    assert len(items) == len(sampler) == 5 * 8  # floor(45 captions / 8) batches
    assert {epoch for _, epoch in items} == {1}
    indices = [index for index, _ in items]
    for start in range(0, len(indices), 8):
        _check_pk(indices[start : start + 8], person_ids, p=2, k=4)
    assert set(indices) <= set(range(len(person_ids)))
    # An identity with >= K images never repeats one inside its group of K; sparse identities
    # repeat images (with replacement).
    for start in range(0, len(indices), 4):
        group = indices[start : start + 4]
        if Counter(person_ids)[person_ids[group[0]]] >= 4:
            assert len(set(group)) == 4


def _uneven_person_ids() -> list[int]:
    # 7 identities with 1, 2, 3, 5, 8, 13, 20 captions (52 in all), interleaved.
    ids = [100 + k for k, count in enumerate((1, 2, 3, 5, 8, 13, 20)) for _ in range(count)]
    return [ids[i] for i in np.random.default_rng(1).permutation(len(ids))]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_identity_balanced_epoch_is_a_pass_over_the_captions(world_size: int) -> None:
    """An epoch has as many batches as the caption-level random sampler gives for the same data,
    floor(52 captions / (8 x world_size)) per rank (visiting each of the 7 identities once would
    make 2 batches of 4 identities)."""
    person_ids = _uneven_person_ids()
    batch_size = 8
    ranks = [IdentityBalancedSampler(person_ids, batch_size, num_instances=2, seed=3, rank=r, world_size=world_size)
             for r in range(world_size)]
    expected_batches = len(person_ids) // (batch_size * world_size)
    assert expected_batches == {1: 6, 2: 3, 3: 2}[world_size]
    random = EpochShuffleSampler(len(person_ids), rank=0, world_size=world_size, drop_last=True)
    assert len(random) // batch_size == expected_batches  # what a drop_last loader makes of it
    for sampler in ranks:
        sampler.set_epoch(4)
        indices = _indices(sampler)
        assert len(indices) == len(sampler) == expected_batches * batch_size
        for start in range(0, len(indices), batch_size):
            _check_pk(indices[start : start + batch_size], person_ids, p=4, k=2)  # distinct identities
    global_batches = ranks[0].global_batches()
    assert len(global_batches) == expected_batches * world_size
    assert all(sampler.global_batches() == global_batches for sampler in ranks)  # every rank, same order
    for rank, sampler in enumerate(ranks):
        assert _indices(sampler) == [i for batch in global_batches[rank::world_size] for i in batch]


def test_identity_balanced_epoch_draws_identities_by_their_captions() -> None:
    """Identities come in proportion to their captions and recur within an epoch, so an epoch sees
    most captions: 6 batches x 4 identities = 24 identity slots; an identity-uniform draw (each of
    the 7 identities 3-4 times, 2 captions each) could show at most 1+2+3+5+8+8+8 = 35 distinct
    captions and at most 8 of the 20-caption identity."""
    person_ids = _uneven_person_ids()
    sampler = IdentityBalancedSampler(person_ids, batch_size=8, num_instances=2, seed=0)
    distinct, largest = [], []
    for epoch in range(10):
        sampler.set_epoch(epoch)
        indices = _indices(sampler)
        distinct.append(len(set(indices)))
        largest.append(sum(person_ids[i] == 106 for i in indices))
    assert min(distinct) > 35 and sum(distinct) / len(distinct) >= 38, distinct
    assert min(largest) > 8, largest  # ~20/52 of the 48 items


def test_identity_balanced_identities_recur_as_needed() -> None:
    # Two identities, P = 2, K = 1: every batch needs both, so the one-caption identity recurs in
    # each of the floor(10 / 2) = 5 batches, and the other's captions are each used once.
    person_ids = [7] + [8] * 9
    sampler = IdentityBalancedSampler(person_ids, batch_size=2, num_instances=1, seed=5)
    indices = _indices(sampler)
    assert len(indices) == 10
    batches = [indices[i : i + 2] for i in range(0, 10, 2)]
    assert all(sorted(person_ids[i] for i in batch) == [7, 8] for batch in batches)
    assert indices.count(0) == 5
    assert len({i for i in indices if i != 0}) == 5  # distinct captions of identity 8
    # Fewer captions than a batch: still one batch per epoch.
    assert len(IdentityBalancedSampler([0, 0, 1, 1], batch_size=8, num_instances=4)) == 8


def test_identity_balanced_deterministic_per_epoch() -> None:
    person_ids = _person_ids()
    a = IdentityBalancedSampler(person_ids, batch_size=12, num_instances=3, seed=9)
    b = IdentityBalancedSampler(person_ids, batch_size=12, num_instances=3, seed=9)
    a.set_epoch(0)
    b.set_epoch(0)
    assert _indices(a) == _indices(b)
    b.set_epoch(1)
    assert _indices(a) != _indices(b)
    c = IdentityBalancedSampler(person_ids, batch_size=12, num_instances=3, seed=10)
    assert _indices(a) != _indices(c)


def test_identity_balanced_ddp_shards_whole_batches() -> None:
    person_ids = _person_ids()
    ranks = [IdentityBalancedSampler(person_ids, batch_size=4, num_instances=2, seed=0, rank=r, world_size=2)
             for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(5)
    shards = [_indices(sampler) for sampler in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == 5 * 4  # floor(45 / (4 x 2)) batches each
    for shard in shards:
        for start in range(0, len(shard), 4):
            _check_pk(shard[start : start + 4], person_ids, p=2, k=2)
    # The two ranks take alternate batches of the same epoch's global order.
    global_batches = ranks[0].global_batches()
    assert global_batches == ranks[1].global_batches()
    assert shards[0] == [i for batch in global_batches[0::2] for i in batch]
    assert shards[1] == [i for batch in global_batches[1::2] for i in batch]


def test_identity_balanced_rejects_impossible_batches() -> None:
    with pytest.raises(ValueError, match="multiple"):
        IdentityBalancedSampler([0, 1, 2], batch_size=6, num_instances=4)
    with pytest.raises(ValueError, match="distinct identities"):
        IdentityBalancedSampler([0, 0, 1, 1], batch_size=12, num_instances=2)
