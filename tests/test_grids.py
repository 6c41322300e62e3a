"""Sample grids people can read: samples scaled up to at least 64 pixels, rows and columns labelled."""

import pytest
import torch
from PIL import Image

from diffsparse.grids import labelled_grid


def test_small_samples_are_scaled_up_whole_and_labelled(tmp_path):
    images = torch.rand(20, 1, 16, 16)
    path = labelled_grid(images, tmp_path / "grid.png", [str(c) for c in range(10)], ["dense", "learned"], "title")
    with Image.open(path) as im:
        width, height = im.size
    # 10 columns of samples at least 64 px wide (16 px scaled 4x), 2 rows of at least 64 px, plus the labels
    assert width >= 10 * 64 and height >= 2 * 64


def test_the_row_labels_must_match_the_rows_and_nothing_is_written_on_error(tmp_path):
    with pytest.raises(ValueError, match="make 2 rows"):
        labelled_grid(torch.rand(20, 1, 8, 8), tmp_path / "grid.png", [str(c) for c in range(10)], ["one row"])
    assert list(tmp_path.iterdir()) == []
