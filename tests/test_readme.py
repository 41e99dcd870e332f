"""The README's Python examples run as written (with tiny stand-in networks)."""

import pathlib
import re

import pytest
import torch
from torch import nn

import fastvae

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("block", BLOCKS)
def test_example_runs(block):
    names = {"fastvae": fastvae, "torch": torch, "x": torch.randn(5, 3)}
    names |= {"encoder": nn.Linear(3, 4), "decoder": nn.Linear(2, 6)}
    exec(block, names)


def test_examples_exist():
    assert len(BLOCKS) >= 2
