"""AdamW with torch.optim.AdamW's semantics (decoupled weight decay, bias correction), in MindSpore ops.

Written out because on this MindSpore build `nn.AdamWeightDecay` has no bias correction (its first step is
~3x torch's) and `mint.optim.AdamW` fails on CPU. Runs inside a GRAPH_MODE Cell; lr is a Parameter so a
schedule changes it without recompiling."""
import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops


_ravel = ops.MultitypeFuncGraph("ravel")


@_ravel.register("Tensor")
def _ravel_one(tensor):
    return tensor.reshape(-1).astype(ms.float32)


_hyper_map = ops.HyperMap()


def flatten(tensors):
    """One fp32 vector: the tensors raveled and concatenated in order (one Concat launch for all of them).
    By HyperMap: a comprehension over ~1100 tensors exceeds GRAPH mode's call depth."""
    return ops.cat(_hyper_map(_ravel, tuple(tensors)))


def flat_layout(params) -> tuple:
    """(sizes, offsets): where each of `params` lies in `flatten`'s vector, as tuples of ints."""
    sizes = tuple(int(np.prod(p.shape)) for p in params)
    return sizes, tuple(int(offset) for offset in np.cumsum((0,) + sizes)[:-1])


_assign_piece = ops.MultitypeFuncGraph("assign_piece")


@_assign_piece.register("Tensor", "Tensor", "Number", "Number")
def _assign_piece_one(flat, param, begin, size):
    ops.assign(param, ops.slice(flat, (begin,), (size,)).reshape(param.shape).astype(param.dtype))
    return True


class AdamW(nn.Cell):
    """`lr_scales`: one factor per parameter (default 1): its learning rate is learning_rate * factor, so a
    group (e.g. the text-encoder LoRA) can train at its own rate under the same schedule.

    The update runs once over all parameters laid end to end (`flatten`), moments stored flat (`adamw_m`,
    `adamw_v`): a LoRA has ~1100 small parameters, and a dozen element-wise launches per parameter cost more
    than the arithmetic. The new values are then sliced back into
    the parameters. `grads`: the gradients flat in the parameters' order, or a tuple of them."""

    def __init__(self, params, learning_rate=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, lr_scales=None):
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple(params)
        lr_scales = [1.0] * len(self.params) if lr_scales is None else list(lr_scales)
        if len(lr_scales) != len(self.params):
            raise ValueError(f"lr_scales has {len(lr_scales)} entries for {len(self.params)} parameters")
        self.sizes, self.offsets = flat_layout(self.params)
        if all(scale == lr_scales[0] for scale in lr_scales):
            self.lr_scales = Tensor(float(lr_scales[0]), ms.float32)
        else:  # one factor per element
            self.lr_scales = Tensor(np.repeat(np.asarray(lr_scales, np.float32), self.sizes))
        total = sum(self.sizes)
        self.exp_avg = Parameter(Tensor(np.zeros(total, np.float32)), name="adamw_m", requires_grad=False)
        self.exp_avg_sq = Parameter(Tensor(np.zeros(total, np.float32)), name="adamw_v", requires_grad=False)
        self.step = Parameter(Tensor(0, ms.int32), name="adamw_step", requires_grad=False)
        self.learning_rate = Parameter(Tensor(learning_rate, ms.float32), name="adamw_lr", requires_grad=False)
        self.beta1 = Tensor(beta1, ms.float32)
        self.beta2 = Tensor(beta2, ms.float32)
        self.eps = Tensor(eps, ms.float32)
        self.weight_decay = Tensor(weight_decay, ms.float32)
        self.hyper_map = ops.HyperMap()

    def state(self) -> dict:
        """Everything needed to resume: moments, step count, current learning rate (name -> Parameter)."""
        return {p.name: p for p in (self.exp_avg, self.exp_avg_sq, self.step, self.learning_rate)}

    def load_state(self, saved: dict, source: str = "the optimizer state"):
        """Set the state from `saved` (name -> Tensor/Parameter), as state() names it or as MindBooth before the
        flat moments saved it (`adamw_m.<parameter name>`, one per parameter)."""
        for name, flat in ((self.exp_avg.name, self.exp_avg), (self.exp_avg_sq.name, self.exp_avg_sq)):
            if name in saved:
                value = saved[name].asnumpy().reshape(-1)
            else:
                per_parameter = [f"{name}.{p.name}" for p in self.params]
                missing = [key for key in per_parameter if key not in saved]
                if missing:
                    raise ValueError(f"{source} lacks {missing[0]}: it was saved for other trainable parameters")
                value = np.concatenate([saved[key].asnumpy().reshape(-1) for key in per_parameter])
            if value.size != flat.size:
                raise ValueError(f"{source} has {value.size} values in {name} for {flat.size} trainable values: it was "
                                 f"saved for other trainable parameters")
            flat.set_data(Tensor(value.astype(np.float32)))
        for param in (self.step, self.learning_rate):
            if param.name not in saved:
                raise ValueError(f"{source} lacks {param.name}")
            param.set_data(Tensor(saved[param.name].asnumpy()).astype(param.dtype))

    def construct(self, grads):
        if isinstance(grads, (tuple, list)):
            grads = flatten(grads)
        step = self.step + 1
        ops.assign(self.step, step)
        step = step.astype(ms.float32)
        bias_correction1 = 1.0 - ops.pow(self.beta1, step)
        bias_correction2 = 1.0 - ops.pow(self.beta2, step)
        lr = self.learning_rate * self.lr_scales
        m_new = self.beta1 * self.exp_avg + (1.0 - self.beta1) * grads
        v_new = self.beta2 * self.exp_avg_sq + (1.0 - self.beta2) * grads * grads
        decayed = flatten(self.params) * (1.0 - lr * self.weight_decay)
        denom = ops.sqrt(v_new) / ops.sqrt(bias_correction2) + self.eps
        new_params = decayed - (lr / bias_correction1) * m_new / denom
        ops.assign(self.exp_avg, m_new)
        ops.assign(self.exp_avg_sq, v_new)
        return self.hyper_map(ops.partial(_assign_piece, new_params), self.params, self.offsets, self.sizes)
