"""Progress bars name what they count: the margin bar of each subspace family (frequency_analysis.py random runs
two families, one bar each)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from frequency import DCTBlockSubspaces
from frequency.random_subspaces import RandomSubspaces
from margins.run.evaluate import evaluate_margins
from margins.settings import AttackSettings, RunSettings


def test_margin_bars_name_the_family_and_the_rows(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    dataset = [(x[i], i) for i in range(3)]
    families = {"dct": DCTBlockSubspaces((1, 8, 8), 4, 4), "random": RandomSubspaces((1, 8, 8), 16, 4, seed=0)}
    for name, family in families.items():
        evaluate_margins(model=model, dataset=dataset, subspaces=family, indices=np.arange(3),
                         output_dir=tmp_path / name, attack=AttackSettings(max_iter=5),
                         run=RunSettings(accelerator="cpu", devices=1, progress=True))  # fmt: skip
        err = capsys.readouterr().err
        rows = 3 * len(family)
        assert f"margins along {name} subspaces: (sample, subspace) rows: 100%" in err and f"{rows}/{rows}" in err
