"""Our AdamW equals torch.optim.AdamW step for step, in PyNative and GRAPH mode, with a parameter group at its
own learning rate (the text-encoder LoRA's --text_encoder_lr)."""
import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Parameter, Tensor, nn

from mindbooth.optim import AdamW


class _Step(nn.Cell):
    def __init__(self, optimizer):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer

    def construct(self, grads):
        return self.optimizer(grads)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_adamw_matches_torch(mode):
    rng = np.random.default_rng(0)
    shapes = [(4, 6), (6,), (3, 2)]
    initial = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(5)]
    kwargs = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)

    torch_params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in initial]
    torch_opt = torch.optim.AdamW([{"params": torch_params[:2]}, {"params": torch_params[2:], "lr": 7.5e-4}], **kwargs)
    ms_params = [Parameter(Tensor(p.copy()), name=f"p{i}") for i, p in enumerate(initial)]
    step = _Step(AdamW(ms_params, learning_rate=3e-3, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1, lr_scales=[1, 1, 0.25]))
    ms.set_context(mode=mode)
    try:
        for g in grads:
            for p, gi in zip(torch_params, g):
                p.grad = torch.from_numpy(gi)
            torch_opt.step()
            step(tuple(Tensor(gi) for gi in g))
            for ours, ref in zip(ms_params, torch_params):
                np.testing.assert_allclose(ours.asnumpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert int(step.optimizer.step.asnumpy()) == 5


def test_adamw_takes_flat_gradients_and_loads_per_parameter_state():
    """The update runs on the gradients laid end to end; a state saved per parameter (MindBooth before the flat
    moments) loads into the flat moments in the parameters' order, and a state for other parameters is refused."""
    from mindbooth.optim import flatten

    rng = np.random.default_rng(1)
    shapes = [(4, 6), (6,), (3, 2)]
    initial = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    by_tuple = [Parameter(Tensor(p.copy()), name=f"a{i}") for i, p in enumerate(initial)]
    by_flat = [Parameter(Tensor(p.copy()), name=f"b{i}") for i, p in enumerate(initial)]
    tuple_opt, flat_opt = AdamW(by_tuple, learning_rate=1e-2), AdamW(by_flat, learning_rate=1e-2)
    moments = [rng.random(s).astype(np.float32) for s in shapes]
    saved = {f"adamw_m.b{i}": Tensor(m) for i, m in enumerate(moments)}
    saved.update({f"adamw_v.b{i}": Tensor(m * m) for i, m in enumerate(moments)})
    saved.update({"adamw_step": Tensor(3, ms.int32), "adamw_lr": Tensor(1e-2, ms.float32)})
    flat_opt.load_state(saved)
    np.testing.assert_array_equal(flat_opt.exp_avg.asnumpy(), np.concatenate([m.ravel() for m in moments]))
    tuple_opt.load_state({name: flat_opt.state()[name] for name in flat_opt.state()})  # the flat layout
    np.testing.assert_array_equal(tuple_opt.exp_avg_sq.asnumpy(), flat_opt.exp_avg_sq.asnumpy())
    assert int(tuple_opt.step.asnumpy()) == 3
    tuple_opt(tuple(Tensor(g) for g in grads))
    flat_opt(flatten([Tensor(g) for g in grads]))
    for ours, other, start in zip(by_flat, by_tuple, initial):
        assert not np.allclose(ours.asnumpy(), start)
        np.testing.assert_array_equal(ours.asnumpy(), other.asnumpy())
    with pytest.raises(ValueError, match="lacks adamw_m.b0"):
        AdamW(by_flat).load_state({k.replace(".b", ".c"): v for k, v in saved.items()})
    with pytest.raises(ValueError, match="25 values in adamw_m"):
        AdamW(by_flat).load_state({"adamw_m": Tensor(np.zeros(25, np.float32)), **saved})
