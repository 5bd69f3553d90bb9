"""The MLflow pyfunc served for every liverseg model (logged as code, not a pickle).

Input: float32 array [N, C, H, W] of grey values 0..255 (any H, W): a slice as
`liverseg.preprocess` makes it (for a volume: canonical orientation, the model's HU window;
a 2.5D model, `context_slices` k in its metadata, takes slices z-k..z+k as the C = 2k + 1
channels, edges repeating the edge: `preprocess.context_stack`).
Output: float32 probabilities at the input's H, W: the foreground's [N, 1, H, W] for a
binary model, each class's [N, C, H, W] (softmax) for a multi-class one. The resize to the
trained size, the normalisation and the resize back happen inside (`served.Served`), the
same code evaluate and `liverseg predict` run; the parameters are the model's
`config.json` `preprocessing` block, also in the registered model's metadata. A registered
version also carries evaluate's choice of mirroring and post-processing (the `inference`
artifact, logged by register: `liverseg.postprocess`): mirroring averages the
flipped inputs' probabilities; where post-processing removes a pixel (2D components per
image: a batch has no case identity), its probabilities become background's, so the
caller's threshold or argmax gives the post-processed mask.

This is the REST contract (`mlflow models serve`): an input outside it (NaN/inf, values
outside 0..255, channels other than the model's, H or W outside 16..2048, more than 64
images, not 4-D; `liverseg.boundary.Limits`) is refused with an MlflowException
naming the rule, which the scoring server answers with HTTP 400.
"""

import json

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


class LiversegModel(PythonModel):
    def load_context(self, context):
        import torch
        from safetensors.torch import load_file

        from liverseg.checkpoint import build_from_config
        from liverseg.preprocess import Preprocessing
        from liverseg.served import Served

        with open(context.artifacts["config"]) as fh:
            self.config = json.load(fh)
        self.model = build_from_config(self.config)
        self.model.load_state_dict(load_file(context.artifacts["weights"]))
        self.model.eval()
        from liverseg.postprocess import INFERENCE_KEY, Inference

        decision = context.artifacts.get(INFERENCE_KEY)
        if decision:  # logged with the registered version (a training run's own: none)
            with open(decision) as fh:
                self.config["inference"] = json.load(fh)
        self.inference = Inference.from_dict(self.config.get("inference"))
        prep = self.inference.preprocessing(Preprocessing.from_config(self.config))
        self.net = Served(self.model, prep, mirror=self.inference.mirror).eval()
        self.torch = torch
        from liverseg.boundary import Limits

        self.limits = Limits.from_env()  # read once when the server loads, not per request
        from liverseg.monitoring.store import default_store

        # One monitoring row per request (no case identity reaches REST: image facts only).
        self.store = default_store()
        self.identity = {"model_ref": "pyfunc", "model_name": self.config.get("model", ""),
                         "model_run": self.config.get("run_id", "")}

    # np.ndarray: a hint MLflow accepts without converting or validating the input (the
    # boundary's checks below do that), and without its "Add type hints" warning.
    def predict(self, context, model_input: np.ndarray, params=None):
        from liverseg.boundary import Refused, check_grey_batch

        try:
            x = np.asarray(model_input, dtype=np.float32)
            check_grey_batch(x, self.net.prep.in_channels, self.limits)
        except (Refused, ValueError, TypeError) as exc:  # TypeError: ragged or non-numbers
            raise MlflowException(f"liverseg: {exc}", INVALID_PARAMETER_VALUE) from None
        with self.torch.no_grad():
            probs = self.net(self.torch.from_numpy(x))
        probs = self.inference.apply_to_probabilities(probs, self.net.prep.classes,
                                                      self.net.prep.threshold)
        if self.store is not None:
            self._record(x, probs)
        return probs.numpy()

    def _record(self, x: np.ndarray, probs) -> None:
        from liverseg.labels import to_classes
        from liverseg.serving.watch import Watch, record

        prep, watch = self.net.prep, Watch()
        watch.saw(x[:, x.shape[1] // 2].astype(np.uint8))  # the slice itself (2.5D: centre)
        watch.guard(watch.confidence.update, probs)
        watch.answered(to_classes(probs, prep.threshold).numpy(), prep.classes, None,
                       volume=False)
        record(self.store, self.identity, "rest", watch)


mlflow.models.set_model(LiversegModel())
