"""Mixed precision: bf16 autocast for the networks, fp32 for losses, cosines and scores."""

import dataclasses

import numpy as np
import pytest
import torch

from helpers import compute, params
from helpers.localize import ClusterClassifier, grad_cam
from helpers.models import Normaliser, ResNet, extract_features
from helpers.params import SSLParams
from helpers.ssl import build_model


def test_auto_resolves_to_a_concrete_precision_and_bad_names_are_errors():
    assert compute.resolve_precision("fp32") == "fp32" and compute.resolve_precision("bf16") == "bf16"
    expected = "bf16" if compute.cpu_has_native_bf16() and not torch.cuda.is_available() else None
    resolved = compute.resolve_precision("auto")
    assert resolved in ("fp32", "bf16") and (expected is None or resolved == expected)
    with pytest.raises(ValueError, match="compute.precision must be one of auto, fp32, bf16, got 'fp16'"):
        compute.resolve_precision("fp16")
    with pytest.raises(params.ParamsError, match="'compute.precision' = 'half'"):
        params.from_dict({"profile": "x", "compute": {"precision": "half"}}, "src")


def test_loaded_params_carry_the_resolved_precisions(tiny_params):
    assert tiny_params.compute.precision == compute.resolve_precision("auto")
    assert tiny_params.compute.ssl_precision == "fp32"  # the default: bf16 pre-training weakened the backdoor
    with pytest.raises(params.ParamsError, match="'compute.ssl_precision' = 'fp8'"):
        params.from_dict({"profile": "x", "compute": {"ssl_precision": "fp8"}}, "src")


@pytest.mark.parametrize("method", ["mocov2", "byol", "simclr"])
def test_bf16_training_step_has_fp32_loss_and_fp32_weight_gradients(method):
    p = dataclasses.replace(SSLParams(), method=method, arch="resnet10", width=8, queue_size=64, proj_dim=8)
    model = build_model(p, 16)
    torch.manual_seed(0)
    v1, v2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    with compute.autocast("cpu", "bf16"):
        loss = model(v1, v2)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [q.grad for q in model.parameters() if q.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_bf16_features_and_cluster_assignments_agree_with_fp32():
    torch.manual_seed(0)
    backbone = ResNet((1, 1, 1, 1), 16, "cifar", 1).eval()
    pixels = torch.randint(0, 256, (64, 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    f32 = extract_features(backbone, pixels, mean, std, precision="fp32")
    f16 = extract_features(backbone, pixels, mean, std, precision="bf16")
    assert f16.dtype == np.float32
    cos = (f32 * f16).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(f16, axis=1)
    assert cos.min() > 0.99  # bf16 keeps 8 bits of mantissa: features agree in direction
    x = Normaliser(mean, std)(pixels)
    models = {p: ClusterClassifier(backbone, f32[:8], "layer3", p).eval() for p in ("fp32", "bf16")}
    with torch.no_grad():
        logits = {p: m(x) for p, m in models.items()}
    assert logits["bf16"].dtype == torch.float32
    agree = (logits["fp32"].argmax(1) == logits["bf16"].argmax(1)).float().mean()
    assert agree >= 0.9
    targets = logits["fp32"].argmax(1)
    maps = {p: grad_cam(m, x, targets) for p, m in models.items()}
    assert maps["bf16"].dtype == torch.float32 and (maps["fp32"] - maps["bf16"]).abs().mean() < 0.05


def test_onednn_is_capped_below_amx_unless_the_caller_chose():
    """bf16 through AMX rounds unlike the CPU the shipped results were made on (helpers/__init__.py)."""
    import os
    import subprocess
    import sys

    code = "import helpers, os; print(os.environ['ONEDNN_MAX_CPU_ISA'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "AVX512_CORE_BF16"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "ONEDNN_MAX_CPU_ISA": "AVX2"}, capture_output=True, text=True
    )
    assert out.stdout.strip() == "AVX2"
