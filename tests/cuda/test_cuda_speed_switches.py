"""On a GPU, the speed switches leave one training step's loss and gradients as the plain path's.

The CUDA counterparts of ``tests/recipes/test_speed_switches.py`` (same helper, same seeded model
and batch): ``channels_last``, ``compile`` (inductor, Triton kernels) and ``bf16`` autocast (what
``precision: bf16-mixed`` runs the step under) against fp32 in the default layout on the same GPU.
TF32 is off for the exact comparisons so that both paths compute in fp32.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from speed_setups import one_step_loss_and_grads

pytestmark = pytest.mark.cuda
# Triton builds its launcher with the system C compiler the first time it runs.
needs_c_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="torch.compile (Triton) needs a C compiler",
)


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize(
    "switch",
    [
        pytest.param({"channels_last": True}, id="channels_last"),
        pytest.param({"compile": "default"}, id="compile", marks=needs_c_compiler),
        pytest.param({"channels_last": True, "compile": "default"}, id="both", marks=needs_c_compiler),
    ],
)
def test_switch_gives_the_plain_loss_and_gradients_on_cuda(switch, no_tf32):
    plain_loss, plain_grads = one_step_loss_and_grads("cuda")
    loss, grads = one_step_loss_and_grads("cuda", **switch)
    assert loss.device.type == "cuda"
    torch.testing.assert_close(loss, plain_loss, rtol=1e-4, atol=1e-5)
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain, rtol=1e-3, atol=1e-5)


def test_bf16_autocast_step_is_close_to_fp32_on_cuda(no_tf32):
    plain_loss, plain_grads = one_step_loss_and_grads("cuda")
    loss, grads = one_step_loss_and_grads("cuda", autocast=torch.bfloat16, channels_last=True)
    torch.testing.assert_close(loss.float(), plain_loss, rtol=2e-2, atol=2e-2)
    flat, plain_flat = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in plain_grads])
    assert flat.dtype == torch.float32  # parameters and their gradients stay fp32 under autocast
    # bf16 keeps 8 bits of mantissa: on the CPU the same step gives cosine 0.9965 and a relative
    # error of 0.084; a wrong path (layout, dtype, missing cast) gives unrelated gradients.
    cosine = torch.nn.functional.cosine_similarity(flat, plain_flat, dim=0)
    assert cosine > 0.98
    assert (flat - plain_flat).norm() < 0.2 * plain_flat.norm()
