"""The argument-check helpers against torch's own rules."""

import random

import torch

from fastvae._validate import broadcast_shapes


def test_broadcast_shapes_matches_torch():
    rng = random.Random(0)
    for _ in range(3000):
        shapes = [tuple(rng.choice([0, 1, 2, 3]) for _ in range(rng.randint(0, 4))) for _ in "ab"]
        try:
            expected = torch.broadcast_shapes(*shapes)
        except RuntimeError:
            expected = None
        assert broadcast_shapes(*shapes) == expected, shapes
