"""Data sets, transforms and the epoch sampler."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from server.model_config import Preprocess
from training.data import (
    DigitImages,
    EpochSampler,
    EvalTransform,
    FolderImages,
    TrainTransform,
    eval_indices,
    holdout_split,
    open_source,
)
from training.errors import UserError
from training.run_config import RunConfig
from training.synthetic import SyntheticImages, class_names


def test_digits_split_sizes_labels_and_pixels():
    train, test = DigitImages("train"), DigitImages("test")
    assert (len(train), len(test)) == (1438, 359)
    assert train.labels == [str(d) for d in range(10)]
    ref = load_digits()
    assert test.targets == [int(t) for t in ref.target[1438:]]  # the LAST 359, in sklearn's order
    img, label = test.load(0)
    assert img.size == (8, 8) and label == ref.target[1438]
    expected = np.round(ref.images[1438] * 255 / 16).astype(np.uint8)
    assert np.array_equal(np.asarray(img), expected)
    assert train.pixels.max() == 255 and train.pixels.min() == 0  # value 16 is white, 0 black


def test_digits_rejects_other_splits():
    with pytest.raises(UserError, match="'train' \\(1,438\\) and 'test' \\(359\\)"):
        DigitImages("val")


def test_synthetic_is_deterministic_by_seed():
    a = SyntheticImages("train", num_classes=12, size=20, seed=3, image_size=24)
    b = SyntheticImages("train", num_classes=12, size=20, seed=3, image_size=24)
    c = SyntheticImages("train", num_classes=12, size=20, seed=4, image_size=24)
    val = SyntheticImages("val", num_classes=12, size=20, seed=3, image_size=24)
    for i in (0, 7, 19):
        assert np.array_equal(np.asarray(a.load(i)[0]), np.asarray(b.load(i)[0]))
        assert not np.array_equal(np.asarray(a.load(i)[0]), np.asarray(c.load(i)[0]))
        assert not np.array_equal(np.asarray(a.load(i)[0]), np.asarray(val.load(i)[0]))
    shape, glyph = a.load(5)[0], a.load(0)[0]  # labels: class_names order, glyph, glyph, shape, ...
    assert not a.labels[5].startswith("glyph") and shape.size == (24, 24) and shape.mode == "RGB"
    assert a.labels[0].startswith("glyph") and glyph.size == (8, 8) and glyph.mode == "RGB"
    assert sorted(set(a.targets())) == list(range(12)) and a.labels == class_names(12)
    assert len(set(class_names(512))) == 512
    assert {n.split("-")[0] for n in class_names(6)} >= {"glyph", "disk"}  # any prefix mixes both kinds
    assert sum(not n.startswith("glyph") for n in class_names(96)) == 32  # all shapes by 96 classes


def test_synthetic_glyphs_are_drawn_like_the_digits():
    """8x8 white-on-black ink levels k*255/16 (as `digits` presents optdigits), written differently each
    time, with more ink in the middle than at the border (size-normalised, centred)."""
    glyphs = SyntheticImages("train", num_classes=3, size=300, seed=0, image_size=24)
    images = [np.asarray(glyphs.load(i)[0])[..., 0] for i in range(0, 300, 3)]  # class 0 only
    levels = np.unique(np.concatenate([im.ravel() for im in images]))
    assert set(levels.tolist()) <= {round(k * 255 / 16) for k in range(17)} and levels.max() >= 239
    assert len({im.tobytes() for im in images}) == len(images)
    mean = np.mean(images, axis=0)
    assert mean[2:6, 2:6].mean() > mean[[0, -1]].mean() and mean.mean() > 30
    other = np.mean([np.asarray(glyphs.load(i)[0])[..., 0] for i in range(1, 300, 3)], axis=0)
    assert np.abs(mean - other).mean() > 10  # two classes are two different glyphs


def test_synthetic_class_count_bounds():
    with pytest.raises(ValueError, match="2 to 512 classes"):
        class_names(513)


def _write_folder(root, broken: bool = True):
    for cls, colour in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10 + i, 12), colour).save(root / cls / f"{i}.png")
    if broken:
        (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")


def test_image_folder_skips_unreadable_images_with_a_warning(tmp_path, caplog):
    _write_folder(tmp_path / "train")
    with caplog.at_level(logging.WARNING):
        folder = FolderImages(tmp_path / "train")
    assert folder.labels == ["cat", "dog"] and len(folder) == 6
    assert [p.name for p in folder.skipped] == ["broken.jpg"]
    assert "broken.jpg" in caplog.text and "skipped 1 unreadable" in caplog.text
    img, label = folder.load(4)
    assert label == 1 and img.mode == "RGB"


def test_image_folder_empty_or_missing_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="no readable images"):
        FolderImages(tmp_path / "train")
    with pytest.raises(UserError, match="data folder not found"):
        open_source(str(tmp_path), "val", cfg=RunConfig())


def test_image_folder_val_uses_the_training_labels(tmp_path):
    _write_folder(tmp_path / "val", broken=False)
    with pytest.raises(UserError, match="not among the training labels"):
        FolderImages(tmp_path / "val", labels=["cat", "bird"])
    assert FolderImages(tmp_path / "val", labels=["bird", "cat", "dog"]).files[0][1] == 1


def test_train_transform_without_augmentation_is_the_eval_transform():
    """Augmentations off, the training path must produce exactly the server's pixels."""
    spec = Preprocess(interpolation="bilinear", mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (13, 13, 3), dtype=np.uint8))
    plain = TrainTransform((20, 20), spec, scale=(1, 1), ratio=(1, 1), rotate=0, hflip=False)
    rng = np.random.default_rng(1)
    assert np.array_equal(plain(img, rng), EvalTransform((20, 20), spec)(img))
    augmented = TrainTransform((20, 20), spec, scale=(0.3, 0.5), ratio=(0.8, 1.2), rotate=10, hflip=True)
    out = augmented(img, rng)
    assert out.shape == (3, 20, 20) and out.dtype == np.float32
    assert not np.array_equal(out, plain(img, rng))
    for warp in ({"rotate": 1e-9}, {"shear": 1e-9}, {"zoom": 1e-9}, {"translate": 1e-9}):
        near = TrainTransform(
            (20, 20), spec, scale=(1, 1), ratio=(1, 1), **{"rotate": 0, "hflip": False, **warp}
        )
        assert near.warps and np.abs(near(img, rng) - plain(img, rng)).max() <= 1.01 / 255 / min(spec.std)


def test_warps_move_the_content_as_told():
    """A dot in an 8x8 image: shifted by up to `translate` of the side, rotated about the centre, and
    zoomed; the warp runs after the resize, on the server's own pixels."""
    spec = Preprocess(interpolation="bicubic")
    dot = Image.new("L", (8, 8))
    dot.putpixel((6, 4), 255)  # right of centre

    def peak(transform, seed):
        out = transform(dot, np.random.default_rng(seed))[0]
        y, x = np.unravel_index(out.argmax(), out.shape)
        return np.array([x + 0.5, y + 0.5]) - 16  # offset from the centre of the 32 px output

    still = TrainTransform((32, 32), spec, scale=(1, 1), ratio=(1, 1), rotate=0, hflip=False)
    home = peak(still, 0)
    shift = TrainTransform((32, 32), spec, scale=(1, 1), ratio=(1, 1), rotate=0, hflip=False, translate=0.25)
    moved = np.array([peak(shift, s) - home for s in range(40)])
    assert np.abs(moved).max() <= 0.25 * 32 + 1 and np.abs(moved).max() >= 4 and moved.std(axis=0).min() > 1
    turn = TrainTransform((32, 32), spec, scale=(1, 1), ratio=(1, 1), rotate=90, hflip=False)
    radii = [np.linalg.norm(peak(turn, s)) for s in range(20)]
    angles = [math.degrees(math.atan2(*peak(turn, s)[::-1])) for s in range(20)]
    assert np.allclose(radii, np.linalg.norm(home), atol=1.5) and max(map(abs, angles)) > 30


def test_sampler_deals_one_global_batch_over_ranks():
    """Micro-batch j of rank 0 and rank 1 together are micro-batch j of a single process."""
    single = list(EpochSampler(50, 8, seed=5))
    assert len(single) == 48 and len({i for i, _ in single}) == 48  # whole batches, no repeats
    ranks = [list(EpochSampler(50, 8, rank=r, world=2, seed=5)) for r in (0, 1)]
    for step in range(6):
        both = {i for r in ranks for i, _ in r[step * 4 : (step + 1) * 4]}
        assert both == {i for i, _ in single[step * 8 : (step + 1) * 8]}
    resumed = EpochSampler(50, 8, seed=5)
    resumed.set_epoch(0, skip=16)
    assert list(resumed) == single[16:] and len(resumed) == 32
    resumed.set_epoch(1)
    assert list(resumed) != single and all(e == 1 for _, e in resumed)


def test_sampler_needs_one_batch():
    with pytest.raises(UserError, match="fewer than one batch"):
        EpochSampler(10, 16)


def test_holdout_is_disjoint_fixed_and_left_out_of_training():
    train, held = holdout_split(100, 0.2)
    assert len(held) == 20 and not set(train) & set(held) and (train, held) == holdout_split(100, 0.2)
    assert holdout_split(10, 0.2, tail=True) == (list(range(8)), [8, 9])
    cfg = RunConfig(data="digits", holdout_fraction=0.1)
    held = open_source("digits", "holdout", cfg=cfg)
    assert len(open_source("digits", "train", cfg=cfg)) + len(held) == 1438
    assert held.indices == list(range(1294, 1438))  # digits: the tail (other writers), like the test split
    assert sorted(eval_indices(10, 0, 3) + eval_indices(10, 1, 3) + eval_indices(10, 2, 3)) == list(range(10))


def test_stroke_weight_and_elastic_distortion_vary_the_writing_not_the_digit():
    """Thickness jitter adds or removes ink; the elastic field moves pixels by at most its size, keeps
    the ink roughly where it was, and differs per draw; both are pure functions of the rng."""
    spec = Preprocess(interpolation="bicubic")
    digit = DigitImages("train").load(0)[0]
    plain = TrainTransform((32, 32), spec, scale=(1, 1), ratio=(1, 1), rotate=0, hflip=False)
    base = plain(digit, np.random.default_rng(0))
    heavy = TrainTransform((32, 32), spec, scale=(1, 1), ratio=(1, 1), rotate=0, hflip=False, thickness=1.0)
    inks = [heavy(digit, np.random.default_rng(s)).mean() - base.mean() for s in range(20)]
    assert min(inks) < -0.05 and max(inks) > 0.05  # thinner and thicker strokes both drawn
    bent = TrainTransform((32, 32), spec, scale=(1, 1), ratio=(1, 1), rotate=0, hflip=False, elastic=2.5)
    draws = [bent(digit, np.random.default_rng(s)) for s in range(10)]
    assert np.array_equal(draws[3], bent(digit, np.random.default_rng(3)))
    assert len({d.tobytes() for d in draws}) == 10
    for d in draws:
        assert 0 < np.abs(d - base).mean() < 0.3 and abs(d.mean() - base.mean()) < 0.15
        # no pixel further than 2.5 px from its source: the digit's bounding box grows by at most 3 px
        rows = np.flatnonzero((d[0] > -0.5).any(axis=1))
        base_rows = np.flatnonzero((base[0] > -0.5).any(axis=1))
        assert rows.min() >= base_rows.min() - 3 and rows.max() <= base_rows.max() + 3
