"""radtrain.opcount: the operators a step dispatches, the stand-in for its kernel launches."""

from __future__ import annotations

import torch

from radtrain.opcount import OpCounter, count_ops


def test_computing_operators_are_counted_views_are_not():
    x = torch.randn(4, 6)
    counts = count_ops(lambda: (x.view(6, 4).t().reshape(4, 6) * 2 + 1).detach().sum())
    # view, t, reshape of a contiguous-compatible view, detach: no kernel. mul, add, sum: three.
    assert dict(counts) == {"mul": 1, "add": 1, "sum": 1}


def test_backward_is_counted_and_a_device_filter_skips_host_work():
    w = torch.randn(3, 3, requires_grad=True)
    on_device = torch.randn(3, 3, device="meta")  # stands in for a GPU tensor: no data, real dispatch
    with OpCounter() as everything, OpCounter("meta") as device_only:
        (w @ w).sum().backward()
        torch.empty(5)  # an allocation: no kernel
        (on_device * 2).exp()
    assert everything.counts["mm"] == 3  # one forward, two for the gradient
    assert "empty" not in everything.counts
    # The host's own work on CPU tensors launches nothing on the device.
    assert dict(device_only.counts) == {"mul": 1, "exp": 1}


def test_operators_that_wait_for_the_device_are_flagged():
    x, lengths = torch.randn(5), torch.tensor([1, 2, 0, 1, 1])
    with OpCounter() as counter:
        x[x > 0]  # boolean mask: its size is known once the device has computed it
        x.sum().item()
        torch.repeat_interleave(x, lengths)
        torch.repeat_interleave(x, lengths, output_size=5)  # size given: no wait
        x[torch.tensor([0, 2])]  # integer index: no wait
        y = x.clone()
        y[x > 0] = 0.0  # in place: index_put_ with a mask
        x * 2
    assert dict(counter.syncs) == {"index": 1, "_local_scalar_dense": 1, "repeat_interleave": 1, "index_put_": 1}
