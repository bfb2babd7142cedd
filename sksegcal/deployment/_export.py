"""TorchScript and ONNX export of calibrator modules and calibrated segmenters."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import nn

__all__ = ["export_onnx", "onnx_predict", "script_module"]


def script_module(module: nn.Module, example: torch.Tensor | None = None):
    """``torch.jit.script(module)``, or ``torch.jit.trace(module, example)`` where it cannot.

    Every calibrator module scripts; a :class:`CalibratedSegmenter` around a
    network that does not script (a transformers model) is traced on
    ``example`` instead.

    Parameters
    ----------
    module : nn.Module
    example : Tensor, optional
        An input to trace with when scripting fails.

    Returns
    -------
    torch.jit.ScriptModule
    """
    module = module.eval()
    try:
        return torch.jit.script(module)
    except Exception as error:  # torch raises many types for what it cannot script
        if example is None:
            raise TypeError(
                f"{type(module).__name__} does not script ({type(error).__name__}); pass an "
                "example input to trace it instead"
            ) from error
    with torch.no_grad():
        return torch.jit.trace(module, (example,), strict=False)


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    *,
    dynamic: bool = True,
    input_name: str = "logits",
    output_name: str = "proba",
    opset_version: int | None = None,
    dynamo: bool = True,
) -> str:
    """Write ``module`` as an ONNX graph with ``torch.onnx.export``.

    Parameters
    ----------
    module : nn.Module
        A calibrator module or a :class:`CalibratedSegmenter`.
    example : Tensor of shape (N, C, H, W) or (N, C, D, H, W)
        An input of the right rank and dtype.
    path : str or PathLike
        Where to write the ``.onnx`` file (one file, weights inside).
    dynamic : bool, default=True
        Batch and spatial sizes free in the graph (the class axis is fixed).
    input_name, output_name : str
    opset_version : int, optional
    dynamo : bool, default=True
        torch's ``torch.export``-based exporter (its default). ``False`` uses
        the older TorchScript-based exporter, deprecated by torch but several
        times faster to export the spatial context's graph (measured: about 6 s
        against 40 s for local temperature scaling on 2 shared CPU cores).

    Returns
    -------
    path : str
    """
    module = module.eval()
    names = {"input_names": [input_name], "output_names": [output_name]}
    if not dynamo:
        axes = {0: "batch", **{axis: f"size_{axis}" for axis in range(2, example.dim())}}
        with torch.no_grad(), warnings.catch_warnings():
            # the deprecation of this exporter, and its notes on tracing int(shape[1])
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset_version,
                dynamic_axes={input_name: axes, output_name: axes} if dynamic else None,
                **names,
            )
        return str(path)
    dynamic_shapes = None
    if dynamic:
        dims = {0: torch.export.Dim.AUTO}
        for axis in range(2, example.dim()):
            dims[axis] = torch.export.Dim.AUTO
        dynamic_shapes = (dims,)
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset_version,
            external_data=False,
            verbose=False,
            **names,
        )
    program.save(str(path), external_data=False)
    return str(path)


def onnx_predict(model, inputs: np.ndarray) -> np.ndarray:
    """Run an exported graph with onnxruntime on the CPU: its first output for ``inputs``.

    Parameters
    ----------
    model : str, PathLike or onnxruntime.InferenceSession
    inputs : ndarray of shape (N, C, H, W) or (N, C, D, H, W)

    Returns
    -------
    ndarray
    """
    try:
        import onnxruntime
    except ImportError as error:  # pragma: no cover - the [onnx] extra is missing
        raise ImportError(
            "onnx_predict needs onnxruntime: pip install 'sksegcal[onnx]'"
        ) from error
    session = model
    if not hasattr(model, "run"):
        session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(inputs)})[0]
