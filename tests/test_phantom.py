import numpy as np

from liverseg.data import phantom
from liverseg.metrics import global_metrics


def _slices(seed=42, patients=4):
    return list(phantom.generate(patients, 6, 96, 3, 12.0, seed))


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b, c = _slices(1), _slices(1), _slices(2)
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.labels, y.labels)
               for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c, strict=True))


def test_anatomy_is_plausible():
    slices = _slices(patients=8)
    labels = np.stack([s.labels for s in slices])
    assert set(np.unique(labels)) <= {phantom.BACKGROUND, phantom.LIVER, phantom.TUMOUR}
    assert all((s.labels >= phantom.LIVER).mean() > 0.03 for s in slices)  # liver in each slice
    has_tumour = (labels == phantom.TUMOUR).any(axis=(1, 2))
    assert 0 < has_tumour.mean() < 1  # some slices with tumours, some without
    assert {s.patient_id for s in slices} == {f"phantom{p:03d}" for p in range(8)}


def test_a_plain_threshold_does_not_solve_it():
    """Hypodense decoys (gallbladder, stomach fluid, vessels) defeat an intensity threshold."""
    slices = _slices(patients=8)
    truth = np.stack([s.labels == phantom.TUMOUR for s in slices])
    images = np.stack([s.image for s in slices]).astype(float)
    best = 0.0
    for low in range(40, 160, 5):  # the best band of grey values, chosen knowing the truth
        for width in (10, 20, 30, 40):
            pred = (images >= low) & (images < low + width)
            tp, fp = (pred & truth).sum(), (pred & ~truth).sum()
            fn, tn = (~pred & truth).sum(), (~pred & ~truth).sum()
            best = max(best, global_metrics(tp, fp, fn, tn)["fg_iou"])
    assert best < 0.2
