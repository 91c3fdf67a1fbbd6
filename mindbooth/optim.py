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


GROUP_ELEMENTS = 1 << 26  # values per flat group: 256 MB in fp32, far below 32-bit byte offsets


def flatten(tensors):
    """One fp32 vector: the tensors raveled and concatenated in order (one Concat launch for all of them).
    By HyperMap: a comprehension over ~1100 tensors exceeds GRAPH mode's call depth."""
    return ops.cat(_hyper_map(_ravel, tuple(tensors)))


def flat_groups(params) -> tuple:
    """(start, stop) index ranges of consecutive `params`, each range laid end to end in one flat vector: as many
    parameters as fit in GROUP_ELEMENTS values (a larger one alone). A LoRA is one group, so each element-wise op of
    its step is one launch; a full fine-tune (SD 1.5: 860M values) is cut into groups whose temporaries stay small
    and whose slices stay within 32-bit offsets."""
    groups, start, total = [], 0, 0
    for index, param in enumerate(params):
        size = int(np.prod(param.shape))
        if index > start and total + size > GROUP_ELEMENTS:
            groups.append((start, index))
            start, total = index, 0
        total += size
    groups.append((start, len(params)))
    return tuple(groups)


def flatten_groups(tensors, groups) -> tuple:
    """One `flatten` vector per (start, stop) range of `groups` (flat_groups)."""
    flats = ()
    for group in groups:
        flats = flats + (flatten(tensors[group[0]:group[1]]),)
    return flats


def flat_layout(params) -> tuple:
    """(sizes, offsets): where each of `params` lies in `flatten`'s vector, as tuples of ints."""
    sizes = tuple(int(np.prod(p.shape)) for p in params)
    return sizes, tuple(int(offset) for offset in np.cumsum((0,) + sizes)[:-1])


def group_name(prefix: str, index: int) -> str:
    """The name of flat group `index`'s vector: `prefix` for the first (a LoRA's only group), `prefix_group<i>` after."""
    return prefix if index == 0 else f"{prefix}_group{index}"


_assign_piece = ops.MultitypeFuncGraph("assign_piece")


@_assign_piece.register("Tensor", "Tensor", "Number", "Number")
def _assign_piece_one(flat, param, begin, size):
    ops.assign(param, ops.slice(flat, (begin,), (size,)).reshape(param.shape).astype(param.dtype))
    return True


class _AdamWState(nn.Cell):
    """What both AdamW layouts share: the hyperparameters, the step count and learning rate (Parameters, so a schedule
    changes the rate without recompiling), the state's names and how a saved state's moments are read."""

    def __init__(self, params, learning_rate, beta1, beta2, eps, weight_decay, lr_scales):
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple(params)
        self.lr_scale_list = [1.0] * len(self.params) if lr_scales is None else [float(s) for s in lr_scales]
        if len(self.lr_scale_list) != len(self.params):
            raise ValueError(f"lr_scales has {len(self.lr_scale_list)} entries for {len(self.params)} parameters")
        self.step = Parameter(Tensor(0, ms.int32), name="adamw_step", requires_grad=False)
        self.learning_rate = Parameter(Tensor(learning_rate, ms.float32), name="adamw_lr", requires_grad=False)
        self.beta1 = Tensor(beta1, ms.float32)
        self.beta2 = Tensor(beta2, ms.float32)
        self.eps = Tensor(eps, ms.float32)
        self.weight_decay = Tensor(weight_decay, ms.float32)
        self.hyper_map = ops.HyperMap()

    def next_bias_corrections(self):
        """Count one more step; returns AdamW's bias corrections (1 - beta1^t, 1 - beta2^t) for it."""
        step = self.step + 1
        ops.assign(self.step, step)
        step = step.astype(ms.float32)
        return 1.0 - ops.pow(self.beta1, step), 1.0 - ops.pow(self.beta2, step)

    def state(self) -> dict:
        """Everything needed to resume: moments, step count, current learning rate (name -> Parameter)."""
        return {p.name: p for p in (*self.exp_avg, *self.exp_avg_sq, self.step, self.learning_rate)}

    def _saved_moments(self, saved: dict, prefix: str, source: str) -> np.ndarray:
        """The moments `prefix` of `saved`, laid end to end in the parameters' order, from either layout: flat groups
        (`adamw_m`, `adamw_m_group1`, ...) or one per parameter (`adamw_m.<parameter name>`)."""
        pieces = []
        while group_name(prefix, len(pieces)) in saved:
            pieces.append(saved[group_name(prefix, len(pieces))].asnumpy().reshape(-1))
        if not pieces:
            per_parameter = [f"{prefix}.{p.name}" for p in self.params]
            missing = [key for key in per_parameter if key not in saved]
            if missing:
                raise ValueError(f"{source} lacks {missing[0]}: it was saved for other trainable parameters")
            pieces = [saved[key].asnumpy().reshape(-1) for key in per_parameter]
        whole = np.concatenate(pieces)
        total = sum(int(np.prod(p.shape)) for p in self.params)
        if whole.size != total:
            raise ValueError(f"{source} has {whole.size} values in {prefix} for {total} trainable values: it was "
                             "saved for other trainable parameters")
        return whole

    def load_state(self, saved: dict, source: str = "the optimizer state"):
        """Set the state from `saved` (name -> Tensor/Parameter), as either layout's state() names it."""
        for prefix, moments in (("adamw_m", self.exp_avg), ("adamw_v", self.exp_avg_sq)):
            whole = self._saved_moments(saved, prefix, source)
            sizes = [int(np.prod(m.shape)) for m in moments]
            for moment, value in zip(moments, np.split(whole, np.cumsum(sizes)[:-1])):
                moment.set_data(Tensor(value.reshape(moment.shape).astype(np.float32)))
        for param in (self.step, self.learning_rate):
            if param.name not in saved:
                raise ValueError(f"{source} lacks {param.name}")
            param.set_data(Tensor(saved[param.name].asnumpy()).astype(param.dtype))


class AdamW(_AdamWState):
    """`lr_scales`: one factor per parameter (default 1): its learning rate is learning_rate * factor, so a
    group (e.g. the text-encoder LoRA) can train at its own rate under the same schedule.

    The update runs over the parameters laid end to end in flat groups (`flat_groups`), moments stored flat per
    group (`adamw_m`, `adamw_v`, then `adamw_m_group1`, ...): a LoRA has ~1100 small parameters in one group, and
    a dozen element-wise launches per parameter cost more than the arithmetic. The new values are then sliced back
    into the parameters. `grads`: one flat vector per group (`flatten_groups`)."""

    def __init__(self, params, learning_rate=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, lr_scales=None):
        super().__init__(params, learning_rate, beta1, beta2, eps, weight_decay, lr_scales)
        self.groups = flat_groups(self.params)
        self.layouts = tuple(flat_layout(self.params[start:stop]) for start, stop in self.groups)
        self.totals = tuple(sum(sizes) for sizes, _ in self.layouts)
        self.lr_scales = tuple(_group_lr_scales(self.lr_scale_list[start:stop], sizes) for (start, stop), (sizes, _) in
                               zip(self.groups, self.layouts))
        self.exp_avg = ParameterTuple([Parameter(Tensor(np.zeros(total, np.float32)), name=group_name("adamw_m", i),
                                                 requires_grad=False) for i, total in enumerate(self.totals)])
        self.exp_avg_sq = ParameterTuple([Parameter(Tensor(np.zeros(total, np.float32)), name=group_name("adamw_v", i),
                                                    requires_grad=False) for i, total in enumerate(self.totals)])

    def construct(self, grads):
        bias_correction1, bias_correction2 = self.next_bias_corrections()
        done = ()
        for i in range(len(self.groups)):
            params = self.params[self.groups[i][0]:self.groups[i][1]]
            m_new, v_new, new_params = adamw_values(self.beta1, self.beta2, self.eps, self.weight_decay,
                                                    self.learning_rate * self.lr_scales[i], bias_correction1,
                                                    bias_correction2, flatten(params), self.exp_avg[i],
                                                    self.exp_avg_sq[i], grads[i])
            ops.assign(self.exp_avg[i], m_new)
            ops.assign(self.exp_avg_sq[i], v_new)
            sizes, offsets = self.layouts[i]
            done = done + (self.hyper_map(ops.partial(_assign_piece, new_params), params, offsets, sizes),)
        return done


def adamw_values(beta1, beta2, eps, weight_decay, lr, bias_correction1, bias_correction2, value, m, v, grad):
    """torch.optim.AdamW's update of one tensor `value` (decoupled weight decay, bias correction): (new first
    moment, new second moment, new value)."""
    m_new = beta1 * m + (1.0 - beta1) * grad
    v_new = beta2 * v + (1.0 - beta2) * grad * grad
    denom = ops.sqrt(v_new) / ops.sqrt(bias_correction2) + eps
    return m_new, v_new, value * (1.0 - lr * weight_decay) - (lr / bias_correction1) * m_new / denom


_adamw_one = ops.MultitypeFuncGraph("adamw_one")


@_adamw_one.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                     "Tensor", "Tensor")
def _adamw_one_parameter(beta1, beta2, eps, weight_decay, learning_rate, bias_correction1, bias_correction2, lr_scale,
                         param, m, v, grad):
    m_new, v_new, value = adamw_values(beta1, beta2, eps, weight_decay, learning_rate * lr_scale, bias_correction1,
                                       bias_correction2, param, m, v, grad)
    ops.assign(m, m_new)
    ops.assign(v, v_new)
    ops.assign(param, value)
    return True


class AdamWPerParameter(_AdamWState):
    """AdamW's update (as AdamW above) on each parameter in place, with moments per parameter (`adamw_m.<name>`,
    `adamw_v.<name>`): for a full fine-tune, whose few hundred large parameters need no flat vector, and whose flat
    copies of the weights, gradients and new values would each be the model's size. `grads`: one per parameter.
    `lr_scales` as AdamW's."""

    def __init__(self, params, learning_rate=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, lr_scales=None):
        super().__init__(params, learning_rate, beta1, beta2, eps, weight_decay, lr_scales)
        self.lr_scales = tuple(Tensor(scale, ms.float32) for scale in self.lr_scale_list)
        self.exp_avg = self.params.clone(prefix="adamw_m", init="zeros")
        self.exp_avg_sq = self.params.clone(prefix="adamw_v", init="zeros")
        for moment in (*self.exp_avg, *self.exp_avg_sq):
            moment.requires_grad = False

    def construct(self, grads):
        bias_correction1, bias_correction2 = self.next_bias_corrections()
        update = ops.partial(_adamw_one, self.beta1, self.beta2, self.eps, self.weight_decay, self.learning_rate,
                             bias_correction1, bias_correction2)
        return self.hyper_map(update, self.lr_scales, self.params, self.exp_avg, self.exp_avg_sq, grads)


def _group_lr_scales(scales, sizes) -> Tensor:
    """A group's learning-rate factors: one scalar when alike, else one per element."""
    if all(scale == scales[0] for scale in scales):
        return Tensor(float(scales[0]), ms.float32)
    return Tensor(np.repeat(np.asarray(scales, np.float32), sizes))
