"""Our AdamW (flat groups) and AdamWPerParameter (a full fine-tune's) equal torch.optim.AdamW step for step, in
PyNative and GRAPH mode, with a parameter group at its own learning rate (the text-encoder LoRA's --text_encoder_lr);
a state moves between their layouts."""
import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import Parameter, Tensor, nn

from mindbooth import optim
from mindbooth.optim import AdamW, AdamWPerParameter, flatten, flatten_groups


class _Step(nn.Cell):
    """The optimizer on gradients as the training steps pass them: flat groups to AdamW, one per parameter else."""

    def __init__(self, optimizer):
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.flat = isinstance(optimizer, AdamW)

    def construct(self, grads):
        if self.flat:
            grads = flatten_groups(grads, self.optimizer.groups)
        return self.optimizer(grads)


def test_a_state_moves_between_flat_groups_and_per_parameter_moments(monkeypatch):
    """A full fine-tune's state saved by AdamW (flat groups: accumulation or data parallel) resumes in
    AdamWPerParameter (the fused step) and back: the same moments, then the same step."""
    rng = np.random.default_rng(4)
    shapes = [(4, 6), (6,), (3, 2)]
    initial = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    monkeypatch.setattr(optim, "GROUP_ELEMENTS", 24)  # two groups
    flat = AdamW([Parameter(Tensor(p.copy()), name=f"w{i}") for i, p in enumerate(initial)])
    for moments in (flat.exp_avg, flat.exp_avg_sq):
        for moment in moments:
            moment.set_data(Tensor(rng.random(moment.shape).astype(np.float32)))
    flat.step.set_data(Tensor(4, ms.int32))
    per_parameter = AdamWPerParameter([Parameter(Tensor(p.copy()), name=f"w{i}") for i, p in enumerate(initial)])
    per_parameter.load_state({name: Tensor(p.asnumpy()) for name, p in flat.state().items()})
    np.testing.assert_array_equal(np.concatenate([m.asnumpy().ravel() for m in per_parameter.exp_avg_sq]),
                                  np.concatenate([m.asnumpy() for m in flat.exp_avg_sq]))
    back = AdamW([Parameter(Tensor(p.copy()), name=f"w{i}") for i, p in enumerate(initial)])
    back.load_state({name: Tensor(p.asnumpy()) for name, p in per_parameter.state().items()})
    grads = tuple(Tensor(rng.standard_normal(s).astype(np.float32)) for s in shapes)
    per_parameter(grads)
    back(flatten_groups(grads, back.groups))
    for ours, other in zip(per_parameter.params, back.params):
        np.testing.assert_allclose(ours.asnumpy(), other.asnumpy(), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="lacks adamw_m.w0"):
        AdamWPerParameter(per_parameter.params).load_state({"adamw_step": Tensor(1, ms.int32)})


# one flat group; two groups ([p0], [p1, p2]: cut at 24); moments per parameter (AdamWPerParameter)
@pytest.mark.parametrize("layout", ["one group", "groups of 24", "per parameter"])
@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_adamw_matches_torch(mode, layout, monkeypatch):
    monkeypatch.setattr(optim, "GROUP_ELEMENTS", 24 if layout == "groups of 24" else 1 << 26)
    optimizer_class = AdamWPerParameter if layout == "per parameter" else AdamW
    rng = np.random.default_rng(0)
    shapes = [(4, 6), (6,), (3, 2)]
    initial = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(5)]
    kwargs = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)

    torch_params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in initial]
    torch_opt = torch.optim.AdamW([{"params": torch_params[:2]}, {"params": torch_params[2:], "lr": 7.5e-4}], **kwargs)
    ms_params = [Parameter(Tensor(p.copy()), name=f"p{i}") for i, p in enumerate(initial)]
    step = _Step(optimizer_class(ms_params, learning_rate=3e-3, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1,
                                 lr_scales=[1, 1, 0.25]))
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
    if layout == "per parameter":
        assert sorted(step.optimizer.state()) == ["adamw_lr", "adamw_m.p0", "adamw_m.p1", "adamw_m.p2", "adamw_step",
                                                  "adamw_v.p0", "adamw_v.p1", "adamw_v.p2"]
    else:
        assert len(step.optimizer.groups) == (1 if layout == "one group" else 2)


def test_adamw_takes_flat_gradients_and_loads_per_parameter_state():
    """The update runs on the gradients laid end to end; a state saved per parameter (MindBooth before the flat
    moments) loads into the flat moments in the parameters' order, and a state for other parameters is refused."""
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
    np.testing.assert_array_equal(flat_opt.exp_avg[0].asnumpy(), np.concatenate([m.ravel() for m in moments]))
    tuple_opt.load_state({name: flat_opt.state()[name] for name in flat_opt.state()})  # the flat layout
    np.testing.assert_array_equal(tuple_opt.exp_avg_sq[0].asnumpy(), flat_opt.exp_avg_sq[0].asnumpy())
    assert int(tuple_opt.step.asnumpy()) == 3
    tuple_opt(flatten_groups(tuple(Tensor(g) for g in grads), tuple_opt.groups))
    flat_opt((flatten([Tensor(g) for g in grads]),))
    for ours, other, start in zip(by_flat, by_tuple, initial):
        assert not np.allclose(ours.asnumpy(), start)
        np.testing.assert_array_equal(ours.asnumpy(), other.asnumpy())
    with pytest.raises(ValueError, match="lacks adamw_m.b0"):
        AdamW(by_flat).load_state({k.replace(".b", ".c"): v for k, v in saved.items()})
    with pytest.raises(ValueError, match="25 values in adamw_m"):
        AdamW(by_flat).load_state({"adamw_m": Tensor(np.zeros(25, np.float32)), **saved})


def test_a_state_moves_between_group_layouts(monkeypatch):
    """Moments saved in one flat vector (one group, or MindBooth before groups) load into many groups and back:
    the same values in the parameters' order."""
    rng = np.random.default_rng(2)
    shapes = [(4, 6), (6,), (3, 2)]
    params = [Parameter(Tensor(rng.standard_normal(s).astype(np.float32)), name=f"g{i}") for i, s in enumerate(shapes)]
    whole = AdamW(params)
    whole.exp_avg[0].set_data(Tensor(rng.random(36).astype(np.float32)))
    saved = {name: Tensor(p.asnumpy()) for name, p in whole.state().items()}
    monkeypatch.setattr(optim, "GROUP_ELEMENTS", 24)
    split = AdamW(params)
    split.load_state(saved)
    assert [p.name for p in split.exp_avg] == ["adamw_m", "adamw_m_group1"]
    np.testing.assert_array_equal(np.concatenate([p.asnumpy() for p in split.exp_avg]), whole.exp_avg[0].asnumpy())
    monkeypatch.setattr(optim, "GROUP_ELEMENTS", 1 << 26)
    again = AdamW(params)
    again.load_state({name: Tensor(p.asnumpy()) for name, p in split.state().items()})
    np.testing.assert_array_equal(again.exp_avg[0].asnumpy(), whole.exp_avg[0].asnumpy())
    with pytest.raises(ValueError, match="24 values in adamw_m for 36"):
        again.load_state({**saved, "adamw_m": Tensor(np.zeros(24, np.float32))})
