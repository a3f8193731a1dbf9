"""GPU tier: device/pinned.py's registered host memory is page-locked, DMAs both ways, and is
unregistered when the last view of it is freed."""
from __future__ import annotations

import gc

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("nbytes", [1, 4096 + 3, 40 << 20])     # 40 MiB: touched by 8 threads
def test_pinned_empty_is_page_locked_and_round_trips(nbytes):
    cp = pytest.importorskip("cupy")
    from aircupy.device.pinned import pinned_empty
    h = pinned_empty(nbytes)
    assert h.dtype == np.uint8 and h.shape == (nbytes,) and not h.any()
    attrs = cp.cuda.runtime.pointerGetAttributes(h.ctypes.data)
    assert attrs.type == cp.cuda.runtime.memoryTypeHost          # registered, not pageable
    h[:] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    d = cp.empty(nbytes, cp.uint8)
    s = cp.cuda.Stream(non_blocking=True)
    d.data.copy_from_host_async(h.ctypes.data, nbytes, s)
    back = pinned_empty(nbytes)
    d.data.copy_to_host_async(back.ctypes.data, nbytes, s)
    s.synchronize()
    assert np.array_equal(back, h)


def test_pinned_empty_is_unregistered_with_its_last_view():
    cp = pytest.importorskip("cupy")
    from aircupy.device.pinned import pinned_empty
    h = pinned_empty(8 << 20)
    ptr = h.ctypes.data
    view = h[1024:]
    del h
    gc.collect()
    assert cp.cuda.runtime.pointerGetAttributes(ptr).type == cp.cuda.runtime.memoryTypeHost
    del view
    gc.collect()
    # unregistered (a leaked registration stays in the driver's table after the pages are unmapped)
    assert cp.cuda.runtime.pointerGetAttributes(ptr).type != cp.cuda.runtime.memoryTypeHost
