"""AdamW with torch.optim.AdamW's semantics (decoupled weight decay, bias correction), in MindSpore ops.

Written out because on this MindSpore build `nn.AdamWeightDecay` has no bias correction (its first step is
~3x torch's) and `mint.optim.AdamW` fails on CPU. Runs inside a GRAPH_MODE Cell; lr is a Parameter so a
schedule changes it without recompiling."""
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

_adamw_update = ops.MultitypeFuncGraph("adamw_update")


@_adamw_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _update(lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2, lr_scale, param, m, v, grad):
    lr = lr * lr_scale
    grad = grad.astype(ms.float32)
    m_new = beta1 * m + (1.0 - beta1) * grad
    v_new = beta2 * v + (1.0 - beta2) * grad * grad
    decayed = param.astype(ms.float32) * (1.0 - lr * weight_decay)
    denom = ops.sqrt(v_new) / ops.sqrt(bias_correction2) + eps
    new_param = decayed - (lr / bias_correction1) * m_new / denom
    ops.assign(m, m_new)
    ops.assign(v, v_new)
    ops.assign(param, new_param.astype(param.dtype))
    return True


class AdamW(nn.Cell):
    """`lr_scales`: one factor per parameter (default 1): its learning rate is learning_rate * factor, so a
    group (e.g. the text-encoder LoRA) can train at its own rate under the same schedule."""

    def __init__(self, params, learning_rate=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, lr_scales=None):
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple(params)
        lr_scales = [1.0] * len(self.params) if lr_scales is None else list(lr_scales)
        if len(lr_scales) != len(self.params):
            raise ValueError(f"lr_scales has {len(lr_scales)} entries for {len(self.params)} parameters")
        self.lr_scales = tuple(Tensor(scale, ms.float32) for scale in lr_scales)
        self.exp_avg = self.params.clone(prefix="adamw_m", init="zeros")
        self.exp_avg_sq = self.params.clone(prefix="adamw_v", init="zeros")
        self.step = Parameter(Tensor(0, ms.int32), name="adamw_step", requires_grad=False)
        self.learning_rate = Parameter(Tensor(learning_rate, ms.float32), name="adamw_lr", requires_grad=False)
        self.beta1 = Tensor(beta1, ms.float32)
        self.beta2 = Tensor(beta2, ms.float32)
        self.eps = Tensor(eps, ms.float32)
        self.weight_decay = Tensor(weight_decay, ms.float32)
        self.hyper_map = ops.HyperMap()

    def state(self) -> dict:
        """Everything needed to resume: moments, step count, current learning rate (name -> Parameter)."""
        state = {p.name: p for p in self.exp_avg + self.exp_avg_sq}
        state[self.step.name] = self.step
        state[self.learning_rate.name] = self.learning_rate
        return state

    def construct(self, grads):
        step = self.step + 1
        ops.assign(self.step, step)
        step = step.astype(ms.float32)
        bias_correction1 = 1.0 - ops.pow(self.beta1, step)
        bias_correction2 = 1.0 - ops.pow(self.beta2, step)
        update = ops.partial(
            _adamw_update, self.learning_rate, self.beta1, self.beta2, self.eps, self.weight_decay, bias_correction1, bias_correction2
        )
        return self.hyper_map(update, self.lr_scales, self.params, self.exp_avg, self.exp_avg_sq, grads)
