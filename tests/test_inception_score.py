"""Judge-IS (`tdq.eval.inception_score`): the formula's two extremes, splits, errors, and the MNIST judge's score of
real MNIST digits (high: confident, all ten digits) against a one-digit subset (near 1)."""

import math

import pytest
import torch

from tdq.eval.data import class_metrics, load_dataset_images
from tdq.eval.inception_score import inception_score
from tdq.zoo.judge import load_judge


def _confident(classes, num_classes=10, margin=60.0):
    logits = torch.zeros(len(classes), num_classes)
    logits[torch.arange(len(classes)), torch.as_tensor(classes)] = margin
    return logits


def test_uniform_confident_logits_score_the_number_of_classes():
    mean, std = inception_score(_confident([i % 10 for i in range(200)]))
    assert mean == pytest.approx(10.0, rel=1e-9) and std == 0.0
    mean, std = inception_score(_confident([i % 4 for i in range(200)], num_classes=10), splits=5)
    assert mean == pytest.approx(4.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_one_class_or_unconfident_logits_score_one():
    assert inception_score(_confident([3] * 50))[0] == pytest.approx(1.0, abs=1e-9)
    assert inception_score(torch.zeros(50, 10))[0] == pytest.approx(1.0, abs=1e-9)


def test_matches_the_formula_on_random_logits():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
    p = logits.double().softmax(-1)
    parts = [p[:32], p[32:]]
    want = [math.exp(float((q * (q.log() - q.mean(0).log())).sum(-1).mean())) for q in parts]
    mean, std = inception_score(logits, splits=2)
    assert mean == pytest.approx(sum(want) / 2, rel=1e-9)
    assert std == pytest.approx(abs(want[0] - want[1]) / 2, rel=1e-9)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="shape"):
        inception_score(torch.zeros(10))
    with pytest.raises(ValueError, match="splits=3"):
        inception_score(torch.zeros(2, 10), splits=3)
    with pytest.raises(ValueError, match="NaN"):
        inception_score(torch.full((4, 10), float("nan")))


def test_judge_is_of_real_mnist_digits_is_high():
    judge = load_judge()
    images, labels = load_dataset_images("mnist-test", 500)
    with torch.no_grad():
        real = class_metrics(images, judge, labels)["inception_score"]
        ones = class_metrics(images[labels == 1], judge)["inception_score"]
    assert real >= 8.5, real  # 10 classes, near-balanced, confident judge
    assert ones <= 1.2, ones
