"""The DreamBooth training step as GRAPH_MODE-compilable Cells.

One optimizer step = `gradient_accumulation_steps` calls of `GradStep` (forward, backward, gradients
added to buffers) and one call of `ApplyStep` (average, clip, AdamW, clear buffers). With `split_prior_batch`
each micro-batch is two GradStep calls, its instance rows and then its class rows (prior_passes): the same sum
of gradients, with the activations of half the rows. Randomness (noise,
sigmas) comes from the host so runs are reproducible and resumable.

A full fine-tune without accumulation runs both in one graph instead (`FusedStep`), without the gradient buffer.

Loss scaling: the loss is multiplied by `loss_scale` once before backward and the gradients divided by it
once after; accumulation divides by the number of micro-steps once. Nothing else rescales."""
import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from mindbooth.optim import flat_groups, flat_layout, flatten_groups, group_name


class DreamBoothLoss(nn.Cell):
    """loss = loss_instance + prior_loss_weight * loss_class (Ruiz et al., 2023, eq. 2).

    The batch holds the instance samples first and the class samples after them; each part's loss is
    the mean of the per-sample diffusion loss over that part.

    `conditioning` is (crossattn, vector) when the text encoders are frozen (embeddings computed outside), or
    (crossattn, vector, *the UNet's context_projections of crossattn) (mindbooth/context_projections.py), or,
    with `train_text_encoder`, the conditioner's inputs (token ids per text encoder, size numbers): the text
    encoders then run inside the gradient graph so their LoRA trains."""

    def __init__(self, engine, prior_loss_weight: float, with_prior_preservation: bool, train_text_encoder: bool = False):
        super().__init__(auto_prefix=False)
        self.network = engine.model
        self.denoiser = engine.denoiser
        self.loss_fn = engine.loss_fn
        self.conditioner = engine.conditioner if train_text_encoder else None
        self.prior_loss_weight = float(prior_loss_weight)
        self.with_prior_preservation = with_prior_preservation

    def construct(self, latents, noise, sigmas, conditioning):
        if self.conditioner is None:
            cond = {"crossattn": conditioning[0], "vector": conditioning[1]}
            if len(conditioning) > 2:  # the frozen keys/values of crossattn, computed once per run
                cond["cached_kv"] = conditioning[2:]
        else:
            vector, crossattn = self.conditioner(*conditioning)
            cond = {"crossattn": crossattn, "vector": vector}
        per_sample = self.loss_fn(self.network, self.denoiser, cond, latents, noise, sigmas)
        if self.with_prior_preservation:
            half = per_sample.shape[0] // 2
            loss_instance = per_sample[:half].mean()
            loss_class = per_sample[half:].mean()
            return loss_instance + self.prior_loss_weight * loss_class, loss_instance, loss_class
        loss_instance = per_sample.mean()
        return loss_instance, loss_instance, ops.zeros_like(loss_instance)


class GradStep(nn.Cell):
    """Forward + backward of one micro-batch; adds the gradients of `loss_weight` x its loss into `buffers`
    (loss_scale-unscaled). Returns (loss_weight x loss, loss_instance, loss_class, gradients_finite).
    `loss_weight` is 1, or prior_loss_weight for a pass over class rows alone (prior_passes).

    The gradients are handled flat in groups (mindbooth.optim.flat_groups, `buffers` from make_buffers): one launch
    per element-wise op and one all-reduce for all of a LoRA's ~1100 parameters instead of one per parameter.

    Pass `conditioning` as `ms.mutable(tuple_of_tensors)`: a plain tuple of Tensors is a constant of the
    compiled graph, and GRAPH_MODE would then recompile whenever its values change (every step)."""

    def __init__(self, loss_net: DreamBoothLoss, params, buffers: ParameterTuple, grad_reducer=None):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.params = ParameterTuple(params)
        self.groups = flat_groups(self.params)
        self.buffers = buffers  # one flat buffer per group (make_buffers)
        self.grad_reducer = grad_reducer if grad_reducer is not None else ops.identity
        self.value_and_grad = ms.value_and_grad(self._scaled_loss, grad_position=None, weights=self.params, has_aux=True)

    def _scaled_loss(self, latents, noise, sigmas, conditioning, loss_scale, loss_weight):
        loss, loss_instance, loss_class = self.loss_net(latents, noise, sigmas, conditioning)
        loss = loss * loss_weight
        return loss * loss_scale, loss, loss_instance, loss_class

    def construct(self, latents, noise, sigmas, conditioning, loss_scale, loss_weight):
        (scaled_loss, loss, loss_instance, loss_class), grads = self.value_and_grad(latents, noise, sigmas, conditioning,
                                                                                    loss_scale, loss_weight)
        grads = self.grad_reducer(flatten_groups(grads, self.groups))
        # An overflow shows in the scaled loss or in any gradient; either makes the step unusable.
        finite = ops.isfinite(scaled_loss)
        accumulated = ()
        for i in range(len(self.groups)):
            finite = ops.logical_and(finite, ops.isfinite(grads[i]).all())
            accumulated = accumulated + (ops.assign_add(self.buffers[i], grads[i] * (1.0 / loss_scale)),)
        return ops.depend(loss, accumulated), loss_instance, loss_class, finite


class ApplyStep(nn.Cell):
    """Averages the accumulated gradients, clips them by global norm, runs the optimizer, clears the buffers.
    Returns the global gradient norm before clipping."""

    def __init__(self, buffers: ParameterTuple, optimizer: nn.Cell, accumulation_steps: int, clip_grad: bool, max_grad_norm: float):
        super().__init__(auto_prefix=False)
        self.buffers = buffers  # one flat buffer per group (make_buffers)
        self.optimizer = optimizer
        self.inverse_steps = ms.Tensor(1.0 / accumulation_steps, ms.float32)
        self.clip_grad = clip_grad
        self.max_grad_norm = float(max_grad_norm)

    def construct(self):
        grads = ()
        for i in range(len(self.buffers)):
            grads = grads + (self.buffers[i] * self.inverse_steps,)
        norm = clip_and_update(self.optimizer, grads, self.clip_grad, self.max_grad_norm)
        # Cleared by x * 0 (the gradients are finite here): the compiler folds zeros_like of a static shape into a
        # constant as large as the buffer, which a full fine-tune's cached graph cannot hold (> 2 GB).
        for i in range(len(self.buffers)):
            norm = ops.depend(norm, ops.assign(self.buffers[i], self.buffers[i] * 0.0))
        return norm


_square_sum = ops.MultitypeFuncGraph("square_sum")
_all_finite = ops.MultitypeFuncGraph("all_finite")
_times = ops.MultitypeFuncGraph("times")
_hyper_map = ops.HyperMap()


@_square_sum.register("Tensor")
def _square_sum_one(grad):
    return (grad * grad).sum()


@_all_finite.register("Tensor")
def _all_finite_one(grad):
    return ops.isfinite(grad).all()


@_times.register("Tensor", "Tensor")
def _times_one(factor, grad):
    return grad * factor


def clip_and_update(optimizer, grads, clip_grad: bool, max_grad_norm: float):
    """Clip `grads` (flat groups, or one per parameter) by their global norm (when `clip_grad`) and run `optimizer`
    on them; returns the norm before clipping. By HyperMap: a full fine-tune has hundreds of gradients."""
    norm = ops.sqrt(ops.addn(_hyper_map(_square_sum, grads)))
    if clip_grad:
        clip = ops.minimum(max_grad_norm / (norm + 1e-6), ms.Tensor(1.0, ms.float32))
        grads = _hyper_map(ops.partial(_times, clip), grads)
    return ops.depend(norm, optimizer(grads))


class FusedStep(nn.Cell):
    """GradStep and ApplyStep in one graph, for a step of one pass (no accumulation, no split prior batch) without
    a loss scale: the gradients go to `optimizer` (an AdamWPerParameter: no flat copies) as the backward makes them,
    with no accumulation buffer (for a full fine-tune of SD 1.5 that buffer alone is 3.2 GiB). Takes GradStep's
    inputs (`loss_scale` unused: 1); returns GradStep's outputs and the global gradient norm before clipping (NaN
    where a gradient was not finite and the step was skipped)."""

    def __init__(self, loss_net: DreamBoothLoss, params, optimizer: nn.Cell, clip_grad: bool, max_grad_norm: float):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.params = ParameterTuple(params)
        self.optimizer = optimizer
        self.clip_grad = clip_grad
        self.max_grad_norm = float(max_grad_norm)
        self.value_and_grad = ms.value_and_grad(self._weighted_loss, grad_position=None, weights=self.params, has_aux=True)

    def _weighted_loss(self, latents, noise, sigmas, conditioning, loss_weight):
        loss, loss_instance, loss_class = self.loss_net(latents, noise, sigmas, conditioning)
        loss = loss * loss_weight
        return loss, loss_instance, loss_class

    def construct(self, latents, noise, sigmas, conditioning, loss_scale, loss_weight):
        (loss, loss_instance, loss_class), grads = self.value_and_grad(latents, noise, sigmas, conditioning, loss_weight)
        finite = ops.logical_and(ops.isfinite(loss), ops.stack(_hyper_map(_all_finite, grads)).all())
        norm = ms.Tensor(float("nan"), ms.float32)
        if finite:  # else the step is skipped, as the trainer skips ApplyStep
            norm = clip_and_update(self.optimizer, grads, self.clip_grad, self.max_grad_norm)
        return ops.depend(loss, norm), loss_instance, loss_class, finite, norm


def prior_passes(instance_rows: int, with_prior: bool, split_prior_batch: bool, prior_loss_weight: float) -> list:
    """The GradStep calls of one micro-batch (instance rows first, then as many class rows) as (rows, loss_weight):
    all rows at once (DreamBoothLoss with prior preservation weighs the parts), or with `split_prior_batch` the
    instance rows, then the class rows weighted by prior_loss_weight, each through a loss without prior
    preservation (the mean over its rows). The gradients add up to the same sum; the activations are half."""
    rows = instance_rows * (2 if with_prior else 1)
    if not (with_prior and split_prior_batch):
        return [(slice(0, rows), 1.0)]
    return [(slice(0, instance_rows), 1.0), (slice(instance_rows, rows), float(prior_loss_weight))]


def step_input_shapes(model_params, rows: int, resolution: int) -> dict:
    """Shapes of GradStep's inputs for `rows` samples at `resolution` with cached text embeddings (frozen text
    encoders), read from the model config: latents, noise, sigmas and the (crossattn, vector) conditioning (vector
    width 0 for models without size conditioning)."""
    unet = model_params.network_config.params
    side = resolution // int(model_params.get("latents_per_pixel", 8))
    tokens = max(int(embedder.get("params", {}).get("max_length", 77))
                 for embedder in model_params.conditioner_config.params.emb_models if embedder.input_key == "txt")
    latents = (rows, int(unet.in_channels), side, side)
    return {"latents": latents, "noise": latents, "sigmas": (rows,),
            "conditioning": [(rows, tokens, text_width(unet)), (rows, vector_width(model_params))]}


def text_width(unet_params) -> int:
    """The width of the `crossattn` text embeddings the UNet takes: sgm's context_dim, or for DeepFloyd IF's UNet
    (diffusers' fields) the T5 width it projects from (encoder_hid_dim)."""
    if "context_dim" in unet_params:
        return int(unet_params.context_dim)
    return int(unet_params.get("encoder_hid_dim") or unet_params.cross_attention_dim)


def vector_width(model_params) -> int:
    """The width of the `vector` conditioning: the UNet's adm_in_channels for a class-conditioned (size-conditioned)
    UNet as SDXL/SSD-1B; 0 for SD 1.x/2.x, whose conditioner gives an empty vector (no label_emb)."""
    unet = model_params.network_config.params
    return int(unet.get("adm_in_channels") or 0) if unet.get("num_classes") is not None else 0


def zero_step_inputs(shapes: dict, context_projections=None) -> list:
    """GradStep's inputs of `shapes` (step_input_shapes), as the training loop passes them, all zeros but the
    loss scale and weight: for compiling the step before any data exists. With `context_projections` (a ContextProjections),
    the conditioning carries the projections of the zero text, as step_conditioning makes it."""
    def zeros(shape):
        return Tensor(np.zeros(shape, np.float32))

    conditioning = step_conditioning([zeros(shape) for shape in shapes["conditioning"]], context_projections)
    return [zeros(shapes["latents"]), zeros(shapes["noise"]), zeros(shapes["sigmas"]), conditioning, Tensor(1.0, ms.float32),
            Tensor(1.0, ms.float32)]


def step_conditioning(conditioning, context_projections=None):
    """GradStep's `conditioning` input from the cached embeddings [crossattn, vector] (or the text encoders' inputs):
    a mutable tuple, since a plain tuple of Tensors is a graph constant and GRAPH_MODE would recompile at every
    step; with `context_projections`, the frozen keys/values of crossattn appended (DreamBoothLoss)."""
    conditioning = tuple(conditioning)
    if context_projections is not None:
        conditioning = conditioning + tuple(context_projections(conditioning[0]))
    return ms.mutable(conditioning)


def make_buffers(params) -> ParameterTuple:
    """The gradient accumulation buffers: per flat group (mindbooth.optim.flat_groups) one fp32 vector, its
    parameters' gradients laid end to end."""
    return ParameterTuple([Parameter(Tensor(np.zeros(sum(flat_layout(params[start:stop])[0]), np.float32)),
                                     name=group_name("grad_accum", i), requires_grad=False)
                           for i, (start, stop) in enumerate(flat_groups(params))])


def buffered_gradients(buffers: ParameterTuple, params) -> list:
    """The accumulated gradients as numpy arrays, one per parameter in its shape, from make_buffers' flat buffers."""
    grads = []
    for buffer, (start, stop) in zip(buffers, flat_groups(params)):
        flat, group = buffer.asnumpy(), params[start:stop]
        sizes, offsets = flat_layout(group)
        grads += [flat[begin:begin + size].reshape(p.shape) for p, size, begin in zip(group, sizes, offsets)]
    return grads


class DynamicLossScale:
    """Host-side loss scale for fp16: halve on overflow (the step is skipped), double after
    `growth_interval` clean steps. In fp32 it stays at 1 (disabled)."""

    def __init__(self, enabled: bool, initial_scale: float = 2.0**16, growth_interval: int = 1000):
        self.enabled = enabled
        self.scale = initial_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.clean_steps = 0
        self.skipped_steps = 0

    def tensor(self) -> Tensor:
        return Tensor(self.scale, ms.float32)

    def update(self, finite: bool) -> bool:
        """Record one optimizer step's overflow status; returns whether the step may be applied."""
        if finite:
            self.clean_steps += 1
            if self.enabled and self.clean_steps % self.growth_interval == 0:
                self.scale *= 2.0
            return True
        self.skipped_steps += 1
        self.clean_steps = 0
        if self.enabled:
            self.scale = max(self.scale / 2.0, 1.0)
        return False

    def state(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps}

    def load_state(self, state: dict):
        self.scale, self.clean_steps, self.skipped_steps = state["scale"], state["clean_steps"], state["skipped_steps"]
