"""FID: the Fréchet distance formula and the offline Inception network."""

import numpy as np
import pytest
import scipy.linalg
import torch

from PIL import Image

from analysis.fid import (
    InceptionFeatures,
    ReferenceStatistics,
    frechet_distance,
    frechet_distance_to,
    load_reference_statistics,
    reference_features,
)
from errors import UserError


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
    inception = InceptionFeatures(torch.device("cpu"))
    features = inception(images)
    assert features.shape == (2, 2048) and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])
    assert inception.identity.startswith("inception ") and inception.identity.endswith(", cpu")  # the cache key's


class CountingFeatures:
    """A stand-in feature extractor: the mean colour of each image, and how many times it was called."""

    identity = "mean colour"

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return np.stack([image.reshape(-1, 3).mean(0) for image in images])


def test_reference_features_are_computed_once_per_reference_set(tmp_path):
    references = [np.full((8, 8, 3), value, np.uint8) for value in (10, 200)]
    extract = CountingFeatures()
    first = reference_features(extract, references, tmp_path / "cache")
    again = reference_features(extract, [image.copy() for image in references], tmp_path / "cache")
    assert extract.calls == 1 and np.array_equal(first, again)  # the second run reads the cache
    changed = [references[0], np.full((8, 8, 3), 201, np.uint8)]
    assert reference_features(extract, changed, tmp_path / "cache")[1, 0] == 201 and extract.calls == 2
    other = CountingFeatures()
    other.identity = "another network"
    reference_features(other, references, tmp_path / "cache")
    assert other.calls == 1  # another extractor's features are its own
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_fid_against_reference_statistics_equals_the_matrix_square_root_formula():
    rng = np.random.default_rng(1)
    features, reference_set = rng.normal(size=(12, 6)), rng.normal(0.3, 1.5, size=(50, 6))  # fewer images than dims
    reference = ReferenceStatistics(reference_set.mean(0), np.cov(reference_set, rowvar=False), "test")
    cov = np.cov(features, rowvar=False)
    covariance_term = np.trace(cov + reference.covariance - 2 * scipy.linalg.sqrtm(cov @ reference.covariance).real)
    expected = ((features.mean(0) - reference.mean) ** 2).sum() + covariance_term
    assert frechet_distance_to(features, reference) == pytest.approx(expected, rel=1e-7)


def test_reference_statistics_from_an_npz_and_clear_errors(tmp_path):
    rng = np.random.default_rng(2)
    good = tmp_path / "ref.npz"
    np.savez(good, mu=rng.normal(size=2048), sigma=np.eye(2048))
    loaded = load_reference_statistics(good, extract=None, cache_dir=tmp_path)
    assert loaded.mean.shape == (2048,) and loaded.covariance.shape == (2048, 2048)
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 8, 8, 3)))
    with pytest.raises(UserError, match=r"no \['mu', 'sigma'\].*arr_0"):
        load_reference_statistics(tmp_path / "images.npz", extract=None, cache_dir=tmp_path)
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(UserError, match=r"not the Inception pool features"):
        load_reference_statistics(tmp_path / "small.npz", extract=None, cache_dir=tmp_path)
    with pytest.raises(UserError, match="neither an .npz"):
        load_reference_statistics(tmp_path / "missing.npz", extract=None, cache_dir=tmp_path)


def test_reference_statistics_from_a_folder_of_images(tmp_path):
    folder = tmp_path / "reference"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")

    class MeanColour:
        identity = "mean colour"

        def __call__(self, images):
            return np.stack([image.reshape(-1, 3).mean(0) for image in images]).astype(np.float64)

    statistics = load_reference_statistics(folder, MeanColour(), tmp_path / "cache")
    np.testing.assert_allclose(statistics.mean, [60.0, 60.0, 60.0])
    assert statistics.covariance.shape == (3, 3)
