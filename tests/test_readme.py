"""The README's quickstart runs as written, on small stand-ins for the objects it names."""
import pathlib
import re

import pytest
import torch
from torch import nn

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 12)
        self.classifier = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 10))
        self.fc3 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.classifier(torch.tanh(self.fc1(x)))))


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(), nn.Flatten())
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(self.features(x))


def test_the_quickstart_runs_as_written(capsys):
    transformers = pytest.importorskip("transformers")
    block = re.search(r"## Quickstart\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(0, 3, (64,))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50,
                                                                n_positions=16))
    names = {"model": Net(), "inputs": x, "targets": y, "x": x, "y": y, "cnn": Cnn(),
             "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16),
             "phi": torch.randn(64, 10), "W": torch.randn(3, 10), "b": torch.zeros(3), "gpt2": gpt2,
             "ids": torch.randint(0, 50, (4, 8))}
    exec(compile(block, str(README), "exec"), names)
    assert "kappa" in capsys.readouterr().out  # the profile's table
    assert names["loss"].requires_grad
