"""FID: the Fréchet distance formula and the offline Inception network."""

import numpy as np
import pytest
import scipy.linalg
import torch

from analysis.fid import InceptionFeatures, frechet_distance


def test_frechet_distance_equals_the_matrix_square_root_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(0.5, 2.0, size=(30, 6))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covariance_term = np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + covariance_term
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


def test_inception_features_run_offline():
    images = [np.zeros((32, 32, 3), np.uint8), np.full((48, 48, 3), 200, np.uint8)]
    features = InceptionFeatures(torch.device("cpu"))(images)
    assert features.shape == (2, 2048) and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])
