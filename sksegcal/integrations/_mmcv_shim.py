"""A stand-in for ``mmcv.ops`` when mmcv's compiled operators are missing.

``mmcv-lite`` (the pip wheel that installs on CPU without a compiler) ships
``mmcv/ops/*.py`` but not the compiled extension ``mmcv._ext`` they load, so
``import mmcv.ops`` fails, and with it ``from mmseg.apis import ...``:
mmsegmentation imports ``point_sample`` (and a few other ops) from
``mmcv.ops`` at module level even for models that never call them.

:func:`install` puts a small module in ``sys.modules["mmcv.ops"]`` that

* supplies a pure-torch :func:`point_sample` (what mmseg's point-rend and
  mask-classification code calls), and
* answers every other public name of mmcv's ``mmcv.ops`` with a placeholder
  that raises a clear :class:`MissingMMCVOpError` when called or
  instantiated, so that modules importing such a name still import, and a
  model that really needs a compiled op fails with a message saying so.

It does nothing when ``mmcv._ext`` exists (full mmcv with compiled ops), or
when ``mmcv.ops`` has already been imported.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path

__all__ = ["MissingMMCVOpError", "install", "is_installed", "point_sample"]

_SHIM_FLAG = "__sksegcal_shim__"

# Used when mmcv's own ops/__init__.py cannot be read: the names mmseg 1.x
# and mmengine import from mmcv.ops.
_FALLBACK_NAMES = (
    "CrissCrossAttention",
    "DeformConv2d",
    "ModulatedDeformConv2d",
    "MultiScaleDeformableAttention",
    "PSAMask",
    "SyncBatchNorm",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
)


class MissingMMCVOpError(RuntimeError):
    """An mmcv operator that needs mmcv's compiled extension was used."""


def point_sample(input, points, align_corners: bool = False, **kwargs):
    """Sample ``input`` at normalised point coordinates, as ``mmcv.ops.point_sample``.

    A bilinear :func:`torch.nn.functional.grid_sample` of ``input`` at
    ``points`` given in ``[0, 1] x [0, 1]`` image coordinates (x first).

    Parameters
    ----------
    input : Tensor of shape (N, C, H, W)
        Feature map.
    points : Tensor of shape (N, P, 2) or (N, Hgrid, Wgrid, 2)
        Point coordinates in ``[0, 1]``.
    align_corners : bool, default=False
        As in :func:`torch.nn.functional.grid_sample`.
    **kwargs
        Passed to :func:`torch.nn.functional.grid_sample` (e.g. ``mode``,
        ``padding_mode``).

    Returns
    -------
    Tensor of shape (N, C, P) or (N, C, Hgrid, Wgrid)
    """
    import torch.nn.functional as F

    add_dim = points.dim() == 3
    if add_dim:
        points = points.unsqueeze(2)
    # grid_sample takes coordinates in [-1, 1]; mmcv's take [0, 1]
    output = F.grid_sample(input, 2.0 * points - 1.0, align_corners=align_corners, **kwargs)
    return output.squeeze(3) if add_dim else output


def _missing(name: str) -> type:
    message = (
        f"mmcv.ops.{name} needs mmcv's compiled operators, which this mmcv "
        "installation (mmcv-lite, or a build without ops) lacks; sksegcal's "
        "mmcv.ops stand-in only provides point_sample. Install a full mmcv "
        "built for your torch and CUDA to use it, or choose a model that "
        "does not need it."
    )

    def __new__(cls, *args, **kwargs):
        raise MissingMMCVOpError(message)

    # A class, not a function: some code subclasses or isinstance-checks ops,
    # and calling a class (op(...) or Op(...)) goes through __new__ either way.
    return type(name, (), {"__new__": __new__, "__doc__": message, "__module__": "mmcv.ops"})


def _op_names(mmcv_dir: Path) -> tuple[str, ...]:
    """The names mmcv's ``ops/__init__.py`` exports, read without importing it."""
    try:
        tree = ast.parse((mmcv_dir / "ops" / "__init__.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return _FALLBACK_NAMES
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            try:
                names = ast.literal_eval(node.value)
            except ValueError:
                break
            return tuple(sorted(set(names) | set(_FALLBACK_NAMES)))
    # mmcv builds __all__ by concatenation in some versions: take the imported names
    names = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    return tuple(sorted(names | set(_FALLBACK_NAMES)))


def is_installed() -> bool:
    """Whether ``sys.modules["mmcv.ops"]`` is this stand-in."""
    return getattr(sys.modules.get("mmcv.ops"), _SHIM_FLAG, False)


def install(*, force: bool = False) -> bool:
    """Install the ``mmcv.ops`` stand-in if mmcv's compiled ops are missing.

    Parameters
    ----------
    force : bool, default=False
        Install even if ``mmcv._ext`` is found (for tests).

    Returns
    -------
    installed : bool
        True if the stand-in is (now, or already was) ``mmcv.ops``; False if
        mmcv is absent, has its compiled ops, or ``mmcv.ops`` was imported
        already.
    """
    if is_installed():
        return True
    if "mmcv.ops" in sys.modules:
        return False
    try:
        import mmcv
    except ImportError:
        return False
    if not force and importlib.util.find_spec("mmcv._ext") is not None:
        # full mmcv: the real ops work, leave them alone
        return False

    module = types.ModuleType("mmcv.ops", __doc__)
    names = _op_names(Path(mmcv.__file__).parent)
    stubs = {name: _missing(name) for name in names if name != "point_sample"}
    module.__dict__.update(stubs)
    module.point_sample = point_sample
    module.MissingMMCVOpError = MissingMMCVOpError
    module.__all__ = sorted([*stubs, "point_sample"])
    setattr(module, _SHIM_FLAG, True)
    sys.modules["mmcv.ops"] = module
    mmcv.ops = module
    return True
