import torch

from cnnkit.transforms import Augment, channel_stats, flip_where, to_input


def _batch(n=6, c=3, h=8, w=10):
    return torch.arange(n * c * h * w, dtype=torch.float32).view(n, c, h, w)


def test_to_input_scales_and_normalizes():
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # (1, 2, 1, 2)
    y = to_input(x, mean=[0.5, 0.2], std=[0.5, 0.1])
    assert torch.allclose(y, torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]]), atol=1e-6)
    assert torch.equal(to_input(x, [0, 0], [1, 1]), x.float() / 255)


def test_channel_stats_match_numpy_definition():
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    mean, std = channel_stats(x, chunk=2)
    f = x.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), f.mean((0, 2, 3)))
    assert torch.allclose(torch.tensor(std, dtype=torch.float64),
                          f.std((0, 2, 3), unbiased=False), atol=1e-7)


def test_flip_really_flips_only_masked_images():
    x = _batch()
    mask = torch.tensor([True, False, True, False, False, True])
    y = flip_where(x, mask)
    for i in range(len(x)):
        expected = x[i].flip(-1) if mask[i] else x[i]
        assert torch.equal(y[i], expected)


def test_alternate_flip_sees_every_image_both_ways_in_two_epochs():
    x = _batch(n=64)
    index = torch.arange(64)
    aug = Augment(flip="alternate")
    g = torch.Generator().manual_seed(0)
    e0, e1 = aug(x, index, 0, g), aug(x, index, 1, g)
    flipped0 = (e0 != x).flatten(1).any(1)
    flipped1 = (e1 != x).flatten(1).any(1)
    assert torch.equal(flipped0, ~flipped1)
    assert 10 < int(flipped0.sum()) < 54


def test_translate_stays_in_bounds_and_is_a_shift_of_the_padded_image():
    x = _batch()
    pad = 2
    y = Augment(translate=pad)(x, torch.arange(len(x)), 0, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="reflect")
    shifts = set()
    for i in range(len(x)):
        match = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(padded[i, :, dy:dy + 8, dx:dx + 10], y[i])]
        assert match, f"image {i} is not a crop of its padded self"
        shifts.add(match[0])
    assert len(shifts) > 1
    assert torch.equal(Augment(translate=2)(x, torch.arange(len(x)), 0,
                                            torch.Generator().manual_seed(0)), y)


def test_uint8_translate_keeps_dtype():
    x = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    y = Augment(translate=1)(x, torch.arange(4), 0, torch.Generator().manual_seed(1))
    assert y.dtype == torch.uint8 and y.shape == x.shape


def test_cutout_zeroes_one_square_per_image():
    x = torch.ones(50, 1, 12, 12)
    y = Augment(cutout=4)(x, torch.arange(50), 0, torch.Generator().manual_seed(0))
    zeros = (y == 0).flatten(1).sum(1)
    assert (zeros <= 16).all() and (zeros > 0).all() and (zeros == 16).any()
    assert ((y == 0) | (y == 1)).all()


def test_same_seed_same_augmented_batch():
    x = _batch(n=16)
    aug = Augment(flip="random", translate=2, cutout=3)
    a = aug(x, torch.arange(16), 0, torch.Generator().manual_seed(5))
    b = aug(x, torch.arange(16), 0, torch.Generator().manual_seed(5))
    c = aug(x, torch.arange(16), 0, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_share_of_a_batch_gets_the_draws_the_whole_batch_gives_it():
    # Under DDP each process augments only its rows of the global batch, with draws made
    # for the whole batch: the result is the whole batch's augmentation, row for row.
    x = _batch(n=10)
    index = torch.arange(100, 110)
    aug = Augment(flip="random", translate=2, cutout=3)
    whole = aug(x, index, 3, torch.Generator().manual_seed(7))
    draws = aug.sample(10, x.shape[2:], torch.Generator().manual_seed(7), x.device)
    parts = [aug.apply(x[rows], index[rows], 3, {k: v[rows] for k, v in draws.items()})
             for rows in torch.arange(10).tensor_split(3)]
    assert torch.equal(torch.cat(parts), whole)
