"""The MLflow pyfunc served for every liverseg model (logged as code, not a pickle).

Input: float32 array [N, C, H, W] of raw pixel values in 0..255 (any H, W >= 32).
Output: float32 foreground probabilities [N, 1, H, W].
"""

import json

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class LiversegModel(PythonModel):
    def load_context(self, context):
        import torch
        from safetensors.torch import load_file

        from liverseg.checkpoint import build_from_config

        with open(context.artifacts["config"]) as fh:
            self.config = json.load(fh)
        self.model = build_from_config(self.config)
        self.model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model.eval()
        self.torch = torch

    def predict(self, context, model_input, params=None):
        norm = self.config["normalisation"]
        x = np.asarray(model_input, dtype=np.float32) / norm["scale"]
        x = self.torch.from_numpy((x - norm["mean"]) / norm["std"])
        with self.torch.no_grad():
            return self.model(x).sigmoid().numpy()


mlflow.models.set_model(LiversegModel())
