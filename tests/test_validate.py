"""The argument-check helpers against torch's own rules."""

import random

import pytest
import torch

from fastvae._validate import broadcast_shapes, check_choice


def test_broadcast_shapes_matches_torch():
    rng = random.Random(0)
    for _ in range(3000):
        shapes = [tuple(rng.choice([0, 1, 2, 3]) for _ in range(rng.randint(0, 4))) for _ in "ab"]
        try:
            expected = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            expected = None
        assert broadcast_shapes(*shapes) == expected, shapes


def test_check_choice_names_the_argument_the_choices_and_the_value():
    assert check_choice("loss", "hinge", ("nonsaturating", "hinge")) == "hinge"
    for bad in ("wgan", None, 3, ["hinge"]):
        with pytest.raises(ValueError) as info:
            check_choice("loss", bad, ("nonsaturating", "hinge"))
        assert str(info.value) == f"loss must be one of nonsaturating, hinge; got {bad!r}"
