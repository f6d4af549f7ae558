"""The user's model: a deep tanh MLP, the kind of network deep supervision was made for."""

from torch import nn


class DeepTanhMLP(nn.Module):
    """``depth`` tanh layers of ``width`` units, then a linear classifier; the hidden layers are ``body.0`` ..."""

    def __init__(self, in_features: int = 64, width: int = 64, depth: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        layers, size = [], in_features
        for _ in range(depth):
            layers.append(nn.Sequential(nn.Linear(size, width), nn.Tanh()))
            size = width
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.body(x.flatten(1)))


def build(in_features: int = 64, width: int = 64, depth: int = 8, num_classes: int = 10) -> DeepTanhMLP:
    return DeepTanhMLP(in_features, width, depth, num_classes)
