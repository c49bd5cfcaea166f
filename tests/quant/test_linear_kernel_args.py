"""QuantLinear keeps its kernel arguments (pointers into its buffers) between calls: they must follow
the buffers when these are replaced or moved, never point at the old ones."""
from __future__ import annotations

import torch

from slmkit.quant.format import quantize
from slmkit.quant.linear import QuantLinear, kernel_active


def _linear(seed: int) -> QuantLinear:
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(seed))
    return QuantLinear(quantize(w, bits=4, group=32))


def test_replaced_buffers_are_used_not_the_cached_ones():
    a, b = _linear(0), _linear(1)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    ya, yb = a(x), b(x)
    assert not torch.equal(ya, yb)
    for name in ("qweight", "scales", "mins"):  # a loader swapping in another weight's tensors
        setattr(a, name, getattr(b, name))
    assert torch.equal(a(x), yb)
    a.load_state_dict(_linear(0).state_dict())  # copied in place: same storage, new values
    assert torch.equal(a(x), ya)
    assert kernel_active() or a._kernel_args is None


def test_a_moved_module_still_computes_the_same():
    a = _linear(3)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    y = a(x)
    a.to(torch.device("cpu"))
    a.qweight = a.qweight.clone()  # new storage for one buffer only
    assert torch.equal(a(x), y)
