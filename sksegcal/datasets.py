"""The embedded real default data: brain MRI slices with tissue or atlas labels.

Two segmentation tasks are built offline, from files that ``pip`` (or Debian's
``apt``) installs, so that ``sksegcal demo`` needs neither a GPU nor internet:

``"mni152-tissue"`` (always available with the ``demo`` extra)
    The ICBM 2009a MNI152 T1 template and its grey/white-matter probability
    maps, all three shipped inside the nilearn wheel
    (:func:`nilearn.datasets.load_mni152_template` and friends read them from
    the package; they never download). Axial 2 mm slices are the images; the
    labels are ``0 = other`` (CSF, non-brain, air), ``1 = grey matter``,
    ``2 = white matter``, by the rule

        label = argmax(1 - p_gm - p_wm, p_gm, p_wm)    (ties go to the lower label)

    i.e. the most probable tissue, with "other" carrying the probability mass
    that is neither grey nor white matter.

``"aal"`` (when Debian's ``mricron-data`` is installed)
    The Colin27 single-subject T1 (``ch2bet.nii.gz``, brain-extracted) with the
    AAL atlas (``aal.nii.gz``): 116 regions plus background, 117 classes, both
    from ``/usr/share/mricron/templates``. Install them with
    ``sudo apt-get install mricron-data``. Volumes are resampled to 2 mm by
    taking every other voxel (nearest neighbour, so the labels stay labels).

Each template is a single brain, so variety comes from simulated acquisitions.
Every image is one axial slice seen through :func:`simulate_acquisition`: a
random gain, a mild gamma (contrast) change, a smooth multiplicative bias field
and Rician noise. Images are seeded individually from
``(random_state, subset, slice, repeat)``, so the data are deterministic and do
not depend on which other images were asked for.

The slices are split **by slice**, never by pixel: contiguous slabs of 4
slices alternate between the ``"model"`` subset (to train the segmentation
network) and the held-out slices, which appear twice: as in-domain
acquisitions (``"calibration"``, for calibrator train / validation / test
splits) and as shifted acquisitions (``"shifted"``: stronger noise, a strong
bias field and a contrast change, as from another scanner or protocol).

The demo's segmentation networks, U-Nets trained once on the ``"model"``
slices of these data with the demo's settings, ship with the package (float16
weights in ``sksegcal/_weights``, pickle-free, sha256-checked):
``sksegcal._segnet.load_demo_network(name, quick=...)`` loads them without
the data, so the AAL network is there even without ``mricron-data``.
:func:`load_demo_logits` returns the logits and labels the demo calibrates.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ._files import atomic_write_via_path

__all__ = [
    "DATASETS",
    "IN_DOMAIN",
    "PERTURBATIONS",
    "SHIFTED",
    "DemoLogits",
    "SegmentationDataset",
    "aal_available",
    "find_mricron_templates",
    "load_colin27_aal",
    "load_dataset",
    "load_demo_logits",
    "load_mni152_tissue",
    "perturb_images",
    "simulate_acquisition",
]

#: Names accepted by :func:`load_dataset` and ``sksegcal demo --dataset``.
DATASETS = ("mni152-tissue", "aal")

#: Acquisition settings of the in-domain images (training and calibration).
IN_DOMAIN = {
    "noise_std": 0.03,
    "bias_strength": 0.05,
    "gamma_range": (0.9, 1.1),
    "gain_range": (0.9, 1.1),
}
#: Largest perturbation of each kind :func:`perturb_images` applies (the level of
#: every image is drawn uniformly between none and this).
PERTURBATIONS = {
    "noise": 0.1,  # standard deviation of additive Gaussian noise (intensities ~ [0, 1])
    "blur": 1.5,  # standard deviation (pixels) of a Gaussian blur
    "contrast": 1.5,  # gamma drawn log-uniformly in [1 / 1.5, 1.5]
}

#: Acquisition settings of the shifted test images: noisier, a strong bias
#: field, and a darker grey/white-matter contrast (gamma > 1), as a different
#: scanner or protocol would give.
SHIFTED = {
    "noise_std": 0.07,
    "bias_strength": 0.3,
    "gamma_range": (1.3, 1.5),
    "gain_range": (0.8, 1.2),
}

# per-subset seed offsets; fixed so that an image's noise depends only on its identity
_SUBSET_CODES = {"model": 1, "calibration": 2, "shifted": 3}
_SLAB = 4  # slices per contiguous slab in the model / held-out alternation
_MRICRON_DIRS = ("/usr/share/mricron/templates", "/usr/share/mricron")


@dataclass(frozen=True)
class SegmentationDataset:
    """Images, labels and their provenance for one segmentation task.

    Attributes
    ----------
    name : str
        The dataset's name, one of :data:`DATASETS`.
    images : ndarray of shape (N, 1, H, W), float32
        Simulated acquisitions of axial slices, intensities around [0, 1].
    labels : ndarray of shape (N, H, W), uint8
        Class index of every pixel (no pixel is ignored).
    class_names : tuple of str
        Name of each class; ``len(class_names)`` is the number of classes.
    slice_index : ndarray of shape (N,), int64
        Axial slice (voxel z index in the 2 mm volume) each image shows. Split
        calibration data by this, not by image, when a slice has several
        acquisitions.
    subset : ndarray of shape (N,), str
        ``"model"`` (train the segmentation network on these),
        ``"calibration"`` (held-out slices, in-domain acquisitions) or
        ``"shifted"`` (the same held-out slices, shifted acquisitions).
    description : str
        Where the data come from and how they were made.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    slice_index: np.ndarray
    subset: np.ndarray
    description: str = field(default="", repr=False)

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def select(self, subset: str) -> SegmentationDataset:
        """The images of one subset (``"model"``, ``"calibration"`` or ``"shifted"``)."""
        if subset not in _SUBSET_CODES:
            raise ValueError(
                f"subset must be one of {sorted(_SUBSET_CODES)}, got {subset!r}."
            )
        keep = self.subset == subset
        return replace(
            self,
            images=self.images[keep],
            labels=self.labels[keep],
            slice_index=self.slice_index[keep],
            subset=self.subset[keep],
        )


def simulate_acquisition(
    image: np.ndarray,
    *,
    noise_std: float = 0.03,
    bias_strength: float = 0.05,
    gamma_range: tuple[float, float] = (0.9, 1.1),
    gain_range: tuple[float, float] = (0.9, 1.1),
    random_state=None,
) -> np.ndarray:
    """One simulated MR acquisition of a clean 2-D intensity image.

    The clean image (intensities in [0, 1]) goes through, in this order: a
    gamma curve ``x ** gamma`` (contrast), a random gain, a smooth
    multiplicative bias field ``exp(b)`` with ``max |b| = bias_strength``
    (a cubic interpolation of a 4x4 random grid, the slow inhomogeneity of
    the receive coils), and Rician noise ``|x + n1 + i n2|`` with
    ``n1, n2 ~ N(0, noise_std^2)`` (magnitude images of complex Gaussian
    noise).

    Parameters
    ----------
    image : ndarray of shape (H, W)
        Clean intensities, roughly in [0, 1].
    noise_std : float, default=0.03
        Standard deviation of each complex noise component.
    bias_strength : float, default=0.05
        Largest absolute log-gain of the bias field.
    gamma_range, gain_range : (float, float)
        Uniform ranges of the gamma exponent and of the gain.
    random_state : int, Generator or None
        Seed.

    Returns
    -------
    ndarray of shape (H, W), float32
    """
    from scipy.ndimage import zoom

    rng = np.random.default_rng(random_state)
    x = np.clip(np.asarray(image, dtype=np.float64), 0.0, None)
    x = x ** rng.uniform(*gamma_range) * rng.uniform(*gain_range)
    h, w = x.shape
    grid = rng.standard_normal((4, 4))
    b = zoom(grid, (h / 4, w / 4), order=3, mode="nearest")[:h, :w]
    b *= bias_strength / max(np.abs(b).max(), 1e-12)
    x = x * np.exp(b)
    n1 = rng.normal(0.0, noise_std, x.shape)
    n2 = rng.normal(0.0, noise_std, x.shape)
    return np.hypot(x + n1, n2).astype(np.float32)


def perturb_images(
    images: np.ndarray,
    *,
    kinds: tuple[str, ...] = ("contrast", "blur", "noise"),
    max_level: dict | None = None,
    channel_axis: int = 1,
    random_state=None,
) -> np.ndarray:
    """Perturbed copies of images, for fitting a calibrator that must survive a shift.

    Tomani et al. (CVPR 2021, "Post-hoc uncertainty calibration for domain
    drift scenarios") fit temperature scaling on perturbed copies of the
    calibration images, at levels from none to strong, so that the calibrator
    sees what a shift does to the model's confidence. This builds such copies;
    pass them through your own model and fit on their logits together with the
    unperturbed ones (docs/quality.md, "Fitting on perturbed calibration
    images").

    Every image gets each of ``kinds``, in the order contrast, blur, noise,
    at its own level drawn uniformly between none and ``max_level[kind]``
    (default :data:`PERTURBATIONS`):

    ``"contrast"``
        ``x ** gamma`` on the non-negative part, with ``log(gamma)`` uniform
        in ``[-a, a]``, ``a = log(max_level["contrast"])`` (darker or brighter
        mid-tones; 0 and 1 stay put).
    ``"blur"``
        A Gaussian blur over the two spatial axes (each channel on its own)
        with standard deviation uniform in ``[0, max_level["blur"]]`` pixels.
    ``"noise"``
        Additive Gaussian noise with standard deviation uniform in
        ``[0, max_level["noise"]]`` (in the images' intensity units; the
        embedded data lie around [0, 1]).

    The perturbations are generic, not a model of a particular scanner: on the
    embedded data they overlap the simulated shift in noise and contrast (not
    in its bias field), so a gain measured there is optimistic for a shift of
    another kind.

    Parameters
    ----------
    images : ndarray of shape (N, H, W), (N, channels, H, W) or (N, H, W, channels)
        Images, float, intensities roughly in [0, 1] (divide 8-bit images by
        255 first: the contrast change assumes that range, the noise level is
        in its units).
    kinds : tuple of {"contrast", "blur", "noise"}, default=("contrast", "blur", "noise")
        Perturbations to apply (always in the order above, whatever the order given).
    max_level : dict, optional
        Largest level per kind; missing kinds take :data:`PERTURBATIONS`.
    channel_axis : {1, 3, -1}, default=1
        Axis of the channels of 4-D ``images`` (3 or -1: channels last, as
        mmcv and PIL give them); never blurred across. Unused for 3-D input.
    random_state : int, Generator or None
        Seed. Image ``i`` uses its own stream spawned from it, so with an int
        seed an image's copy does not depend on the other images' levels.

    Returns
    -------
    ndarray of the shape of ``images``, float32

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.datasets import perturb_images
    >>> images = np.full((2, 1, 8, 8), 0.5, dtype=np.float32)
    >>> out = perturb_images(images, kinds=("contrast",), random_state=0)
    >>> out.shape, out.dtype.name
    ((2, 1, 8, 8), 'float32')
    >>> bool(np.all((out > 0.5 ** 1.5 - 1e-6) & (out < 0.5 ** (1 / 1.5) + 1e-6)))
    True
    """
    from scipy.ndimage import gaussian_filter

    images = np.asarray(images)
    if images.ndim not in (3, 4) or not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"images must be a float array of shape (N, H, W) or (N, channels, H, W), got "
            f"{images.dtype} {images.shape}."
        )
    if isinstance(kinds, str) or not set(kinds) <= set(PERTURBATIONS) or not kinds:
        raise ValueError(
            f"kinds must be a non-empty tuple of {sorted(PERTURBATIONS)}, got {kinds!r}."
        )
    levels = dict(PERTURBATIONS)
    for kind, value in (max_level or {}).items():
        if kind not in PERTURBATIONS:
            raise ValueError(f"max_level has unknown kind {kind!r}; use {sorted(PERTURBATIONS)}.")
        low = 1.0 if kind == "contrast" else 0.0
        if not (np.isfinite(value) and value >= low):
            raise ValueError(
                f"max_level[{kind!r}] must be a finite number >= {low}, got {value!r}."
            )
        levels[kind] = float(value)
    if isinstance(random_state, np.random.Generator):
        streams = random_state.spawn(len(images))
    else:
        seq = np.random.SeedSequence(random_state)
        streams = [np.random.default_rng(s) for s in seq.spawn(len(images))]
    if images.ndim == 4 and channel_axis not in (1, 3, -1):
        raise ValueError(f"channel_axis must be 1, 3 or -1, got {channel_axis!r}.")
    # the spatial axes of one image
    sigma_axes = (0, 1) if images.ndim == 3 else (1, 2) if channel_axis == 1 else (0, 1)
    out = np.empty(images.shape, dtype=np.float32)
    for i, rng in enumerate(streams):
        # a fixed number of draws per image whatever ``kinds``: the levels of one kind do
        # not change when another kind is switched on or off
        u_gamma, u_blur, u_noise = rng.uniform(size=3)
        x = np.asarray(images[i], dtype=np.float64)
        if "contrast" in kinds:
            a = np.log(levels["contrast"])
            x = np.clip(x, 0.0, None) ** np.exp((2.0 * u_gamma - 1.0) * a)
        if "blur" in kinds:
            sigma = [0.0] * x.ndim
            for axis in sigma_axes:
                sigma[axis] = u_blur * levels["blur"]
            x = gaussian_filter(x, sigma=sigma, mode="nearest")
        if "noise" in kinds:
            x = x + rng.normal(0.0, u_noise * levels["noise"], x.shape)
        out[i] = x
    return out


def _crop_box(mask: np.ndarray, multiple: int = 8, margin: int = 2):
    """Slices of a box around ``mask`` (2-D) whose sides are multiples of ``multiple``.

    U-Net pooling needs sides divisible by its total stride; padding the box
    (rather than resizing) keeps the voxels as they are.
    """
    out = []
    for axis, size in enumerate(mask.shape):
        idx = np.flatnonzero(mask.any(axis=1 - axis))
        lo, hi = max(idx[0] - margin, 0), min(idx[-1] + 1 + margin, size)
        length = -(-(hi - lo) // multiple) * multiple
        lo = max(min(lo - (length - (hi - lo)) // 2, size - length), 0)
        out.append(slice(lo, min(lo + length, size)))
    return tuple(out)


def _check_args(n_model_acquisitions, n_calibration_acquisitions, n_shifted_acquisitions,
                slice_step, random_state) -> None:
    """Validate the loaders' arguments before any file is read."""
    for arg, value in (
        ("n_model_acquisitions", n_model_acquisitions),
        ("n_calibration_acquisitions", n_calibration_acquisitions),
        ("n_shifted_acquisitions", n_shifted_acquisitions),
        ("slice_step", slice_step),
    ):
        low = 1 if arg == "slice_step" else 0
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{arg} must be an integer >= {low}, got {value!r}.")
    if isinstance(random_state, bool) or not isinstance(random_state, int | np.integer):
        raise TypeError(
            f"random_state must be an int (the data are seeded per image), got {random_state!r}."
        )


@functools.lru_cache(maxsize=1)
def _mni152_volumes() -> tuple[np.ndarray, np.ndarray]:
    """T1 intensities and tissue labels of the 2 mm MNI152 template (read once per process)."""
    try:
        from nilearn import datasets as nds
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The MNI152 dataset needs nilearn: pip install 'sksegcal[demo]'."
        ) from exc
    t1 = nds.load_mni152_template(resolution=2).get_fdata(dtype=np.float32)
    gm = nds.load_mni152_gm_template(resolution=2).get_fdata(dtype=np.float32)
    wm = nds.load_mni152_wm_template(resolution=2).get_fdata(dtype=np.float32)
    labels = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0).astype(np.uint8)
    t1.setflags(write=False)
    labels.setflags(write=False)
    return t1, labels


def _build(
    name: str,
    volume: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    description: str,
    *,
    n_model_acquisitions: int,
    n_calibration_acquisitions: int,
    n_shifted_acquisitions: int,
    slice_step: int,
    min_foreground: int,
    random_state: int,
) -> SegmentationDataset:
    """Slice, crop, split and simulate acquisitions of a labelled volume."""
    volume = volume / max(float(np.percentile(volume[volume > 0], 99.5)), 1e-12)
    foreground = labels > 0
    z_all = np.flatnonzero(foreground.sum(axis=(0, 1)) >= min_foreground)
    z_kept = z_all[::slice_step]
    box = _crop_box(foreground.any(axis=2))
    # contiguous slabs alternate between the model's slices and held-out slices, so that
    # held-out slices are not all sandwiched between two training slices
    slab = max(1, _SLAB // slice_step)
    held_out = (np.arange(len(z_kept)) // slab) % 2 == 1
    plan = [
        ("model", z_kept[~held_out], n_model_acquisitions, IN_DOMAIN),
        ("calibration", z_kept[held_out], n_calibration_acquisitions, IN_DOMAIN),
        ("shifted", z_kept[held_out], n_shifted_acquisitions, SHIFTED),
    ]
    images, label_maps, slices, subsets = [], [], [], []
    for subset, zs, repeats, settings in plan:
        for z in zs:
            clean = volume[box[0], box[1], z]
            truth = labels[box[0], box[1], z]
            for k in range(repeats):
                seed = [int(random_state), _SUBSET_CODES[subset], int(z), k]
                # transpose (x, y) -> (y, x) and flip so that anterior is up, as radiologists view
                img = simulate_acquisition(clean, random_state=seed, **settings)
                images.append(img.T[::-1])
                label_maps.append(truth.T[::-1])
                slices.append(z)
                subsets.append(subset)
    return SegmentationDataset(
        name=name,
        images=np.ascontiguousarray(np.stack(images)[:, None], dtype=np.float32),
        labels=np.ascontiguousarray(np.stack(label_maps), dtype=np.uint8),
        class_names=class_names,
        slice_index=np.asarray(slices, dtype=np.int64),
        subset=np.asarray(subsets),
        description=description,
    )


def load_mni152_tissue(
    *,
    n_model_acquisitions: int = 4,
    n_calibration_acquisitions: int = 2,
    n_shifted_acquisitions: int = 2,
    slice_step: int = 1,
    random_state: int = 0,
) -> SegmentationDataset:
    """Grey / white-matter segmentation of MNI152 T1 slices (3 classes).

    Uses the ICBM 2009a template and its tissue probability maps shipped in
    the nilearn wheel at 2 mm (no download). Labels follow
    ``argmax(1 - p_gm - p_wm, p_gm, p_wm)``: 0 other, 1 grey matter, 2 white
    matter. Axial slices with at least 200 tissue voxels are kept (71 of 95),
    cropped to the brain (96 x 80 pixels) and split by slice into 4-slice
    slabs alternating between ``"model"`` and held-out slices.

    Parameters
    ----------
    n_model_acquisitions : int, default=4
        Simulated in-domain acquisitions of every model slice.
    n_calibration_acquisitions : int, default=2
        In-domain acquisitions of every held-out slice.
    n_shifted_acquisitions : int, default=2
        Shifted acquisitions (:data:`SHIFTED`) of every held-out slice.
    slice_step : int, default=1
        Keep every ``slice_step``-th slice (a smaller, faster dataset).
    random_state : int, default=0
        Seed of the simulated acquisitions.

    Returns
    -------
    SegmentationDataset

    Examples
    --------
    >>> from sksegcal.datasets import load_mni152_tissue
    >>> data = load_mni152_tissue(slice_step=4)  # doctest: +SKIP
    >>> data.images.shape[1:], data.class_names  # doctest: +SKIP
    ((1, 96, 80), ('other', 'grey matter', 'white matter'))
    """
    _check_args(n_model_acquisitions, n_calibration_acquisitions, n_shifted_acquisitions,
                slice_step, random_state)
    t1, labels = _mni152_volumes()
    description = (
        "MNI152 (ICBM 2009a, 2 mm) T1 template with grey/white-matter probability maps from "
        "the nilearn wheel; labels argmax(1 - p_gm - p_wm, p_gm, p_wm); axial slices split "
        "by 4-slice slabs; simulated acquisitions (gain, gamma, bias field, Rician noise)."
    )
    return _build(
        "mni152-tissue",
        t1,
        labels,
        ("other", "grey matter", "white matter"),
        description,
        n_model_acquisitions=n_model_acquisitions,
        n_calibration_acquisitions=n_calibration_acquisitions,
        n_shifted_acquisitions=n_shifted_acquisitions,
        slice_step=slice_step,
        min_foreground=200,
        random_state=random_state,
    )


def find_mricron_templates(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder holding ``ch2bet.nii.gz``, ``aal.nii.gz`` and ``aal.nii.txt``, or None.

    Looks in ``data_dir`` if given, else ``$SKSEGCAL_MRICRON_DIR``, else where
    Debian's ``mricron-data`` package puts them (``/usr/share/mricron/templates``).
    """
    if data_dir is not None:
        candidates = [Path(data_dir)]
    elif os.environ.get("SKSEGCAL_MRICRON_DIR"):
        candidates = [Path(os.environ["SKSEGCAL_MRICRON_DIR"])]
    else:
        candidates = [Path(d) for d in _MRICRON_DIRS]
    for folder in candidates:
        if all((folder / f).is_file() for f in ("ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt")):
            return folder
    return None


def aal_available(data_dir: str | os.PathLike | None = None) -> bool:
    """Whether the Colin27 + AAL files (Debian's ``mricron-data``) are installed."""
    return find_mricron_templates(data_dir) is not None


def load_colin27_aal(
    *,
    data_dir: str | os.PathLike | None = None,
    n_model_acquisitions: int = 4,
    n_calibration_acquisitions: int = 2,
    n_shifted_acquisitions: int = 2,
    slice_step: int = 1,
    random_state: int = 0,
) -> SegmentationDataset:
    """AAL atlas parcellation of Colin27 T1 slices (116 regions + background).

    Needs Debian's ``mricron-data`` (``sudo apt-get install mricron-data``),
    which installs ``ch2bet.nii.gz`` (Colin27, brain-extracted, 1 mm),
    ``aal.nii.gz`` and ``aal.nii.txt`` (region names) in
    ``/usr/share/mricron/templates``. Both volumes are taken at every other
    voxel (2 mm). Axial slices with at least 200 labelled voxels are kept and
    split like :func:`load_mni152_tissue`.

    Parameters
    ----------
    data_dir : path, optional
        Folder with the three files; see :func:`find_mricron_templates`.
    n_model_acquisitions, n_calibration_acquisitions, n_shifted_acquisitions, \
slice_step, random_state
        As in :func:`load_mni152_tissue`.

    Returns
    -------
    SegmentationDataset
        117 classes: ``"background"`` then the AAL regions in label order.

    Raises
    ------
    FileNotFoundError
        When the files are not installed.
    """
    _check_args(n_model_acquisitions, n_calibration_acquisitions, n_shifted_acquisitions,
                slice_step, random_state)
    folder = find_mricron_templates(data_dir)
    if folder is None:
        where = data_dir or os.environ.get("SKSEGCAL_MRICRON_DIR") or _MRICRON_DIRS[0]
        raise FileNotFoundError(
            f"The Colin27 + AAL files (ch2bet.nii.gz, aal.nii.gz, aal.nii.txt) are not in "
            f"{where}. Install them with 'sudo apt-get install mricron-data' (Debian/Ubuntu) "
            "or point SKSEGCAL_MRICRON_DIR at a folder that has them."
        )
    import nibabel as nib

    t1 = np.asarray(nib.load(folder / "ch2bet.nii.gz").dataobj, dtype=np.float32)[::2, ::2, ::2]
    aal = np.asarray(nib.load(folder / "aal.nii.gz").dataobj)[::2, ::2, ::2]
    names = {0: "background"}
    for line in (folder / "aal.nii.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    n_classes = int(max(names)) + 1
    if int(aal.max()) >= n_classes:
        raise ValueError(
            f"{folder / 'aal.nii.gz'} has label {int(aal.max())} but aal.nii.txt names only "
            f"{n_classes - 1} regions; the mricron-data files do not match."
        )
    class_names = tuple(names.get(i, f"region_{i}") for i in range(n_classes))
    description = (
        f"Colin27 T1 (ch2bet) with the AAL atlas ({n_classes - 1} regions + background) from "
        f"Debian's mricron-data ({folder}), 2 mm; axial slices split by 4-slice slabs; "
        "simulated acquisitions (gain, gamma, bias field, Rician noise)."
    )
    return _build(
        "aal",
        t1,
        aal.astype(np.uint8),
        class_names,
        description,
        n_model_acquisitions=n_model_acquisitions,
        n_calibration_acquisitions=n_calibration_acquisitions,
        n_shifted_acquisitions=n_shifted_acquisitions,
        slice_step=slice_step,
        min_foreground=200,
        random_state=random_state,
    )


def load_dataset(
    name: str = "mni152-tissue",
    *,
    cache_dir: str | os.PathLike | None = None,
    **kwargs,
) -> SegmentationDataset:
    """Load an embedded dataset by name (one of :data:`DATASETS`).

    Parameters
    ----------
    name : {"mni152-tissue", "aal"}
    cache_dir : path, optional
        If given, the built arrays are kept there as ``.npz`` (keyed by the
        name, the arguments and the package version) and read back on later
        calls: reading the NIfTI templates costs several seconds, the cache a
        few milliseconds.
    **kwargs
        Passed to :func:`load_mni152_tissue` or :func:`load_colin27_aal`.

    Returns
    -------
    SegmentationDataset
    """
    loaders = {"mni152-tissue": load_mni152_tissue, "aal": load_colin27_aal}
    if name not in loaders:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {list(DATASETS)}.")
    if cache_dir is None:
        return loaders[name](**kwargs)
    import hashlib
    import json

    from . import __version__

    key = json.dumps({"name": name, "kwargs": {k: str(v) for k, v in kwargs.items()},
                      "version": __version__}, sort_keys=True)
    path = Path(cache_dir) / f"data-{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                return SegmentationDataset(
                    name=name, images=f["images"], labels=f["labels"],
                    class_names=tuple(f["class_names"].tolist()),
                    slice_index=f["slice_index"], subset=f["subset"],
                    description=str(f["description"]))
        except Exception:  # a corrupt cache file: rebuild and overwrite it
            pass
    data = loaders[name](**kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: a concurrent run never reads half a file
    atomic_write_via_path(path, lambda tmp: np.savez(
        tmp, images=data.images, labels=data.labels,
        class_names=np.asarray(data.class_names), slice_index=data.slice_index,
        subset=data.subset, description=np.asarray(data.description)))
    return data


class DemoLogits(NamedTuple):
    """What :func:`load_demo_logits` returns: ``logits, labels, groups, class_names``."""

    #: (N, C, H, W) float32 logits of the demo's shipped U-Net
    logits: np.ndarray
    #: (N, H, W) integer labels
    labels: np.ndarray
    #: (N,) slice index of each image: the acquisitions of one slice form a group, which
    #: a split must keep in one part (``split_images(..., groups=groups)``)
    groups: np.ndarray
    class_names: tuple


def load_demo_logits(
    dataset: str = "mni152-tissue",
    *,
    subset: str = "calibration",
    quick: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> DemoLogits:
    """The logits and labels that ``sksegcal demo`` calibrates, as arrays.

    The images of ``subset`` of the embedded dataset (built as the demo builds
    it) are run through the U-Net shipped with the package for that dataset:
    no training, no download, the same logits on every machine.

    Parameters
    ----------
    dataset : {"mni152-tissue", "aal"}, default="mni152-tissue"
        ``"aal"`` needs Debian's ``mricron-data`` (see :func:`load_colin27_aal`).
    subset : {"calibration", "shifted", "model"}, default="calibration"
        The held-out slices as in-domain acquisitions, the same slices under
        the acquisition shift, or the slices the network was trained on.
    quick : bool, default=False
        The demo's ``--quick`` data and network.
    cache_dir : path, optional
        Passed to :func:`load_dataset`.

    Returns
    -------
    DemoLogits
        ``(logits, labels, groups, class_names)``.

    Examples
    --------
    >>> from sksegcal.datasets import load_demo_logits
    >>> logits, labels, groups, class_names = load_demo_logits(quick=True)  # doctest: +SKIP
    >>> logits.shape[1] == len(class_names)  # doctest: +SKIP
    True
    """
    from ._segnet import DEMO_SETTINGS, SegNetConfig, load_demo_network, predict_logits

    if (dataset, quick) not in DEMO_SETTINGS:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {list(DATASETS)}.")
    if subset not in ("calibration", "shifted", "model"):
        raise ValueError(f"subset must be 'calibration', 'shifted' or 'model', got {subset!r}.")
    settings = DEMO_SETTINGS[(dataset, quick)]
    data = load_dataset(dataset, random_state=0, cache_dir=cache_dir, **settings["data"])
    part = data.select(subset)
    model, _ = load_demo_network(dataset, quick=quick, config=SegNetConfig(**settings["net"]))
    return DemoLogits(predict_logits(model, part.images), part.labels, part.slice_index,
                      tuple(data.class_names))
