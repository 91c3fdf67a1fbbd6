"""MindBooth's CPU backend: applied to a built model (gm.backends.apply_backend), it gives each layer that has one its
CPU form, a subclass of the layer's class that computes the same thing on the fused kernels of `kernels/` or with
MindSpore ops written around MindSpore's CPU buffers. The layers stay the same objects, so parameters, names and
checkpoints do not change. docs/performance.md tells what each form is for and what it gave."""
from mindspore import nn

from gm.backends.cpu import kernels
from gm.util import become


def available() -> bool:
    """Whether the backend's kernel library builds here."""
    return kernels.available()


def _cpu_forms():
    """{a plain layer class: its CPU form}, where a form applies to every layer of that exact class."""
    from gm.backends.cpu import attention, conv, layers, lean_ops, lora, norms
    from gm.modules import attention as plain_attention, frozen_weights, lora as plain_lora
    from gm.modules.diffusionmodules import openaimodel

    return {
        nn.GroupNorm: norms.KernelGroupNorm,
        nn.LayerNorm: norms.KernelLayerNorm,
        nn.SiLU: layers.KernelSiLU,
        nn.Conv2d: conv.Conv2d,
        frozen_weights.FrozenConv2d: conv.KernelFrozenConv2d,
        frozen_weights.FrozenDense: layers.KernelFrozenDense,
        plain_attention.VanillaAttention: attention.FusedAttention if kernels.has_onednn() else attention.LeanAttention,
        plain_attention.GatedGELU: attention.KernelGatedGELU,
        plain_attention.SwapAxes12: attention.KernelSwapAxes12,
        openaimodel.NearestUpsample2x: layers.KernelUpsample2x,
        openaimodel.ResBlock: layers.LeanResBlock,
        plain_lora.LoRABranch: lora.KernelLoRABranch,
        plain_lora.LoRADense: lora.KernelLoRADense,
        nn.GELU: lean_ops.LeanGELU,
    }


def _applies(cell, form) -> bool:
    from gm.backends.cpu import lean_ops, norms

    if form is norms.KernelLayerNorm:
        return norms.normalizes_last_axis(cell)
    if form is lean_ops.LeanGELU:
        return cell.approximate == "none"  # the exact GELU; MindSpore's tanh approximation stays as it is
    return True


def apply(model: nn.Cell) -> int:
    """Give every layer of `model` that has one its CPU form. Call after LoRA injection, freezing and
    gm.modules.frozen_weights, before compiling. Returns the number of layers changed."""
    forms = _cpu_forms()
    changed = 0
    for _, cell in list(model.cells_and_names()):
        form = forms.get(type(cell))
        if form is not None and _applies(cell, form):
            become(cell, form)
            cell.init_kernels()
            changed += 1
    return changed
