"""Benchmark: MindSpore's CPU Conv2D against the same convolution written as unfold (im2col) + MatMul.

    python benchmarks/bench_conv.py

SDXL UNet shapes (3x3, stride 1, padding 1, batch 2 = instance + class) at the latent sizes of a 512x512
image; forward, and forward + backward to the input (what a LoRA step needs: the conv weights are frozen).
GRAPH mode, each op in its own Cell, median of 3 runs after a warm-up. Prints `RESULT {json}` per shape
and checks that both give the same numbers."""
import json
import statistics
import time

import mindspore as ms
import numpy as np
from mindspore import nn, ops

SHAPES = [(320, 64), (640, 32), (1280, 16)]  # (channels, latent side) of SDXL's three levels at 512x512


class Conv2D(nn.Cell):
    def __init__(self, channels):
        super().__init__()
        self.conv = ops.Conv2D(out_channel=channels, kernel_size=3, pad_mode="pad", pad=1)

    def construct(self, x, weight):
        return self.conv(x, weight)


class Im2colConv2D(nn.Cell):
    def construct(self, x, weight):
        batch, _, height, width = x.shape
        columns = ops.unfold(x, kernel_size=3, padding=1)  # (batch, in * 9, height * width)
        out = ops.matmul(weight.reshape(weight.shape[0], -1), columns)
        return out.reshape(batch, weight.shape[0], height, width)


class SumOf(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, x, weight):
        return self.net(x, weight).sum()


class InputGrad(nn.Cell):
    """d sum(net(x, weight)) / dx (GRAPH mode does not parse a lambda here)."""

    def __init__(self, net):
        super().__init__()
        self.grad = ops.GradOperation()(SumOf(net))

    def construct(self, x, weight):
        return self.grad(x, weight)


def median_seconds(fn, repeats=3):
    fn().asnumpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn().asnumpy()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    rng = np.random.default_rng(0)
    for channels, side in SHAPES:
        x = ms.Tensor(rng.standard_normal((2, channels, side, side)).astype(np.float32))
        weight = ms.Tensor((rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32))
        result = {"channels": channels, "side": side, "gflop_forward": 2 * 2 * channels * channels * 9 * side * side / 1e9}
        outputs = {}
        for name, net in (("conv2d", Conv2D(channels)), ("im2col_matmul", Im2colConv2D())):
            result[f"{name}_forward_s"] = median_seconds(lambda: net(x, weight))
            grad = InputGrad(net)
            result[f"{name}_forward_backward_s"] = median_seconds(lambda: grad(x, weight))
            outputs[name] = (net(x, weight).asnumpy(), grad(x, weight).asnumpy())
        for i, what in enumerate(("output", "input_grad")):
            a, b = outputs["conv2d"][i], outputs["im2col_matmul"][i]
            result[f"{what}_relative_difference"] = float(np.abs(a - b).max() / np.abs(a).max())
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
