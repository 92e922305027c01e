"""Where and in what precision the networks run: the device, bf16 autocast, fp32 regions.

``compute.precision`` in the params chooses the precision of every network pass (SSL training, feature
extraction, Grad-CAM, PoisonCAM's masked passes, the flip test, the poison classifier):

- ``fp32``: plain float32;
- ``bf16``: ``torch.autocast`` with bfloat16 on the run's device (CPU or CUDA): convolutions and matrix
  products in bf16, weights, optimiser state and gradients of the weights in fp32;
- ``auto``: bf16 where the device runs it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX),
  else fp32. ``auto`` is resolved when the params are loaded, so the cache key names the precision used.

Losses, normalisation, cosine scores, k-means and every accumulated score are computed in fp32: the code
leaves autocast with ``fp32_region()`` and casts to float before them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def device_for_run() -> torch.device:
    """The GPU of this process (``LOCAL_RANK`` under torchrun) where there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Does this CPU compute bf16 natively (AVX512-BF16 or AMX)? Without it bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: ask oneDNN
        return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """``auto`` -> the fastest precision the device supports; ``fp32`` and ``bf16`` are kept as asked."""
    if precision not in PRECISIONS:
        raise ValueError(f"compute.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device) if device is not None else device_for_run()
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision must be resolved to fp32 or bf16 before use, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def fp32_region(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Leave autocast: losses, cosines and scores inside run in fp32 (inputs must be cast to float)."""
    return torch.autocast(torch.device(device).type, enabled=False)


class TrainingDiverged(RuntimeError):
    """A training whose loss became NaN or infinite: it stops at that step, and nothing of it is cached.
    The cache puts the stage's name in front of the message (``names_stage``)."""

    names_stage = True


def check_finite(loss: float, where: str, keys: dict[str, object]) -> None:
    """Raise ``TrainingDiverged`` where ``loss`` is not finite: ``where`` names the training and the step,
    ``keys`` the params most likely at fault with their values. Every trainer of the project calls it."""
    if not math.isfinite(loss):
        at_fault = ", ".join(f"{key} = {value}" for key, value in keys.items())
        raise TrainingDiverged(
            f"{where}: the loss is {loss}, the training diverged; the keys most likely at fault: {at_fault} "
            "(nothing of this training is cached)"
        )
