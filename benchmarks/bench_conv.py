"""Benchmark: MindBooth's CPU convolution (gm.backends.cpu.conv.Conv2d with a frozen weight: the kernel of
gm/backends/cpu/kernels where it is built, with its default algorithm (Winograd F(4x4, 3x3) where it pays) and
with oneDNN's direct convolution, and im2col + MatMul) against MindSpore's own Conv2D kernel and against torch's
conv2d.

    python benchmarks/bench_conv.py                       # all five
    python benchmarks/bench_conv.py --impls mindbooth torch --repeats 5

SDXL UNet shapes (3x3, stride 1, padding 1, batch 2 = instance + class) at the latent sizes of a 512x512
image; forward, and forward + backward to the input (what a LoRA step needs: the conv weights are frozen, as
`freeze_convolutions` marks them in training). MindSpore in GRAPH mode, each conv in its own Cell; median of
`--repeats` runs after a warm-up. Prints `RESULT {json}` per shape, with each output's and input gradient's
largest difference from torch's, relative to torch's largest value."""
import argparse
import json
import sys

import numpy as np

from common import median_seconds  # importing common also puts the repository root on sys.path
from mindbooth.allocator import preload_mimalloc
from mindbooth.config import add_allocator_flag

SHAPES = [(320, 64), (640, 32), (1280, 16)]  # (channels, latent side) of SDXL's three levels at 512x512
IMPLS = ("mindbooth", "mindbooth_direct", "mindbooth_im2col", "mindspore_conv2d", "torch")


def mindspore_conv(impl, x_np, weight_np):
    """(forward, forward + input gradient) as functions returning numpy arrays."""
    import mindspore as ms
    from mindspore import nn

    from gm.backends.cpu.conv import Conv2d
    from gm.util import become

    channels = weight_np.shape[0]
    conv = nn.Conv2d(channels, channels, 3, pad_mode="pad", padding=1, has_bias=False)
    conv.weight.set_data(ms.Tensor(weight_np))
    conv.weight.requires_grad = False
    if impl != "mindspore_conv2d":  # the CPU backend's form of a frozen conv: input gradient only
        become(conv, Conv2d).init_kernels()
        conv.freeze_weight(fused=False if impl == "mindbooth_im2col" else None,
                           algorithm="direct" if impl == "mindbooth_direct" else "auto")

    class SumOf(nn.Cell):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def construct(self, x):
            return self.conv(x).sum()

    class ValueAndInputGrad(nn.Cell):  # the value too, so that the forward runs (GRAPH mode prunes unused ops)
        def __init__(self):
            super().__init__()
            self.value_and_grad = ms.value_and_grad(SumOf(), grad_position=0)

        def construct(self, x):
            return self.value_and_grad(x)

    x = ms.Tensor(x_np)
    value_and_grad = ValueAndInputGrad()
    return (lambda: conv(x).asnumpy()), (lambda: value_and_grad(x)[1].asnumpy())


def torch_conv(x_np, weight_np):
    import torch

    weight = torch.from_numpy(weight_np)

    def forward():
        with torch.no_grad():
            return torch.nn.functional.conv2d(torch.from_numpy(x_np), weight, padding=1).numpy()

    def forward_backward():
        x = torch.from_numpy(x_np).requires_grad_(True)
        torch.nn.functional.conv2d(x, weight, padding=1).sum().backward()
        return x.grad.numpy()

    return forward, forward_backward


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--repeats", type=int, default=3)
    add_allocator_flag(p.add_argument)
    args = p.parse_args()
    if any(impl != "torch" for impl in args.impls):
        import mindspore as ms

        ms.set_context(mode=ms.GRAPH_MODE)
        ms.set_device("CPU")
    rng = np.random.default_rng(0)
    for channels, side in SHAPES:
        x = rng.standard_normal((2, channels, side, side)).astype(np.float32)
        weight = (rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
        result = {"channels": channels, "side": side, "batch": 2,
                  "gflop_forward": 2 * 2 * channels * channels * 9 * side * side / 1e9}
        outputs = {}
        for impl in args.impls:
            forward, forward_backward = torch_conv(x, weight) if impl == "torch" else mindspore_conv(impl, x, weight)
            result[f"{impl}_forward_s"] = round(median_seconds(forward, args.repeats), 4)
            result[f"{impl}_forward_backward_s"] = round(median_seconds(forward_backward, args.repeats), 4)
            outputs[impl] = (forward(), forward_backward())
        if "torch" in outputs:
            for impl in outputs:
                for i, what in enumerate(("output", "input_grad")):
                    ours, ref = outputs[impl][i], outputs["torch"][i]
                    result[f"{impl}_{what}_relative_difference"] = float(np.abs(ours - ref).max() / np.abs(ref).max())
            for impl in outputs:
                if impl != "torch":
                    for what in ("forward", "forward_backward"):
                        result[f"{impl}_{what}_vs_torch"] = round(result[f"{impl}_{what}_s"] / result[f"torch_{what}_s"], 2)
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    # with the allocator MindBooth runs on the CPU (mimalloc): the Winograd kernel's large temporary buffers, freed
    # and allocated again by every call, page-fault on glibc's malloc
    preload_mimalloc([*sys.argv[1:], "--device_target", "CPU"])
    main()
