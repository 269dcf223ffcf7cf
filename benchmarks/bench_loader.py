"""Images per second per core of nirdml's RGB input pipeline, against the plain PIL +
torchvision v2 pipeline measured in the same run.

Synthetic JPEGs of two sizes are written once (``--cache``, default a temporary folder):
CUB-like 500 x 375 and SOP-like 2000 x 1500 (3 MP), quality 90, smooth colour fields plus
noise, so that they compress like photographs rather than like flat colour. For each size and
each of the training (``RandomResizedCrop(224)`` + flip) and evaluation (``Resize(256)`` +
``CenterCrop(224)``) transforms, one core (``torch.set_num_threads(1)``, as one loader worker
has) reads every file and makes the model input, in interleaved repeats:

* ``nirdml``: what a training or evaluation loader does: ``FileDataset`` reading with
  ``build_transforms("rgb", ...)`` (its crop or resize planned from the header, so a large JPEG
  decodes at a reduced DCT scale);
* ``plain``: ``PIL.Image.open(path).convert("RGB")`` and the same steps written with
  torchvision v2 directly (the peer);
* ``decode only``: the PIL decode of the full image (the floor of any pipeline that decodes
  every pixel) and with ``Image.draft`` DCT-domain downscaling to at least 256 px (the floor
  of one that does not), and TorchCodec's ``decode_jpeg`` of the full image into a uint8
  tensor (what ``nirdml`` uses for JPEGs it decodes whole, with the ``jpeg`` extra;
  torchvision's own decoders are deprecated since 0.29).

Printed: images/s of each (median of ``--repeats``), the ratio nirdml / plain, and how many
such cores feed a ResNet50 bf16 training step on an H100 at ``--gpu-rate`` images/s.

    python benchmarks/bench_loader.py --images 48 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {"CUB-like 500x375": (500, 375), "SOP-like 2000x1500": (2000, 1500)}
NOISE = 4.0  # grey levels: ~1.5-2 bits per pixel at quality 90, as photographs of these sizes


def make_jpegs(folder: Path, size: tuple[int, int], count: int, seed: int = 0) -> list[str]:
    """``count`` JPEGs of ``size`` (w, h) in ``folder``, written once (reused when present)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}-n{NOISE:g}.jpg"
        paths.append(str(path))
        if path.is_file():
            continue
        w, h = size
        coarse = rng.integers(0, 256, (h // 50 + 2, w // 50 + 2, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC),
                           dtype=np.int16)
        noisy = np.clip(field + rng.normal(0, NOISE, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(path, "JPEG", quality=90)
    return paths


def plain_transform(train: bool):
    import torch
    from torchvision.transforms import v2

    from nirdml.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    if train:
        steps = [v2.ToImage(), v2.RandomResizedCrop(224, antialias=True),
                 v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]
    else:
        steps = [v2.ToImage(), v2.Resize(256, antialias=True), v2.CenterCrop(224),
                 v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose([*steps, v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def pipelines(train: bool, paths: list[str]) -> dict:
    from PIL import Image

    from nirdml.data import build_transforms
    from nirdml.data.base import FileDataset

    ours, peer = build_transforms("rgb", train=train, image_size=224), plain_transform(train)
    dataset = FileDataset(paths, [0] * len(paths), transform=ours)
    where = {p: i for i, p in enumerate(paths)}

    def nirdml_read(path):
        return dataset[where[path]][0]

    def plain_read(path):
        with Image.open(path) as img:
            return peer(img.convert("RGB"))

    return {"nirdml": nirdml_read, "plain": plain_read}


def decode_floors() -> dict:
    from PIL import Image

    def full(path):
        with Image.open(path) as img:
            img.load()
            return img.size

    def draft(path):
        with Image.open(path) as img:
            img.draft("RGB", (256, 256))
            img.load()
            return img.size

    floors = {"decode full": full, "decode draft>=256": draft}
    try:
        from torchcodec.decoders import decode_jpeg
    except ImportError:  # the nirdml[jpeg] extra
        return floors

    def torchcodec(path):  # libjpeg-turbo into a uint8 tensor, no DCT-domain scaling
        return decode_jpeg(path, mode="RGB").shape

    return {**floors, "decode torchcodec": torchcodec}


def rate(fn, paths: list[str]) -> float:
    start = time.perf_counter()
    for p in paths:
        fn(p)
    return len(paths) / (time.perf_counter() - start)


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=48, help="JPEGs per size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache", type=Path, default=None, help="folder for the synthetic JPEGs")
    p.add_argument("--gpu-rate", type=float, default=3000.0,
                   help="images/s of a ResNet50 bf16 training step on an H100 (for the "
                        "cores-needed column; default 3000)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one core: one loader worker
    tmp = None
    if args.cache is None:
        tmp = tempfile.TemporaryDirectory()
        args.cache = Path(tmp.name)
    report = {}
    for label, size in SIZES.items():
        paths = make_jpegs(args.cache / f"{size[0]}x{size[1]}", size, args.images)
        cases = {f"train {k}": v for k, v in pipelines(True, paths).items()}
        cases.update({f"eval {k}": v for k, v in pipelines(False, paths).items()})
        cases.update(decode_floors())
        for fn in cases.values():  # warm-up
            fn(paths[0])
        runs = {name: [] for name in cases}
        for rep in range(args.repeats):
            for name in (list(cases) if rep % 2 == 0 else list(cases)[::-1]):
                runs[name].append(rate(cases[name], paths))
        med = {name: statistics.median(v) for name, v in runs.items()}
        report[label] = {"images_per_s": med, "runs": runs}
        bpp = 8 * statistics.mean(Path(q).stat().st_size for q in paths) / (size[0] * size[1])
        report[label]["bits_per_pixel"] = bpp
        print(f"\n{label} ({args.images} JPEGs, {bpp:.2f} bits/pixel, one core, median of "
              f"{args.repeats})")
        print(f"{'':22s} {'img/s':>8s} {'cores for ' + str(int(args.gpu_rate)) + '/s':>16s}")
        for name, r in med.items():
            print(f"{name:22s} {r:8.1f} {args.gpu_rate / r:16.1f}")
        for phase in ("train", "eval"):
            ratio = med[f"{phase} nirdml"] / med[f"{phase} plain"]
            report[label][f"{phase}_ratio"] = ratio
            print(f"{phase}: nirdml / plain = {ratio:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
