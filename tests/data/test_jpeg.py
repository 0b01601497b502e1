"""Image files decoded straight to their crop (`cct.data.jpeg`): the same crops as decoding in full, at reduced
size where the box allows it, seeded per image, bad files skipped and counted."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cct.data import BatchSource, build_dataset, eval_transform, train_transform
from cct.data.datasets import BadImage, decode_image_file
from cct.data.jpeg import eval_file_transform, train_file_transform


def _smooth_image(height: int, width: int) -> np.ndarray:
    """A smooth RGB picture, which JPEG keeps nearly intact: what differs is resampling and sub-pixel box offsets
    (the tensor transforms round their boxes to whole pixels of the resized image)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    planes = [127 + 120 * np.sin(x / 150), 127 + 120 * np.cos(y / 110), 127 + 100 * np.sin((x + y) / 190)]
    return np.stack(planes, axis=2).clip(0, 255).astype(np.uint8)


@pytest.fixture
def jpeg_file(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    Image.fromarray(_smooth_image(375, 500)).save(path, quality=95)
    return path


def test_eval_crop_from_the_file_matches_the_full_decode(jpeg_file):
    for size in (64, 224):
        reference = eval_transform(size)(decode_image_file(jpeg_file)).float()
        ours = eval_file_transform(size).load_file(jpeg_file)
        assert ours.dtype == torch.uint8 and ours.shape == (3, size, size)
        assert (ours.float() - reference).abs().mean() < 3.0


def test_train_crop_draws_the_same_box_as_the_tensor_transform(jpeg_file):
    torch.manual_seed(7)
    reference = train_transform(96, scale=(0.5, 1.0))(decode_image_file(jpeg_file)).float()
    torch.manual_seed(7)
    ours = train_file_transform(96, scale=(0.5, 1.0), interpolation="bicubic").load_file(jpeg_file)
    assert (ours.float() - reference).abs().mean() < 3.0
    torch.manual_seed(8)
    other = train_file_transform(96, scale=(0.5, 1.0)).load_file(jpeg_file)
    assert (other.float() - reference).abs().mean() > 3.0


def test_at_full_scale_the_file_crop_is_the_tensor_transforms_crop(jpeg_file):
    # 224 px crops of a 500 x 375 file need every decoded pixel, so nothing but the decoder differs: the same box
    # resampled by the same kernel gives the same pixels, up to a rounding step of the decoders
    for seed in range(3):
        torch.manual_seed(seed)
        reference = train_transform(224, interpolation="bilinear")(decode_image_file(jpeg_file)).int()
        torch.manual_seed(seed)
        ours = train_file_transform(224).load_file(jpeg_file)
        assert (ours.int() - reference).abs().max() <= 1
        # height x width x channel in memory, which `collate_skip_bad` copies into a channels-last batch as is
        assert ours.permute(1, 2, 0).is_contiguous()


def test_tiny_and_thin_images_give_full_size_crops(tmp_path):
    for name, (height, width) in (("tiny.png", (3, 5)), ("thin.jpg", (1, 400)), ("tall.jpg", (300, 2))):
        path = tmp_path / name
        Image.fromarray(_smooth_image(height, width)).save(path)
        for seed in range(4):
            torch.manual_seed(seed)
            assert train_file_transform(32).load_file(path).shape == (3, 32, 32)
        assert eval_file_transform(32).load_file(path).shape == (3, 32, 32)


def test_small_crops_decode_the_jpeg_at_reduced_size(jpeg_file):
    crop = eval_file_transform(32, crop_pct=1.0)
    image = Image.open(jpeg_file)
    left, top, right, bottom = crop.box(image.height, image.width)
    image.draft("RGB", (round(image.width * 32 / (right - left)), round(image.height * 32 / (bottom - top))))
    assert image.size[0] < 500 // 4  # libjpeg's 1/8 scaling: 63 x 47


def test_sixteen_bit_images_take_the_tensor_path(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(path)
    out = eval_file_transform(16, crop_pct=1.0).load_file(path)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8 and int(out.max()) > 100


def test_truncated_jpeg_is_a_bad_image_and_is_skipped_and_counted(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(_smooth_image(60, 80)).save(tmp_path / split / cls / f"{i}.jpg")
    bad = tmp_path / "train" / "a" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(BadImage):
        train_file_transform(32).load_file(bad)
    dataset = build_dataset(f"folder:{tmp_path}", "train")
    dataset.transform = train_file_transform(32)
    source = BatchSource(dataset, torch.device("cpu"), workers=0)
    images, labels, skipped = next(source.batches([torch.arange(6)], seed=3))
    assert skipped == 1 and images.shape == (5, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1, 1]
    assert torch.equal(images, next(source.batches([torch.arange(6)], seed=3))[0])
