"""The RGB pipelines' drafted JPEG decodes: the images they give against the full decode (the
stated tolerance), where they must not apply, and the training crop's unchanged distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nirdml.data import build_transforms
from nirdml.data.base import FileDataset
from nirdml.data.images import load_image
from nirdml.data.transforms import IMAGENET_MEAN, IMAGENET_STD, draft_size

STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def photo_like(path, size, seed=0, noise=4.0):
    """Smooth colour fields plus sensor-like noise: a JPEG of about 1.5 bits per pixel."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.integers(0, 256, (h // 50 + 2, w // 50 + 2, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), float)
    pixels = np.clip(field + rng.normal(0, noise, field.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return str(path)


def sharp(path, size, seed=0, fmt="JPEG"):
    """The worst case for any downscaling: random colour blocks of 7 pixels."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 256, (h // 7 + 1, w // 7 + 1, 3), dtype=np.uint8)
    Image.fromarray(np.kron(blocks, np.ones((7, 7, 1), np.uint8))[:h, :w]).save(
        path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return str(path)


def plain_eval(image):
    """The v2 pipeline the evaluation transform was before it named its draft size."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.Resize(256, antialias=True), v2.CenterCrop(224),
                       v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(image)


def pixel_error(a, b):
    """|a - b| in grey levels (0-255) of the un-normalised images."""
    return ((a - b) * STD).abs() * 255


def test_the_eval_transform_is_the_plain_v2_pipeline_and_names_twice_its_resize():
    t = build_transforms("rgb", train=False, image_size=224)
    assert draft_size(t) == 512
    assert draft_size(build_transforms("rgb", train=False, image_size=84)) == 2 * 96
    assert draft_size(build_transforms("rgb", train=True, image_size=224)) is None
    assert draft_size(build_transforms("gray_small", train=False)) is None
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), np.uint8))
    assert torch.equal(t(image), plain_eval(image))


@pytest.mark.parametrize("size", [(2000, 1500), (4000, 3000), (1024, 1024)])
def test_a_large_photo_decoded_at_reduced_scale_stays_within_half_a_grey_level(tmp_path, size):
    path = photo_like(tmp_path / "photo.jpg", size)
    t = build_transforms("rgb", train=False, image_size=224)
    with Image.open(path) as image:  # the decode is reduced: 1/2 (or 1/4) of the sides
        image.draft("RGB", (512, 512))
        assert max(image.size) <= size[0] // 2 and min(image.size) >= 512
    full, drafted = t(load_image(path, 3)), t(load_image(path, 3, t.prepare))
    err = pixel_error(full, drafted)
    assert float(err.mean()) <= 0.5 and float(err.max()) <= 4.0
    # a dataset's reader drafts the same way as a query's
    ds = FileDataset([path], [0], transform=t)
    assert torch.equal(ds[0][0], drafted)


def test_the_worst_case_image_stays_within_three_grey_levels_on_average(tmp_path):
    path = sharp(tmp_path / "sharp.jpg", (2000, 1500))
    t = build_transforms("rgb", train=False, image_size=224)
    err = pixel_error(t(load_image(path, 3)), t(load_image(path, 3, t.prepare)))
    assert float(err.mean()) <= 3.0


@pytest.mark.parametrize("name,size,fmt", [("cub.jpg", (500, 375), "JPEG"),
                                           ("just_under.jpg", (1023, 1500), "JPEG"),
                                           ("large.png", (2000, 1500), "PNG")])
def test_no_draft_for_small_jpegs_or_other_formats(tmp_path, name, size, fmt):
    path = sharp(tmp_path / name, size, fmt=fmt)
    t = build_transforms("rgb", train=False, image_size=224)
    assert torch.equal(t(load_image(path, 3)), t(load_image(path, 3, t.prepare)))
    with Image.open(path) as image:
        assert torch.equal(FileDataset([path], [0], transform=t)[0][0],
                           plain_eval(image.convert("RGB")))


def plain_train(image):
    """The v2 training pipeline before the crop was planned from the header."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(224, antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(image)


@pytest.mark.parametrize("name,size,fmt", [("small.jpg", (500, 375), "JPEG"),
                                           ("large.png", (2000, 1500), "PNG")])
def test_an_undrafted_training_image_is_exactly_the_plain_pipelines(tmp_path, name, size, fmt):
    path = sharp(tmp_path / name, size, fmt=fmt)
    t = build_transforms("rgb", train=True, image_size=224)
    ds = FileDataset([path], [0], transform=t)
    with Image.open(path) as image:
        decoded = image.convert("RGB")
    for seed in range(6):  # the same RNG stream: the same crops and flips
        torch.manual_seed(seed)
        want = plain_train(decoded)
        torch.manual_seed(seed)
        assert torch.equal(ds[0][0], want)
        torch.manual_seed(seed)
        assert torch.equal(t(decoded), want)  # handed over decoded: drawn at call time


def test_a_large_training_jpeg_is_decoded_reduced_and_crops_the_same_region(tmp_path,
                                                                         monkeypatch):
    from PIL import JpegImagePlugin

    path = photo_like(tmp_path / "photo.jpg", (2000, 1500))
    t = build_transforms("rgb", train=True, image_size=224)
    ds = FileDataset([path], [0], transform=t)
    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = original(self, mode, size)
        scales.append(2000 // self.size[0])
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    with Image.open(path) as image:
        decoded = image.convert("RGB")
    errors = []
    for seed in range(12):
        torch.manual_seed(seed)
        want = plain_train(decoded)
        torch.manual_seed(seed)
        errors.append(float(pixel_error(ds[0][0], want).mean()))
    assert max(scales) >= 2  # large crops were decoded at a reduced scale
    # the same crop and flip (the region to within half a pixel of the reduced decode): within
    # three grey levels on average; the crops decoded in full are exact
    assert max(errors) <= 3.0 and min(errors) == 0.0, errors
    # the crop is drawn exactly as torchvision draws it, from the same RNG stream
    from torchvision.transforms import RandomResizedCrop

    from nirdml.data.transforms import CROP_KEY

    for seed in range(5):
        torch.manual_seed(seed)
        want = RandomResizedCrop.get_params(torch.empty(1, 1500, 2000), [0.08, 1.0],
                                            [3 / 4, 4 / 3])
        torch.manual_seed(seed)
        with Image.open(path) as image:
            t.prepare(image, "RGB")
            scale = 2000 / image.size[0]
            got = [v * scale for v in image.info[CROP_KEY]]
        assert got == pytest.approx(list(want), abs=1e-9)


# ------------------------------------------------------------ whole JPEGs through TorchCodec
def _spy_fast_decode(monkeypatch):
    import nirdml.data.base as base

    calls = []
    real = base.decode_jpeg_tensor

    def spy(path):
        out = real(path)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(base, "decode_jpeg_tensor", spy)
    return calls


@pytest.mark.parametrize("kind", ["baseline 4:2:0", "4:4:4", "progressive", "greyscale"])
def test_a_whole_jpeg_is_decoded_to_a_tensor_with_pils_pixels(tmp_path, monkeypatch, kind):
    pytest.importorskip("torchcodec")
    src = Image.open(photo_like(tmp_path / "src.jpg", (333, 251)))
    path = str(tmp_path / "x.jpg")
    options = {"4:4:4": {"subsampling": 0}, "progressive": {"progressive": True}}.get(kind, {})
    (src.convert("L") if kind == "greyscale" else src).save(path, "JPEG", quality=85, **options)
    calls = _spy_fast_decode(monkeypatch)
    for train in (False, True):
        t = build_transforms("rgb", train=train, image_size=224)
        ds = FileDataset([path], [0], transform=t)
        with Image.open(path) as image:
            decoded = image.convert("RGB")
        torch.manual_seed(3)
        want = plain_train(decoded) if train else plain_eval(decoded)
        torch.manual_seed(3)
        assert torch.equal(ds[0][0], want)
    assert calls == [True, True]  # the tensor path ran, and gave exactly the PIL path's input


def test_jpegs_go_through_pil_where_the_tensor_decoder_does_not_apply(tmp_path, monkeypatch):
    calls = _spy_fast_decode(monkeypatch)
    big = photo_like(tmp_path / "big.jpg", (2000, 1500))  # drafted: PIL's reduced decode
    png = sharp(tmp_path / "x.png", (300, 200), fmt="PNG")
    t = build_transforms("rgb", train=False, image_size=224)
    FileDataset([big, png], [0, 1], transform=t)[0]
    FileDataset([big, png], [0, 1], transform=t)[1]
    small = photo_like(tmp_path / "small.jpg", (300, 200))
    FileDataset([small], [0], transform=t, mode="L")[0]  # PIL's own luma conversion
    FileDataset([small], [0], transform=None, invert=True)[0]
    assert calls == []


def test_without_torchcodec_and_for_a_truncated_jpeg_pil_decodes_as_before(tmp_path,
                                                                           monkeypatch):
    import nirdml.data.image_files as files

    path = photo_like(tmp_path / "x.jpg", (300, 200))
    t = build_transforms("rgb", train=False, image_size=224)
    with Image.open(path) as image:
        want = plain_eval(image.convert("RGB"))
    monkeypatch.setattr(files, "_torchcodec_decode_jpeg", lambda: None)
    assert files.decode_jpeg_tensor(path) is None
    assert torch.equal(FileDataset([path], [0], transform=t)[0][0], want)
    monkeypatch.undo()
    data = open(path, "rb").read()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert files.decode_jpeg_tensor(str(cut)) is None
    with pytest.raises(OSError, match="truncated"):
        FileDataset([str(cut)], [0], transform=t)._read(0)
