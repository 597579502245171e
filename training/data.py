"""Data: image sources (ImageFolder, built-in `digits` and `synthetic`), transforms, and the epoch sampler.

A *source* is a list of labelled PIL images: `len(source)`, `source.load(i) -> (image, label)` and
`source.labels`. `ImageDataset` turns a source into tensors with a transform. Evaluation uses exactly
the server's `preprocess_image`; training applies its augmentations first and then the same function,
so training and serving normalise identically.

Augmentation randomness is a pure function of (seed, epoch, sample index): a run draws the same crops
whatever the number of workers or ranks, and a resumed run the same as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageFilter, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from server.model_config import Preprocess
from server.preprocess import preprocess_image
from training.errors import UserError
from training.synthetic import SyntheticImages

log = logging.getLogger(__name__)

DIGITS_TRAIN = 1438  # sklearn's first 1,438 digits train; the last 359 are the held-out test split
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class ImageSource(Protocol):
    labels: list[str]

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Image.Image, int]: ...


class DigitImages:
    """scikit-learn's 8x8 handwritten digits as grayscale images, pixel = value * 255 / 16."""

    def __init__(self, split: str) -> None:
        from sklearn.datasets import load_digits

        if split not in ("train", "test"):
            raise UserError(f"digits has splits 'train' (1,438) and 'test' (359), not {split!r}")
        digits = load_digits()
        part = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
        self.pixels = np.round(digits.images[part] * 255.0 / 16.0).astype(np.uint8)  # (N, 8, 8)
        self.targets = [int(t) for t in digits.target[part]]
        self.labels = [str(d) for d in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.pixels[index], "L"), self.targets[index]


class FolderImages:
    """`root/<class>/<image>`: classes are the sorted sub-folder names; unreadable files are skipped."""

    def __init__(self, root: Path, labels: list[str] | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"data folder not found: {root}")
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.labels = list(labels) if labels is not None else found
        unknown = sorted(set(found) - set(self.labels))
        if unknown:
            raise UserError(f"{root}: classes {unknown[:5]} are not among the training labels")
        self.files: list[tuple[Path, int]] = []
        self.skipped: list[Path] = []
        for label, name in enumerate(self.labels):
            folder = root / name
            for path in sorted(folder.iterdir()) if folder.is_dir() else []:
                if path.is_file() and not path.name.startswith("."):
                    self._add(path, label)
        if self.skipped:
            log.warning(
                "%s: skipped %d unreadable file(s), e.g. %s", root, len(self.skipped), self.skipped[0]
            )
        if not self.files:
            raise UserError(f"{root}: no readable images (expected {root}/<class>/<image>.jpg)")

    def _add(self, path: Path, label: int) -> None:
        try:
            with Image.open(path) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            self.skipped.append(path)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                log.warning("skipping unreadable image %s", path)
            return
        self.files.append((path, label))

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.files[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), label
        except (OSError, SyntaxError, ValueError) as exc:
            raise UserError(f"{path}: cannot decode image ({exc})") from exc


class SubsetImages:
    """A fixed selection of another source's images."""

    def __init__(self, source: ImageSource, indices: list[int]) -> None:
        self.source, self.indices, self.labels = source, list(indices), source.labels

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return self.source.load(self.indices[index])


def open_source(data: str, split: str, *, cfg, labels: list[str] | None = None) -> ImageSource:
    """The `split` of data set `data` ('digits', 'synthetic' or an ImageFolder root) for run config `cfg`.

    Split 'holdout' is the `cfg.holdout_fraction` of the training split (a fixed subset, the same for
    every run seed) that 'train' then leaves out: for tuning without touching the test split.
    """
    if split == "holdout" or (split == cfg.train_split and cfg.holdout_fraction > 0):
        full = open_source(data, cfg.train_split, cfg=cfg.replace(holdout_fraction=0.0), labels=labels)
        train, holdout = holdout_split(len(full), cfg.holdout_fraction, tail=data == "digits")
        return SubsetImages(full, holdout if split == "holdout" else train)
    if data == "digits":
        return DigitImages(split)
    if data == "synthetic":
        size = cfg.synthetic_size if split == "train" else max(cfg.synthetic_size // 4, 1)
        try:
            return SyntheticImages(
                split,
                num_classes=cfg.synthetic_classes,
                size=size,
                seed=cfg.data_seed,
                image_size=max(cfg.image_size),
            )
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    return FolderImages(Path(data) / split, labels=labels)


def holdout_split(n: int, fraction: float, tail: bool = False) -> tuple[list[int], list[int]]:
    """(train, holdout) indices: a fixed random subset, or the last ones when `tail`.

    `digits` is ordered by writer and its test split is the last 359 (other writers), so its holdout is
    the tail of the training split: a random holdout shares writers with training and flatters a model.
    """
    if not 0 < fraction < 1:
        raise UserError(f"holdout_fraction must be in (0, 1), got {fraction}")
    order = np.arange(n) if tail else np.random.default_rng(12345).permutation(n)  # independent of the seed
    cut = n - max(1, round(n * fraction))
    return sorted(order[:cut].tolist()), sorted(order[cut:].tolist())


def train_preprocess(spec: Preprocess) -> Preprocess:
    """The training crop already has the model's size: the normalisation is all that stays."""
    return spec.model_copy(update={"resize": "stretch", "crop_pct": 1.0})


class TrainTransform:
    """Random resized crop to (H, W) with the server's filter; then at that size a random affine warp
    (rotation, shear, zoom, shift), stroke-weight jitter, an elastic distortion and a flip, each off at 0;
    then the server's normalisation.

    The warp runs on the resized crop, not on the source: an 8x8 digit is upsampled exactly as the server
    does it and then rotated at 32 px (rotating the 8x8 original first would smear it), and with every
    range at 0 the pixels are exactly the server's.
    """

    def __init__(
        self,
        hw: tuple[int, int],
        spec: Preprocess,
        *,
        scale,
        ratio,
        rotate: float,
        hflip: bool,
        shear: float = 0.0,
        zoom: float = 0.0,
        translate: float = 0.0,
        elastic: float = 0.0,
        thickness: float = 0.0,
    ) -> None:
        self.hw, self.spec, self.norm_spec = tuple(hw), spec, train_preprocess(spec)
        self.elastic, self.thickness = elastic, thickness
        self.scale, self.log_ratio = tuple(scale), (math.log(ratio[0]), math.log(ratio[1]))
        self.rotate, self.hflip = rotate, hflip
        self.shear, self.zoom, self.translate = shear, zoom, translate
        self.filter = Image.Resampling[spec.interpolation.upper()]

    @property
    def warps(self) -> bool:
        return bool(self.rotate or self.shear or self.zoom or self.translate)

    def crop_box(
        self, width: int, height: int, rng: np.random.Generator
    ) -> tuple[float, float, float, float]:
        area = width * height
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
            if w <= width and h <= height:
                x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
                return x0, y0, x0 + w, y0 + h
        return 0.0, 0.0, float(width), float(height)

    def warp_matrix(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(A, shift): the linear part mapping output offsets from the centre to input offsets, and a shift
        as a fraction of the size. Angles in degrees, shear as a slope, zoom as a log-scale range."""
        theta = math.radians(rng.uniform(-self.rotate, self.rotate))
        slope = rng.uniform(-self.shear, self.shear)
        zoom = math.exp(rng.uniform(-self.zoom, self.zoom))
        shift = rng.uniform(-self.translate, self.translate, size=2)
        cos, sin = math.cos(theta), math.sin(theta)
        a = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, slope], [0.0, 1.0]]) / zoom
        return a, shift

    def warp(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """`img` (already at the output size) rotated, sheared, zoomed and shifted about its centre."""
        a, shift = self.warp_matrix(rng)
        centre = np.array([img.width / 2, img.height / 2])
        offset = centre * (1 + 2 * shift) - a @ centre  # output pixel -> source pixel: a @ p + offset
        coeffs = (a[0, 0], a[0, 1], offset[0], a[1, 0], a[1, 1], offset[1])
        return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=self.filter)

    def reweigh(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Thicker or thinner strokes: a blend towards the 3x3 max (t > 0) or min (t < 0) of the image."""
        t = rng.uniform(-self.thickness, self.thickness)
        grown = img.filter(ImageFilter.MaxFilter(3) if t > 0 else ImageFilter.MinFilter(3))
        return Image.blend(img, grown, abs(t))

    def distort(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """An elastic distortion: a smooth random displacement field of up to `elastic` output pixels
        (random offsets on a 4x4 grid, interpolated bicubically), sampled bilinearly, black outside."""
        h, w = img.height, img.width
        coarse = rng.uniform(-self.elastic, self.elastic, size=(2, 4, 4)).astype(np.float32)
        dy, dx = (
            np.asarray(Image.fromarray(c, "F").resize((w, h), Image.Resampling.BICUBIC)) for c in coarse
        )
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        y, x = yy + dy, xx + dx
        y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
        fy, fx = (y - y0)[..., None], (x - x0)[..., None]
        src = np.pad(np.asarray(img, dtype=np.float32), ((1, 1), (1, 1), (0, 0)))  # black border

        def at(yi: np.ndarray, xi: np.ndarray) -> np.ndarray:
            return src[np.clip(yi + 1, 0, h + 1), np.clip(xi + 1, 0, w + 1)]

        out = (at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx) * (1 - fy)
        out += (at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx) * fy
        return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        img = img.convert("RGB")
        box = self.crop_box(*img.size, rng)
        img = img.resize((self.hw[1], self.hw[0]), self.filter, box=box)
        if self.warps:
            img = self.warp(img, rng)
        if self.thickness:
            img = self.reweigh(img, rng)
        if self.elastic:
            img = self.distort(img, rng)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return preprocess_image(img, self.hw, self.norm_spec)


class EvalTransform:
    """Exactly what the server does to an image."""

    def __init__(self, hw: tuple[int, int], spec: Preprocess) -> None:
        self.hw, self.spec = tuple(hw), spec

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        return preprocess_image(img, self.hw, self.spec)


class ImageDataset(Dataset):
    """Tensors from a source. Keys are `index` (no randomness) or `(index, epoch)` (augmentation seeded)."""

    def __init__(self, source: ImageSource, transform, seed: int = 0, cache_images: bool = False) -> None:
        self.source, self.transform, self.seed = source, transform, seed
        self.cache: dict[int, tuple[Image.Image, int]] | None = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.source)

    def _image(self, index: int) -> tuple[Image.Image, int]:
        if self.cache is None:
            return self.source.load(index)
        if index not in self.cache:
            self.cache[index] = self.source.load(index)
        return self.cache[index]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, -1)
        img, label = self._image(index)
        rng = np.random.default_rng([self.seed, epoch + 1, index])
        return torch.from_numpy(self.transform(img, rng)), label


class EpochSampler(Sampler):
    """Each epoch a seeded permutation, cut to whole global batches, dealt round-robin to the ranks.

    Rank r takes positions r, r+W, r+2W, ... so micro-batch j of every rank together are the same
    samples a 1-process run sees in its micro-batch j: a 2-process run equals a 1-process one.
    `set_epoch(epoch, skip)` starts an epoch `skip` samples in (per rank): resuming mid-epoch.
    """

    def __init__(self, size: int, global_batch: int, *, rank: int = 0, world: int = 1, seed: int = 0) -> None:
        if size < global_batch:
            raise UserError(f"the training split has {size} images, fewer than one batch ({global_batch})")
        self.size, self.global_batch, self.rank, self.world, self.seed = size, global_batch, rank, world, seed
        self.epoch, self.skip = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.steps_per_epoch * self.global_batch // self.world - self.skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=gen)[: self.steps_per_epoch * self.global_batch]
        mine = order[self.rank :: self.world][self.skip :].tolist()
        return iter([(i, self.epoch) for i in mine])


def eval_indices(size: int, rank: int, world: int) -> list[int]:
    """This rank's share of an evaluation split: every sample exactly once over all ranks."""
    return list(range(rank, size, world))
