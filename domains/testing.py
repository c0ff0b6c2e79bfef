"""A small continuous adapter for tests and examples of the adapter protocol (not registered).

``FramesTestAdapter``: frames of ``width`` float32 values, a model predicting the first ``output_width`` of them,
MSE as loss and metric, stored as ``.npy`` files of shape (T, width). Subclass it with a ``name`` of your own (and
other widths) and register the subclass with ``register_adapter``; seqlab's own tests do.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Adapter, InputSpec

__all__ = ["FramesTestAdapter"]


class FramesTestAdapter(Adapter):
    name = "test-frames-base"
    loss_unit = "mse"
    width = 3
    output_width = 3

    def settings(self):
        return {}

    @property
    def input_spec(self):
        return InputSpec("continuous", width=self.width, output_width=self.output_width)

    def encode(self, raw):
        return torch.as_tensor(np.asarray(raw), dtype=torch.float32)

    def decode(self, tensor):
        return tensor.numpy()

    def read(self, path, **options):
        return np.load(path)

    def iter_windows(self, path, window, **options):
        data = np.load(path, mmap_mode="r")
        for start in range(0, data.shape[0], window):
            yield self.encode(np.array(data[start : start + window]))

    def write(self, path, raw):
        np.save(path, np.asarray(raw))

    def loss(self, output, targets):
        return torch.nn.functional.mse_loss(output.output, targets[..., : self.output_width])

    def metric(self, output, targets):
        return float(self.loss(output, targets))

    def position_metric(self, output, targets):
        with torch.no_grad():
            error = output.output.float() - targets[..., : self.output_width].float()
            return (error * error).mean(-1)
