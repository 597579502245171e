import io

import numpy as np
import pytest
from PIL import Image

from benchmarks.images import KINDS, image_set, photo_like


@pytest.mark.parametrize("kind", ["jpeg-640x480", "png-128x128"])
def test_images_decode_to_their_kind(kind):
    width, height, fmt = KINDS[kind]
    for im in image_set(kind, 2):
        decoded = Image.open(io.BytesIO(im.data))
        assert decoded.format == fmt
        assert decoded.size == (width, height) == (im.width, im.height)
        assert decoded.mode == "RGB"


def test_images_are_deterministic_and_distinct():
    a, b = image_set("jpeg-64x48", 3, seed=1), image_set("jpeg-64x48", 3, seed=1)
    assert [i.data for i in a] == [i.data for i in b]
    assert len({i.data for i in a}) == 3
    assert a[0].data != image_set("jpeg-64x48", 1, seed=2)[0].data


def test_images_look_like_photos_not_flat_colour():
    pixels = np.asarray(photo_like(320, 240, seed=3), dtype=np.float32)
    assert pixels.std() > 20  # lighting and shapes spread the values
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10_000  # noise and gradients: many colours
    # Neighbouring pixels stay correlated (smooth content), unlike white noise.
    dx = np.abs(np.diff(pixels, axis=1)).mean()
    assert dx < 0.5 * pixels.std()


def test_jpeg_sizes_are_realistic():
    size = len(image_set("jpeg-640x480", 1)[0].data)
    assert 30_000 < size < 300_000


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown image kind"):
        image_set("gif-1x1", 1)
