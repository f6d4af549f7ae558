"""The user's data: ``TensorDataset`` splits of ``(x, y)`` tuples.

``build`` makes a synthetic problem (a fixed random teacher network labels Gaussian inputs), so the example runs
anywhere; ``fashion_mnist`` reads the IDX files of Fashion-MNIST from a local folder.
"""

import torch
from torch.utils.data import TensorDataset


def build(seed: int, n_train: int = 400, n_val: int = 200, n_test: int = 400, features: int = 64,
          classes: int = 10):
    teacher = torch.Generator().manual_seed(1234)  # one fixed labelling rule for every seed
    w1 = torch.randn(features, 32, generator=teacher)
    w2 = torch.randn(32, classes, generator=teacher)
    g = torch.Generator().manual_seed(seed)  # the samples drawn depend on the seed
    n = n_train + n_val + n_test
    x = torch.randn(n, features, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    cut = [n_train, n_train + n_val]
    return {"train": TensorDataset(x[:cut[0]], y[:cut[0]]),
            "val": TensorDataset(x[cut[0]:cut[1]], y[cut[0]:cut[1]]),
            "test": TensorDataset(x[cut[1]:], y[cut[1]:])}
