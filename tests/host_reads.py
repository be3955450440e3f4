"""Record the torch calls that would make a training step wait for the accelerator.

On a GPU, reading a device value on the host (``.item()``, ``if tensor:``, ``float(t)``, ``.tolist()``,
``.cpu()``...) or running an op whose output shape depends on device data (``nonzero``, boolean-mask
indexing...) blocks the host until the queued kernels have run, so the host can no longer queue the
next steps ahead; so does uploading host data to the device (``torch.tensor(data, device=...)``,
``t.new_tensor(data)``: a blocking copy). A ``.to(torch.device(...))`` is not counted (on a CPU-only
machine the trainer's own host -> device moves target the CPU too); ``tests/cuda`` catches those.
On the CPU nothing waits, but the same calls can be seen: :class:`HostReadRecorder`
is a ``torch.overrides.TorchFunctionMode`` (torch's public hook that sees every torch function and
``Tensor`` method, dunders included) that records each such call with the first stack frame outside
torch and a label for the phase of training it happened in. No library records these calls on the
CPU (``torch.cuda.set_sync_debug_mode`` needs CUDA), hence this module.

Example::

    with HostReadRecorder() as recorder:
        loss.item()
    [str(read) for read in recorder.reads]  # ['item at .../test_x.py:12 in test_y (phase None)']
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods and torch functions whose result is a host value read from the tensor's data.
HOST_VALUE_READS = frozenset(
    {
        "item",
        "tolist",
        "numpy",
        "cpu",
        "__bool__",
        "__float__",
        "__int__",
        "__index__",
        "__complex__",
        "__format__",
        "__repr__",
        "__array__",
        "equal",
        "allclose",
        "is_nonzero",
    }
)
# Ops whose output size depends on device data: CUDA must finish them before the host knows the size.
DATA_DEPENDENT_SHAPES = frozenset(
    {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}
)
_TORCH_DIR = str(Path(torch.__file__).parent)
_THIS_FILE = str(Path(__file__).resolve())


@dataclass(frozen=True)
class HostRead:
    """One recorded call: what (``kind``), the calling frames outside torch (innermost first, as
    ``(file, function, line)``) and the ``phase`` it happened in."""

    kind: str
    frames: tuple[tuple[str, str, int], ...]
    phase: Any

    @property
    def where(self) -> str:
        file, function, line = self.frames[0] if self.frames else ("<torch>", "", 0)
        return f"{file}:{line} in {function}"

    def called_from(self, file_suffix: str, function: str) -> bool:
        """Whether ``function`` of a file ending in ``file_suffix`` is on the calling stack."""
        return any(f.endswith(file_suffix) and fn == function for f, fn, _ in self.frames)

    def __str__(self) -> str:
        return f"{self.kind} at {self.where} (phase {self.phase})"


def _kind(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The name under which ``func(*args, **kwargs)`` is a host read, or ``None`` when it is not one."""
    name = getattr(func, "__name__", "")
    if name in HOST_VALUE_READS or name in DATA_DEPENDENT_SHAPES:
        return name
    if (
        name == "repeat_interleave"
        and isinstance(_arg(args, kwargs, 1, "repeats"), torch.Tensor)
        and _arg(args, kwargs, 3, "output_size") is None
    ):
        return "repeat_interleave(tensor repeats, no output_size)"
    if name in ("__getitem__", "__setitem__", "index_put_", "index_put"):
        index = args[1] if len(args) > 1 else None
        indices = index if isinstance(index, (tuple, list)) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            return f"{name}(boolean mask)"
    if name == "to" and _names_the_cpu(args[1:], kwargs):
        return "to('cpu')"
    # Host data uploaded to a device: a blocking host -> device copy there, which CUDA syncs on.
    data = args[0] if args else kwargs.get("data")
    if name in ("tensor", "as_tensor") and kwargs.get("device") is not None and not torch.is_tensor(data):
        return f"{name}(host data, device=...)"
    if name == "new_tensor" and not torch.is_tensor(args[1] if len(args) > 1 else kwargs.get("data")):
        return "new_tensor(host data)"
    return None


def _arg(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    return kwargs.get(name, args[position] if len(args) > position else None)


def _names_the_cpu(args: tuple, kwargs: dict) -> bool:
    """Whether a ``.to(...)`` call names the CPU as a string: an explicit host copy.

    A ``torch.device`` target is left out: on a CPU-only machine the trainer's own moves (the batch
    transfer, metric states following the module) target ``torch.device("cpu")`` too, where on an
    accelerator they copy host -> device or nothing; the CUDA tests catch a device -> host ``.to``.
    """
    return any(isinstance(value, str) and value.startswith("cpu") for value in (*args, kwargs.get("device")))


def _callers(depth: int = 12) -> tuple[tuple[str, str, int], ...]:
    """Up to ``depth`` calling frames outside torch and this module, innermost first."""
    frames = []
    frame = sys._getframe(2)
    while frame is not None and len(frames) < depth:
        filename = frame.f_code.co_filename
        if not filename.startswith(_TORCH_DIR) and filename != _THIS_FILE:
            frames.append((filename, frame.f_code.co_name, frame.f_lineno))
        frame = frame.f_back
    return tuple(frames)


class HostReadRecorder(TorchFunctionMode):
    """Records every host read (see the module docstring) made while active, tagged with :attr:`phase`.

    Set :attr:`phase` from outside (e.g. a callback) to attribute reads to a training step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[HostRead] = []
        self.phase: Any = None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        kind = _kind(func, args, kwargs)
        if kind is not None:
            self.reads.append(HostRead(kind, _callers(), self.phase))
        return func(*args, **kwargs)
