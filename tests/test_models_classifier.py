"""The ResNet classifier used for rejection sampling, CAS and features."""

import torch

from models.classifier import ResNetClassifier, classifier_tiny


def test_classifier_shapes_and_learning():
    torch.manual_seed(0)
    model = ResNetClassifier(classifier_tiny(num_classes=2))
    x = torch.cat([torch.full((8, 3, 16, 16), -0.5), torch.full((8, 3, 16, 16), 0.5)]) + 0.1 * torch.randn(16, 3, 16, 16)
    y = torch.cat([torch.zeros(8), torch.ones(8)]).long()
    assert model(x).shape == (16, 2) and model.features(x).shape == (16, model.feature_dim)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model.eval()(x).argmax(1) == y).all()
