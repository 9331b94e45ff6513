"""The quality harness's measuring parts: the data set, the Fréchet distance, real scenes per prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepfleet.training.classifier import Judgement
from stepfleet.training.quality import accuracy, frechet_distance, scenes_for


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    assert frechet_distance(a, rng.normal(size=(20000, 3))) == pytest.approx(0.0, abs=0.01)
    # Shifted mean d and scaled covariance s²I: ‖d‖² + k(1 − s)² for k dimensions.
    b = rng.normal(size=(20000, 3)) * 2.0 + np.array([1.0, 0.0, 2.0])
    assert frechet_distance(a, b) == pytest.approx(5.0 + 3 * (1 - 2) ** 2, rel=0.03)


def test_accuracy_counts_each_head_and_their_conjunctions():
    t = torch.tensor
    j = Judgement(label=t([1, 2, 3, 4]), item_color=t([0, 0, 1, 1]), background=t([5, 5, 5, 6]), features=torch.zeros(4, 2))
    acc = accuracy(j, t([1, 2, 0, 4]), t([0, 1, 1, 1]), t([5, 5, 5, 5]))
    assert acc == {"class": 0.75, "item_color": 0.75, "background": 0.75, "colors": 0.5, "all": 0.25}


def test_the_packaged_data_set_loads_and_real_scenes_follow_their_triples():
    from stepfleet.training.fashion import load_split

    test = load_split("test")  # Debian's dataset-fashion-mnist, installed by `make test` (scripts/fetch-tools.sh)
    assert len(test) == 10000 and test.images.shape == (10000, 28, 28)
    assert np.bincount(test.labels).tolist() == [1000] * 10
    triples = torch.tensor([[9, 0, 4], [1, 6, 7]])
    scenes = scenes_for(test, triples, torch.Generator().manual_seed(0))
    assert scenes.shape == (2, 3, 64, 64)
    from stepfleet.training.scenes import COLORS

    corner = tuple(round(float(v)) for v in (scenes[0, :, 0, 0] + 1) * 127.5)
    assert corner == list(COLORS.values())[4]
