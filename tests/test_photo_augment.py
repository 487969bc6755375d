"""The photo augmentation: random-resized crops, rotation and colour jitter drawn per image
and applied to the whole batch at once."""
import torch

import cnnkit
from cnnkit.transforms import Augment, resized_crop

PHOTO = Augment(flip="random", crop_scale=0.35, rotate=10.0, jitter=0.2)


def _images(n=6, size=48):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g)


def test_each_image_gets_its_own_draw_and_labels_stay_aligned():
    x = _images(1).repeat(8, 1, 1, 1)  # eight copies of one image
    out = PHOTO(x, torch.arange(8), 0, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    pairs = [(i, j) for i in range(8) for j in range(i + 1, 8)]
    assert all(not torch.allclose(out[i], out[j], atol=1e-3) for i, j in pairs)
    # Solid colours stay solid under a crop or rotation: row i keeps image i's colour
    # (brightness/contrast/saturation move it, so compare without jitter).
    solid = torch.linspace(0.1, 0.9, 8).view(8, 1, 1, 1).expand(8, 3, 16, 16).contiguous()
    warp = Augment(crop_scale=0.35, rotate=10.0)
    moved = warp(solid, torch.arange(8), 0, torch.Generator().manual_seed(2))
    assert torch.allclose(moved, solid, atol=1e-5)


def test_output_shapes_ranges_and_the_uint8_path():
    x = _images(5, 40)[:, :, :, :32]  # not square
    out = PHOTO(x, torch.arange(5), 0, torch.Generator().manual_seed(3))
    assert out.shape == (5, 3, 40, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1  # jitter clamps to the pixel range
    pixels = (x * 255).round().to(torch.uint8)
    out = Augment(crop_scale=0.5, rotate=5.0)(pixels, torch.arange(5), 0,
                                              torch.Generator().manual_seed(3))
    assert out.dtype == torch.uint8 and out.shape == pixels.shape


def test_a_full_crop_without_rotation_is_the_identity_and_jitter_follows_normalization():
    x = _images(3, 24)
    one, zero = torch.ones(3), torch.zeros(3)
    same = resized_crop(x, area=one, log_ratio=zero, cx=one / 2, cy=one / 2, degrees=zero)
    assert torch.allclose(same, x, atol=1e-5)
    # a quarter of the area at the top-left corner is that corner, enlarged
    corner = resized_crop(x, area=one / 4, log_ratio=zero, cx=zero, cy=zero, degrees=zero)
    half = torch.nn.functional.interpolate(x[:, :, :12, :12], size=(24, 24),
                                           mode="bilinear", align_corners=False)
    assert torch.allclose(corner[:, :, 2:-2, 2:-2], half[:, :, 2:-2, 2:-2], atol=1e-5)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    aug = Augment(jitter=0.3, mean=mean, std=std)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    on_pixels = Augment(jitter=0.3)(x, torch.arange(3), 0, g1)
    on_normalized = aug((x - m) / s, torch.arange(3), 0, g2) * s + m
    assert torch.allclose(on_pixels, on_normalized, atol=1e-5)


def test_presets_follow_the_image_size_and_flags_win():
    from cnnkit.recipes import fill_recipe_defaults
    cfg = cnnkit.make_config(data="digits")
    small = fill_recipe_defaults(cfg, 1000, "cpu", (32, 32))
    large = fill_recipe_defaults(cfg, 1000, "cpu", (96, 96))
    assert small.augment == "cifar" and small.crop_scale == 1.0 and small.translate == 2
    assert small.jitter == 0.15  # the fast recipe's own addition to the cifar preset
    grey = fill_recipe_defaults(cfg, 1000, "cpu", (32, 32), channels=1)
    assert grey.augment == "cifar" and grey.jitter == 0.0  # colour images only
    tutorial = fill_recipe_defaults(cnnkit.make_config(data="digits", recipe="tutorial"),
                                    1000, "cpu", (32, 32))
    assert tutorial.augment == "cifar" and not Augment.from_config(tutorial).active
    plain = fill_recipe_defaults(cnnkit.make_config(data="digits", jitter=0.0), 1000, "cpu",
                                 (32, 32))
    assert plain.jitter == 0.0
    assert large.augment == "photo" and large.crop_scale == 0.35 and large.translate == 0
    assert large.rotate == 10.0 and large.jitter == 0.2
    mine = fill_recipe_defaults(cnnkit.make_config(data="digits", augment="photo", rotate=0),
                                1000, "cpu", (32, 32))
    assert mine.augment == "photo" and mine.rotate == 0 and mine.crop_scale == 0.35
    none = fill_recipe_defaults(cnnkit.make_config(data="digits", augment="none"), 1000,
                                "cpu", (96, 96))
    assert not Augment.from_config(none).active


def test_a_photo_run_trains_and_saves_its_preset(png_sample, tmp_path):
    r = cnnkit.train(plots=False, data=str(png_sample), image_size=64, epochs=1, width="8,16,16",
                     out=str(tmp_path / "r"), log=lambda s: None)
    assert r.config.augment == "photo" and r.config.crop_scale == 0.35
    assert cnnkit.load(r.run_dir).config.augment == "photo"


def test_the_fast_recipe_jitters_colour_images_and_not_grey_ones(png_sample, tmp_path):
    # settled against the data a run loads: the PNG sample's 32-px colour images, the
    # digits' 8-px grey ones; each run saves what it trained with
    colour = cnnkit.train(plots=False, data=str(png_sample), epochs=1, width="8,16,16",
                          out=str(tmp_path / "c"), log=lambda s: None)
    grey = cnnkit.train(plots=False, data="digits", epochs=1, width="8,16,16",
                        out=str(tmp_path / "g"), log=lambda s: None)
    assert colour.config.augment == grey.config.augment == "cifar"
    assert colour.config.jitter == 0.15 and grey.config.jitter == 0.0
    assert cnnkit.load(colour.run_dir).config.jitter == 0.15
