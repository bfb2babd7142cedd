"""Per-image logits on disk: the LogitStore and out-of-core fitting/evaluation.

A segmentation validation set at full resolution does not fit in memory
(ADE20K: about 500M pixels x 150 classes, 150 GB in float16). A
:class:`LogitStore` keeps one ``.npy`` file per image on disk and reads it in
row blocks, so every pass over the data (sampling a training table,
evaluating calibrators, writing calibrated maps) holds one block at a time.

Layout of a store directory::

    manifest.json                        format, classes, ignore index, dtypes, source, split
    images/<stem>.<token>.logits.npy     float16 (C, H, W) logits (or probabilities)
    images/<stem>.<token>.labels.npy     uint8/uint16 (H, W) labels
    images/<stem>.json                   the image's record: name, shape, pixel counts,
                                         file name, size and sha256 of both arrays

(Stores written before the random ``<token>`` was added name their arrays
``<stem>.logits.npy`` and ``<stem>.labels.npy``; they open unchanged.)

Every file is written to a temporary file in the same directory, fsynced and
renamed into place, and an image's record is written last. A record is the
image's commit mark: a writer killed at any moment leaves either a complete
image or no image (plus, at worst, stray files that :meth:`LogitStore.clean`
removes), and writing resumes with :meth:`LogitStore.missing`. Records are
one file per image rather than one list in the manifest so that adding an
image costs O(1) and so that several processes or machines can extract images
into one store on shared storage: writers of different names never contend,
and of two writers of one name exactly one commits (docs/store.md, "Several
writers").

The package, one idea a module:

- ``_format``: names, file names, and the checks of manifests and records;
- ``_commit``: how an image is committed beside other writers; stray files;
- ``_logit_store``: :class:`LogitStore` and :class:`StoredImage`;
- ``_sampling``: the one-pass stratified pixel sample;
- ``_engine``: :func:`fit_store`, :func:`evaluate_store`, :func:`predict_store`.
"""

from ._engine import (  # noqa: F401 - the constant is re-exported too
    DEFAULT_TASK_PIXELS,
    calibrator_fingerprint,
    evaluate_store,
    fit_store,
    predict_store,
)
from ._format import FORMAT_NAME, FORMAT_VERSION  # noqa: F401
from ._logit_store import (  # noqa: F401
    DEFAULT_CHUNK_VALUES,
    DEFAULT_GRACE_SECONDS,
    ImageInfo,
    LogitStore,
    StoredImage,
)

__all__ = [
    "ImageInfo",
    "LogitStore",
    "StoredImage",
    "calibrator_fingerprint",
    "evaluate_store",
    "fit_store",
    "predict_store",
]

# Pickles and skops files name the module that defines a class or function: its
# ``__module__``, left as Python sets it so that ``inspect.getsource`` finds the code
# (scikit-learn's pickles name its private modules too). Files that name this
# package (sksegcal.store.LogitStore, written when ``__module__`` said so) load
# through the names imported above. A name that moves stays importable where it was.
