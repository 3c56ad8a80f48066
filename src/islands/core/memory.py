"""Large CPU buffers backed by huge pages where the kernel allows it.

On the CPU, the first write to freshly allocated memory costs a page fault per 4 KiB page,
which for the collective's buffers (a result, a row received from a peer) can cost more than
the copy that fills them: 128 MiB took 77 ms to allocate and fill against 28 ms to refill
(2-core Xeon VM, one thread). Asking the kernel for 2 MiB pages (``madvise(MADV_HUGEPAGE)``,
honoured when ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``)
took that to 46 ms. This is what PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` does for every large
tensor; here it applies only to the buffers the collective allocates. Elsewhere than Linux, or
if the call fails, the buffer is an ordinary one.
"""

from __future__ import annotations

import ctypes
import sys

import torch

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h
# Below this a buffer spans too few huge pages to matter.
MIN_HUGE_BYTES = 8 << 20


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def empty(shape: int | tuple[int, ...], dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``; on the CPU, a large buffer's whole
    2 MiB pages are advised to be huge pages before anything touches them."""
    t = torch.empty(shape, dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    if _MADVISE is not None and t.device.type == "cpu" and nbytes >= MIN_HUGE_BYTES:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            _MADVISE(start, end - start, _MADV_HUGEPAGE)  # advice only: a failure is harmless
    return t


def kept(buffers: dict, key, shape: int | tuple[int, ...], dtype: torch.dtype,
         device: torch.device | str = "cpu") -> torch.Tensor:
    """The buffer ``buffers`` keeps under ``key`` (a new one, from :func:`empty`, when the
    shape, dtype or device changes; the old one released first), for memory that is written
    again and again: fresh pages cost a fault each on their first write, a kept buffer once."""
    shape, device = (shape,) if isinstance(shape, int) else tuple(shape), torch.device(device)
    t = buffers.get(key)
    if t is None or tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
        buffers.pop(key, None)  # released before its replacement is allocated
        t = buffers[key] = empty(shape, dtype, device)
    return t
