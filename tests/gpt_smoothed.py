"""The example GPT (examples/gpt.py, untouched) under a loss with label smoothing and
ignored rows: the user's own training-loop code, which tp_compile captures whole."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

import gpt


class SmoothedLossGPT(nn.Module):
    def __init__(self, model: gpt.GPT, label_smoothing: float = 0.1):
        super().__init__()
        self.gpt = model
        self.config = model.config
        self.label_smoothing = label_smoothing

    def forward(self, idx, targets):
        logits = self.gpt(idx)
        targets = targets.masked_fill(idx % 4 == 0, -1)  # about a quarter of the rows ignored
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
            label_smoothing=self.label_smoothing,
        )


def make_model(**overrides):
    model, batch = gpt.make_model(**overrides)
    return SmoothedLossGPT(model), batch
