"""callbacks.EpochLine: a line per epoch with the epoch's own figures (compared with what the module computed),
a step line when asked, nothing from a rank other than 0, and through the progress bar in a terminal."""

from __future__ import annotations

import math
import re
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from callbacks import EpochLine
from callbacks.epoch_line import LINE

BATCHES, EPOCHS = 3, 2


class Tiny(L.LightningModule):
    """A linear classifier of 4 features that records its own training losses and validation figures per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.losses: dict[int, list[float]] = {}
        self.val: dict[int, list[tuple[float, float]]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.layer(x), y)
        self.losses.setdefault(self.current_epoch, []).append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.layer(x)
        loss, acc = F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()
        self.log("val/loss", loss)
        self.log("val/acc", acc)
        if not self.trainer.sanity_checking:
            self.val.setdefault(self.current_epoch, []).append((float(loss), float(acc)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8 * BATCHES, 4, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


def fit(callback: EpochLine, bar: bool = False) -> Tiny:
    model = Tiny()
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=bar, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu", devices=1)  # fmt: skip
    trainer.fit(model, loader(), loader())
    return model


NUMBER = r"(\d+\.\d+)"


def test_one_line_per_epoch_with_that_epochs_figures(capsys):
    model = fit(EpochLine(every_s=math.inf))
    lines = [line for line in capsys.readouterr().out.splitlines() if LINE.match(line)]
    assert len(lines) == EPOCHS
    seconds = []
    for epoch, line in enumerate(lines):
        pattern = rf"epoch {epoch + 1}/{EPOCHS} done: train loss {NUMBER}, val loss {NUMBER}, val acc {NUMBER}, (\d+) s"
        found = re.fullmatch(pattern + " so far", line)
        assert found, line
        train_loss, val_loss, val_acc = (float(v) for v in found.groups()[:3])
        assert train_loss == pytest.approx(sum(model.losses[epoch]) / BATCHES, abs=1e-4)
        epoch_means = [sum(batch[k] for batch in model.val[epoch]) / BATCHES for k in (0, 1)]  # equal batches
        assert [val_loss, val_acc] == pytest.approx(epoch_means, abs=1e-4)
        seconds.append(int(found.group(4)))
    assert seconds == sorted(seconds)


def test_every_step_when_asked_and_nothing_from_another_rank(capsys, monkeypatch):
    fit(EpochLine(every_s=0))
    lines = [line for line in capsys.readouterr().out.splitlines() if LINE.match(line)]
    steps = [line for line in lines if ", step " in line]
    assert len(steps) == EPOCHS * BATCHES and len(lines) == EPOCHS * (BATCHES + 1)
    assert steps[0].startswith(f"epoch 1/{EPOCHS}, step 1/{BATCHES}: train loss ")
    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda self: False))
    fit(EpochLine(every_s=0))
    assert not [line for line in capsys.readouterr().out.splitlines() if LINE.match(line)]


def test_in_a_terminal_with_a_bar_epoch_lines_go_through_the_bar(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    printed = []
    monkeypatch.setattr(L.pytorch.callbacks.TQDMProgressBar, "print", lambda self, *a, **k: printed.append(a[0]))
    fit(EpochLine(every_s=0), bar=True)
    assert [line.split(":")[0] for line in printed] == [f"epoch {e}/{EPOCHS} done" for e in range(1, EPOCHS + 1)]
    assert not [line for line in capsys.readouterr().out.splitlines() if LINE.match(line)]  # only the bar's own


def test_a_negative_interval_is_refused():
    with pytest.raises(ValueError, match="every_s must be >= 0"):
        EpochLine(every_s=-1)
