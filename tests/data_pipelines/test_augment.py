from __future__ import annotations

import pytest
import torch

from data_pipelines.augment import (
    ClipAugParams,
    VideoAugConfig,
    VideoAugment,
    color_jitter,
    eval_video_transform,
    sample_crop,
)


def clip(t: int = 4, h: int = 48, w: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (t, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


FULL = VideoAugConfig(img_size=32, crop_scale=(0.3, 1.0), hflip=0.5, color_jitter=0.4)


@pytest.mark.parametrize("size", [(48, 40), (32, 32), (20, 64)])
def test_train_augment_keeps_uint8_and_gives_img_size_frames(size):
    out = VideoAugment(FULL)(clip(5, *size), gen(0))
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 32, 32)


def test_every_frame_gets_the_same_crop_flip_and_jitter():
    frame = clip(1)
    video = frame.expand(6, -1, -1, -1).contiguous()
    for seed in range(8):
        out = VideoAugment(FULL)(video, gen(seed))
        assert all(torch.equal(out[0], out[t]) for t in range(1, 6))
        # ...and the same as augmenting that frame alone with the same seed.
        assert torch.equal(out[:1], VideoAugment(FULL)(frame, gen(seed)))


def test_augment_is_a_function_of_the_generator_seed():
    video, aug = clip(), VideoAugment(FULL)
    assert torch.equal(aug(video, gen(3)), aug(video, gen(3)))
    assert not torch.equal(aug(video, gen(3)), aug(video, gen(4)))


def channels_last_frames(video: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) -> the same, a view of (T, H, W, 3) memory, as the loader decodes clips."""
    return video.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


@pytest.mark.parametrize("size", [(48, 40), (32, 32), (20, 64), (160, 160)])
@pytest.mark.parametrize("hflip, jitter", [(0.0, 0.0), (0.5, 0.0), (0.5, 0.4)])
def test_augmenting_into_a_batch_slot_gives_the_pixels_of_apply(size, hflip, jitter):
    """The loader writes training clips straight into the batch (`apply_into`); the JPEG-bytes path
    and every other caller use `apply`: they must agree pixel for pixel, whatever the crop (full
    frame, upscale, downscale), flip and jitter."""
    img_size = 32 if size != (160, 160) else 160
    cfg = VideoAugConfig(
        img_size=img_size, crop_scale=(0.1, 1.0), crop_ratio=(0.5, 2.0), hflip=hflip, color_jitter=jitter
    )
    aug, video = VideoAugment(cfg), clip(3, *size, seed=7)
    frames = channels_last_frames(video)
    drawn = [aug.sample_params(*size, gen(seed)) for seed in range(12)]
    assert len({p.crop for p in drawn}) > 5
    for params in [*drawn, ClipAugParams((0, 0, *size), flip=True), ClipAugParams((1, 2, 16, 16))]:
        slot = torch.zeros(2, 3, img_size, img_size, 3, dtype=torch.uint8)[1]  # a batch's (T, S, S, 3) row
        aug.apply_into(frames, params, slot)
        assert torch.equal(slot.permute(0, 3, 1, 2), aug.apply(video, params)), params


def test_full_crop_with_certain_flip_is_a_mirror_image():
    video = clip(h=32, w=32)
    aug = VideoAugment(VideoAugConfig(img_size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=1.0))
    assert torch.equal(aug(video, gen(0)), video.flip(-1))


def test_color_jitter_changes_pixels_but_not_shape():
    video = clip()
    out = color_jitter(video, 0.4, gen(0))
    assert out.shape == video.shape and out.dtype == torch.uint8 and not torch.equal(out, video)
    assert torch.equal(color_jitter(video, 0.0, gen(0)), video)


def test_sample_crop_stays_inside_the_frame_and_within_the_scale_range():
    g = gen(0)
    for _ in range(200):
        top, left, h, w = sample_crop(48, 40, (0.2, 0.6), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 40
        assert 0.2 * 0.8 <= h * w / (48 * 40) <= 0.6 * 1.2  # rounding slack
    # Impossible aspect ratios fall back to a centred box inside the frame.
    top, left, h, w = sample_crop(10, 100, (0.9, 1.0), (1.0, 1.0), g)
    assert (h, w) == (10, 10) and left == 45


def test_eval_transform_resizes_short_side_and_centre_crops():
    video = clip(h=40, w=80)
    out = eval_video_transform(video, 20)
    assert out.shape == (4, 3, 20, 20) and out.dtype == torch.uint8
    square = clip(h=20, w=20)
    assert eval_video_transform(square, 20) is square
    # A centred pattern stays centred.
    marked = torch.zeros(1, 3, 40, 80, dtype=torch.uint8)
    marked[..., 15:25, 35:45] = 255
    centre = eval_video_transform(marked, 20)[0, 0]
    assert centre[8:12, 8:12].float().mean() > 200 and centre[:3].float().mean() < 30


def test_invalid_augment_settings_fail_loudly():
    with pytest.raises(ValueError, match="crop_scale"):
        VideoAugment(VideoAugConfig(crop_scale=(0.8, 0.2)))
    with pytest.raises(ValueError, match="hflip"):
        VideoAugment(VideoAugConfig(hflip=2.0))
