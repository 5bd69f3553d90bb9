"""The MLflow pyfunc served for every liverseg model (logged as code, not a pickle).

Input: float32 array [N, C, H, W] of raw pixel values in 0..255 (any H, W >= 32).
Output: float32 probabilities: the foreground's [N, 1, H, W] for a binary model, each
class's [N, C, H, W] (softmax) for a multi-class one.
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
        from liverseg.labels import probabilities

        with open(context.artifacts["config"]) as fh:
            self.config = json.load(fh)
        self.model = build_from_config(self.config)
        self.model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model.eval()
        self.torch, self.probabilities = torch, probabilities

    def predict(self, context, model_input, params=None):
        norm = self.config["normalisation"]
        x = np.asarray(model_input, dtype=np.float32) / norm["scale"]
        x = self.torch.from_numpy((x - norm["mean"]) / norm["std"])
        with self.torch.no_grad():
            return self.probabilities(self.model(x)).numpy()


mlflow.models.set_model(LiversegModel())
