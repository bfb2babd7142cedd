"""
Calibrated inference with mmsegmentation
========================================

The whole flow on a real mmsegmentation model: extract its logits on a
labelled set into a :class:`~sksegcal.store.LogitStore`, fit a calibrator on a
sample of the calibration images, save it in the safe skops format, and make
the model itself return calibrated probabilities.

This example is **not executed** in the documentation build: it needs the
optional ``mmseg`` extra (``pip install -c constraints.txt -e ".[mmseg]"``)
and a trained checkpoint. Replace ``CONFIG``, ``CHECKPOINT`` and the image
lists with your own. See :doc:`/mmseg` for what each call does.
"""


# %%
# Extract the logits of the calibration images once
# -------------------------------------------------
# ``data=None`` takes the config's test dataloader dataset; a list of
# ``(image_path, label_path)`` pairs or arrays work too. The extraction is
# resumable: run it again after a crash and only missing images are computed.
from sksegcal.integrations.mmseg import calibrate_model, extract_logits, load_model

CONFIG = "configs/segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py"
CHECKPOINT = "segformer_mit-b0_ade20k.pth"

store = extract_logits(CONFIG, None, "ade20k-val-logits", checkpoint=CHECKPOINT, device="cpu")

# %%
# Fit on a sample of the store's pixels, split by image
# -----------------------------------------------------
from sksegcal import SelectiveScalingCalibrator, TemperatureScaling
from sksegcal.store import evaluate_store, fit_store

# one image-level split, recorded in the store for every later script
store.make_split(validation_size=0.25, test_size=0.25, random_state=0)
ts = fit_store(TemperatureScaling(), store, images="train", random_state=0)
calibrator = fit_store(
    SelectiveScalingCalibrator(random_state=0),  # the paper's MLP detector
    store,
    images="train",
    max_pixels=500_000,
    random_state=0,
)
accumulators = evaluate_store(
    store, {"uncalibrated": None, "ts": ts, "selective": calibrator}, images="test"
)
for name, acc in accumulators.items():
    print(name, {k: round(v, 4) for k, v in acc.summary().items()})

# %%
# Save it; anyone can load the skops file without running code
# ------------------------------------------------------------
from sksegcal.persistence import save

save(calibrator, "calibrator.skops", format="skops")

# %%
# Calibrated inference
# --------------------
# ``calibrate_model`` patches the model in place: ``seg_logits`` become the
# calibrated probabilities, ``pred_sem_seg`` (the argmax) is unchanged. A path
# is loaded through :func:`sksegcal.persistence.load`: the skops file safely,
# while a joblib/pickle file is refused unless you pass ``trusted=True`` (only
# for files you made: unpickling runs any code the file holds).
from mmseg.apis import inference_model

model = calibrate_model(load_model(CONFIG, CHECKPOINT), "calibrator.skops")
result = inference_model(model, "demo.png")
probabilities = result.seg_logits.data  # (C, H, W), sums to 1 over C
prediction = result.pred_sem_seg.data  # the model's own segmentation
