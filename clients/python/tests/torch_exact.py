"""Run by test_torch in a child process whose torch uses its portable
kernels (ATEN_CPU_CAPABILITY=default): trains RemoteOptimizer and
torch.optim side by side and prints the largest difference per optimizer
as JSON.  Usage: python3 -m tests.torch_exact URL"""

import json
import sys

import torch

import optd

from .test_torch import data, flat, train_pair


def main(url):
    x, y = data()
    out = {}
    with optd.Client(url) as client:
        for key, cfg, local in (
                ("adam", {"type": "adam", "lr": 0.01},
                 lambda p: torch.optim.Adam(p, lr=0.01)),
                ("sgd", {"type": "sgd", "lr": 0.05, "momentum": 0.9},
                 lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))):
            _, remote_model, local_model, _ = train_pair(
                client, "exact-" + key, cfg, local, key == "adam", x, y)
            out[key] = (flat(remote_model) - flat(local_model)).abs().max().item()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
