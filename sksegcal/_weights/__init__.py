"""The trained U-Nets of ``sksegcal demo``, shipped so that the demo trains nothing.

``unet-<dataset>[-quick].npz`` holds one network's state dict as float16 arrays
(load with ``numpy.load(..., allow_pickle=False)``; no pickle anywhere), and
``manifest.json`` how each was made: the settings, seed and thread count, the
torch / numpy / Python versions, the sha256 of the training data and of the
file. :func:`sksegcal._segnet.load_demo_network` reads them and checks the hash.
Remake them with ``python -m sksegcal._weights.make_weights`` (see there).
"""
