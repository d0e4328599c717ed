"""Entity drawings: deterministic, distinct per shape/colour/pattern, perturbations change pixels, bad looks fail."""
from __future__ import annotations

import numpy as np
import pytest

from data.render import COLOURS, PATTERNS, SHAPES, TINTS, Look, Perturbation, render
from protocol.images import decode_image, encode_png


def _pixels(look: Look, perturbation: Perturbation = Perturbation()) -> np.ndarray:
    return np.asarray(render(look, 56, perturbation), dtype=np.int16)


def test_render_is_deterministic_and_png_round_trips():
    look = Look("star", "red", "stripes", 2)
    p = Perturbation(dx=1.0, dy=-1.0, brightness=1.05, noise_std=4.0, noise_seed=7)
    a, b = encode_png(render(look, 56, p)), encode_png(render(look, 56, p))
    assert a == b
    assert np.array_equal(np.asarray(decode_image(a)), _pixels(look, p))


def test_every_shape_colour_and_pattern_draws_differently():
    base = Look("circle", "red", "plain")
    for shape in SHAPES[1:]:
        assert np.abs(_pixels(Look(shape, "red", "plain")) - _pixels(base)).sum() > 0, shape
    for colour in list(COLOURS)[1:]:
        assert np.abs(_pixels(Look("circle", colour, "plain")) - _pixels(base)).mean() > 5, colour
    for pattern in list(PATTERNS)[:-1]:
        assert np.abs(_pixels(Look("circle", "red", pattern)) - _pixels(base)).sum() > 0, pattern


def test_object_colour_dominates_the_centre():
    for name, rgb in COLOURS.items():
        centre = _pixels(Look("square", name, "dots", 1))[24:32, 24:32].reshape(-1, 3).mean(0)
        assert np.abs(centre - np.array(rgb)).max() < 12, name


def test_perturbations_change_pixels_but_stay_close():
    look = Look("hexagon", "blue", "grid", 3)
    clean = _pixels(look)
    noisy = _pixels(look, Perturbation(dx=1.5, dy=1.5, brightness=1.06, noise_std=4.0, noise_seed=1))
    assert 0 < np.abs(noisy - clean).mean() < 25


@pytest.mark.parametrize("look,size", [
    (Look("blob", "red", "plain"), 56), (Look("circle", "mauve", "plain"), 56),
    (Look("circle", "red", "zigzag"), 56), (Look("circle", "red", "plain", len(TINTS)), 56),
    (Look("circle", "red", "plain"), 8),
])
def test_bad_look_or_size_is_rejected(look, size):
    with pytest.raises(ValueError):
        render(look, size)
