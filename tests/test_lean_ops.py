"""The CPU backend's lean ops (gm/backends/cpu/lean_ops.py) and the attention built on them equal torch autograd:
outputs and every input gradient, in PyNative and GRAPH mode (their backward passes are written by hand); the CPU
backend's compiled training graph holds no buffer-holding kernel and recomputes where it should."""
import collections
import json
import os
import re
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import nn

from conftest import ROOT, TINY_CONFIG
from gradients import Gradients
from gm.backends.cpu.attention import ScaledDotProductAttention
from gm.backends.cpu.lean_ops import LeanGELU, add_broadcast, softmax_backward, swap_axes
from test_unet import relative_error

MODES = pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])


class WeightedSum(nn.Cell):
    """sum(net(*inputs) * weights): a loss whose gradient reaches every output element differently."""

    def __init__(self, net, weights):
        super().__init__()
        self.net, self.weights = net, weights

    def construct(self, *inputs):
        return (self.net(*inputs) * self.weights).sum()


def _ours(net, inputs, weights, mode):
    tensors = [ms.Tensor(a) for a in inputs]
    ms.set_context(mode=mode)
    try:
        out = net(*tensors).asnumpy()
        grads = Gradients(WeightedSum(net, ms.Tensor(weights)))(*tensors)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    return out, [g.asnumpy() for g in grads]


def _torch(fn, inputs, weights):
    tensors = [torch.from_numpy(a).requires_grad_(True) for a in inputs]
    out = fn(*tensors)
    (out * torch.from_numpy(weights)).sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in tensors]


def _assert_close(got, want, tolerance):
    (out, grads), (want_out, want_grads) = got, want
    assert out.shape == want_out.shape and relative_error(out, want_out) < tolerance
    for index, (a, b) in enumerate(zip(grads, want_grads)):
        assert a.shape == b.shape and relative_error(a, b) < tolerance, f"gradient of input {index}"


@MODES
def test_gelu_equals_torch_exact_gelu(mode):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 5, 64)) * 3).astype(np.float32)  # reaches both tails
    weights = rng.standard_normal(x.shape).astype(np.float32)
    want = _torch(lambda t: torch.nn.functional.gelu(t, approximate="none"), [x], weights)
    _assert_close(_ours(LeanGELU(), [x], weights, mode), want, 1e-6)


@MODES
@pytest.mark.parametrize("tokens", [(16, 16), (16, 7)], ids=["self", "cross"])
def test_attention_equals_torch_and_its_backward_recomputes_correctly(tokens, mode):
    rng = np.random.default_rng(1)
    batch, heads, dim_head = 2, 3, 8
    queries, keys = tokens
    q = rng.standard_normal((batch, heads, queries, dim_head)).astype(np.float32)
    k = rng.standard_normal((batch, heads, keys, dim_head)).astype(np.float32)
    v = rng.standard_normal((batch, heads, keys, dim_head)).astype(np.float32)
    weights = rng.standard_normal((batch, heads, queries, dim_head)).astype(np.float32)
    scale = dim_head**-0.5

    def reference(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v

    want = _torch(reference, [q, k, v], weights)
    _assert_close(_ours(ScaledDotProductAttention(scale), [q, k, v], weights, mode), want, 1e-5)


def test_softmax_backward_is_the_softmax_jacobian_product():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 6, 9)).astype(np.float32)
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    x_torch = torch.from_numpy(x).requires_grad_(True)
    probabilities = torch.softmax(x_torch, dim=-1)
    probabilities.backward(torch.from_numpy(grad_out))
    got = softmax_backward(ms.Tensor(probabilities.detach().numpy()), ms.Tensor(grad_out)).asnumpy()
    assert relative_error(got, x_torch.grad.numpy()) < 1e-6


def test_add_broadcast_and_swap_axes_are_the_plain_ops():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
    y = rng.standard_normal((2, 5, 1, 1)).astype(np.float32)
    np.testing.assert_array_equal(add_broadcast(ms.Tensor(x), ms.Tensor(y)).asnumpy(), x + y)
    np.testing.assert_array_equal(swap_axes(ms.Tensor(x), 1, 2).asnumpy(), x.swapaxes(1, 2))


_COMPILE_TINY_UNET_GRADIENT = """
import json
import sys
import mindspore as ms
import numpy as np
from gm.backends import apply_backend
from gm.modules.lora import inject_lora, lora_parameters
from gm.util import instantiate_from_config
from mindbooth.config import load_config
ms.set_device("CPU")
ms.set_context(mode=ms.GRAPH_MODE)
config = load_config(sys.argv[1]).model.params.network_config
unet = instantiate_from_config(config)
for param in unet.get_parameters():
    param.requires_grad = False
lora_layers = inject_lora(unet) if "lora" in sys.argv[2:] else 0  # trained: its weights are differentiated too
apply_backend(unet, "cpu")
checkpointed_blocks = (unet.enable_gradient_checkpointing(res_blocks="res_blocks" in sys.argv[2:])
                       if "checkpointing" in sys.argv[2:] else 0)
p = config.params
inputs = [np.ones((2, 4, 8, 8), np.float32), np.array([3.0, 917.0], np.float32),
          np.ones((2, 77, p.context_dim), np.float32), np.ones((2, p.adm_in_channels), np.float32)]
class Loss(ms.nn.Cell):
    def __init__(self):
        super().__init__()
        self.unet = unet
    def construct(self, x, t, context, y):
        return (self.unet(x, t, context, y) ** 2).sum()
if lora_layers:
    grads = ms.ops.GradOperation(get_all=True, get_by_list=True)(Loss(), ms.ParameterTuple(lora_parameters(unet).values()))
else:
    grads = ms.ops.GradOperation(get_all=True)(Loss())
input_grads = grads(*(ms.Tensor(a) for a in inputs))
(input_grads[0][0] if lora_layers else input_grads[0]).asnumpy()
cells = [(name, type(cell).__name__) for name, cell in unet.cells_and_names()]
counts = {kind: sum(k == kind for _, k in cells) for kind in ("LeanAttention", "FusedAttention", "KernelGatedGELU")}
# SiLUs on feature maps; those on the time/label embedding all see the same input and are rightly merged
counts["SiLU"] = sum(k == "KernelSiLU" and "emb" not in name for name, k in cells)
counts["checkpointed_blocks"] = checkpointed_blocks
counts["lora_layers"] = lora_layers
counts["BasicTransformerBlock"] = sum(k == "BasicTransformerBlock" for _, k in cells)
counts["ResBlock"] = sum(k == "LeanResBlock" for _, k in cells)
print(json.dumps(counts))
"""


def _kernel_graph_nodes(path):
    """(op, input shapes, output shape, scope) of every CNode in a dumped kernel-graph IR file."""
    node = re.compile(r"^\s+%\d+\([^)]*\) = (?:PrimFunc_)?(\w+)\(")
    shape = re.compile(r"<Tensor\[\w+\], \(([\d, ]*)\)")
    lines = path.read_text().splitlines()
    for index, line in enumerate(lines[:-1]):
        match = node.match(line)
        if not match or "->" not in lines[index + 1]:
            continue
        inputs, output = lines[index + 1].split("->", 1)
        shapes = [tuple(int(d) for d in s.split(",") if d.strip()) for s in shape.findall(inputs)]
        outputs = [tuple(int(d) for d in s.split(",") if d.strip()) for s in shape.findall(output)]
        scope = next((l for l in lines[index + 2:index + 8] if "Fullname with scope" in l), "")
        yield match.group(1), shapes, outputs[0] if outputs else None, scope


KernelNode = collections.namedtuple("KernelNode", "id op inputs outputs after_gradient kernel item")
# ops whose output is (part of) their input's memory: a reader of theirs reads that input
PASSING = {"Reshape", "ExpandDims", "Squeeze", "Depend", "TupleGetItem", "MakeTuple", "Load"}


def _kernel_graph_dependencies(path):
    """A KernelNode for every node of a dumped kernel-graph IR file, in its order (nodes are listed after their
    inputs): its id, op, input ids, output shapes (one per tensor of a tuple), whether it is after a gradient, the
    custom kernel's name (or None) and TupleGetItem's index (or None). A node is after a gradient when it is in the
    "Gradients/" scope or depends on such a node, directly or through other nodes (Depend included)."""
    node = re.compile(r"^\s+%(\d+)\([^)]*\) = (?:PrimFunc_)?(\w+)\((.*)$")
    lines = path.read_text().splitlines()
    after_gradient = set()
    for index, line in enumerate(lines[:-1]):
        match = node.match(line)
        if not match:
            continue
        node_id = int(match.group(1))
        scope = next((l for l in lines[index + 2:index + 8] if "Fullname with scope" in l), "")
        args = re.split(r" primitive_attrs:| cnode_attrs:| \{instance name", match.group(3))[0]
        inputs = [int(r) for r in re.findall(r"%(\d+)\b", args)]
        if "scope: (Gradients/" in scope or any(i in after_gradient for i in inputs):
            after_gradient.add(node_id)
        output = lines[index + 1].split("->", 1)[1] if "->" in lines[index + 1] else ""
        tensor = re.match(r" \(<Tensor\[\w+\], \(([\d, ]*)\)", output)
        shapes = [tensor.group(1)] if tensor else re.findall(r"\(([\d, ]*)\)", output.split("TupleShape", 1)[-1])
        if not tensor and "TupleShape" not in output:
            shapes = []
        kernel = re.search(r'func_name: "[^"]*:(\w+)"', line)
        item = re.search(r"I64\((\d+)\)", args) if match.group(2) == "TupleGetItem" else None
        yield KernelNode(node_id, match.group(2), inputs, [tuple(int(d) for d in s.split(",") if d.strip()) for s in shapes],
                         node_id in after_gradient, kernel.group(1) if kernel else None, int(item.group(1)) if item else None)


def _kernels_after_the_gradient(path):
    """Counter of (op, output rank) of the single-output nodes in a dumped kernel-graph IR file that run after some
    gradient exists (_kernel_graph_dependencies)."""
    return collections.Counter((node.op, len(node.outputs[0])) for node in _kernel_graph_dependencies(path)
                               if node.after_gradient and len(node.outputs) == 1)


def _readers(nodes):
    """{id: [ids of the nodes that read its output]}; UpdateState and the ordering input of Depend do not read."""
    readers = collections.defaultdict(list)
    for node in nodes:
        if node.op != "UpdateState":
            for i in node.inputs[:1] if node.op == "Depend" else node.inputs:
                readers[i].append(node.id)
    return readers


def _compile_tiny_unet_gradient(folder, *script_args):
    """Compiles the tiny UNet's GRAPH-mode gradient in the CPU backend in a subprocess that dumps its kernel graphs
    into `folder`. Returns (kernel-graph IR files, their nodes, the script's cell counts)."""
    folder.mkdir(exist_ok=True)
    env = dict(os.environ, MS_DEV_SAVE_GRAPHS="1", MS_DEV_DUMP_IR_PASSES="graph_build",
               MS_DEV_SAVE_GRAPHS_PATH=str(folder / "ir"), PYTHONPATH=str(ROOT))
    script = folder / "compile_tiny_unet_gradient.py"  # a file: GRAPH mode reads the Cell's source
    script.write_text(_COMPILE_TINY_UNET_GRADIENT)
    run = subprocess.run([sys.executable, str(script), str(TINY_CONFIG), *script_args], env=env, cwd=folder,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    graphs = sorted((folder / "ir").glob("graph_build_*.ir"))
    assert graphs, "MindSpore wrote no kernel graph"
    nodes = [node for path in graphs for node in _kernel_graph_nodes(path)]  # the UNet, its backward, the loss
    return graphs, nodes, json.loads(run.stdout.strip().splitlines()[-1])


def test_unet_training_graph_has_no_buffer_holding_kernels(tmp_path):
    """The GRAPH-mode gradient of the tiny UNet in the CPU backend, as MindSpore compiles it, has none of the kernels
    that hold a buffer per op on CPU (lean_ops): no Transpose, no GeLU, no Add/Sub/Div/RealDiv with a broadcast
    tensor; attention, GEGLU's gating, SiLU, upsampling and every norm, both ways, are the backend's kernels."""
    graphs, nodes, cells = _compile_tiny_unet_gradient(tmp_path)
    ops_seen = {op for op, _, _, _ in nodes}
    assert {"MatMul", "Custom"} <= ops_seen  # the UNet and its backward
    holding = [(op, shapes, out) for op, shapes, out, _ in nodes
               if op in ("Transpose", "GeLU", "GeLUGrad")
               or (op in ("Add", "Sub", "Div", "RealDiv") and out and any(s and s != out for s in shapes))]
    assert not holding, holding[:5]
    fused_away = {"Erf", "GroupNorm", "GroupNormGrad", "LayerNorm", "LayerNormGrad", "LayerNormGradGrad", "Softmax",
                  "Sigmoid", "ResizeNearestNeighborV2", "ResizeNearestNeighborV2Grad"}
    assert cells["FusedAttention"] and not cells["LeanAttention"] and cells["KernelGatedGELU"], cells
    assert not ops_seen & fused_away, ops_seen & fused_away


def _forward_tensors_read_by_the_backward(path):
    """Counter of op of the forward nodes (before any gradient exists) in a dumped kernel-graph IR file whose output
    a backward node reads (directly or through Reshape/Depend/TupleGetItem/...): what the forward keeps alive for
    the backward."""
    nodes = list(_kernel_graph_dependencies(path))
    by_id, readers = {node.id: node for node in nodes}, _readers(nodes)

    def read_by_the_backward(node_id, seen):
        for reader in readers[node_id]:
            if by_id[reader].after_gradient:
                return True
            if by_id[reader].op in PASSING and reader not in seen:
                seen.add(reader)
                if read_by_the_backward(reader, seen):
                    return True
        return False

    return collections.Counter(node.kernel or node.op for node in nodes if not node.after_gradient
                               and node.op not in PASSING and read_by_the_backward(node.id, set()))


def test_gradient_checkpointing_keeps_no_tensor_inside_a_block_for_the_backward(tmp_path):
    """UNetModel.enable_gradient_checkpointing (Cell.recompute on every BasicTransformerBlock, and with `res_blocks`
    every ResBlock), in the compiled gradient with the fused CPU kernels: the backward reruns each block's forward
    instead of reading its tensors. Without it the forward keeps, per transformer block, q, k and v of both
    attentions (for the attention's backward), the GEGLU projection and the residual sums (for LayerNorm's
    backward), and per ResBlock both GroupNorm outputs (for SiLU's backward) and the sum with the time embedding
    (for GroupNorm's). The kernels' backward passes are their primitives' own: with a Cell bprop, a block's
    recomputation reads the first forward's tensors (the norms, attention, GEGLU) or runs during the forward (the
    convolution, in a ResBlock)."""
    plain_graphs, _, plain = _compile_tiny_unet_gradient(tmp_path / "plain")
    transformer_graphs, _, transformer = _compile_tiny_unet_gradient(tmp_path / "transformer", "checkpointing")
    graphs, _, cells = _compile_tiny_unet_gradient(tmp_path / "checkpointed", "checkpointing", "res_blocks")
    blocks, res_blocks = cells["BasicTransformerBlock"], cells["ResBlock"]
    assert plain["checkpointed_blocks"] == 0 and transformer["checkpointed_blocks"] == blocks > 0
    assert cells["checkpointed_blocks"] == blocks + res_blocks
    held_plain = sum((_forward_tensors_read_by_the_backward(path) for path in plain_graphs), collections.Counter())
    held_transformer = sum((_forward_tensors_read_by_the_backward(path) for path in transformer_graphs),
                           collections.Counter())
    held = sum((_forward_tensors_read_by_the_backward(path) for path in graphs), collections.Counter())
    assert held_plain["MatMul"] == 6 * blocks and held_transformer["MatMul"] == held["MatMul"] == 0, (held_plain, held)
    # the only GroupNorm output left is the UNet's last norm's, outside any block; the ResBlocks' stay without them
    assert held_plain["GroupNormForward"] == held_transformer["GroupNormForward"] == 2 * res_blocks + 1, held_transformer
    assert held["GroupNormForward"] == 1, (held_plain, held)
    # q, k, v twice, the GEGLU projection and two of the three residual sums per transformer block, two GroupNorm
    # outputs and a sum per ResBlock: what remains is outside the blocks (skips, the time embedding) and their inputs
    assert sum(held_plain.values()) - sum(held.values()) >= 9 * blocks + 3 * res_blocks, (held_plain, held)
    # the recomputations wait for the backward: each block's norms run once in the forward and once after it
    for kernel in ("LayerNormForward", "GroupNormForward"):
        before, after = (sum(node.kernel == kernel and node.after_gradient == side for path in graphs
                             for node in _kernel_graph_dependencies(path)) for side in (False, True))
        assert after == (3 * blocks if kernel == "LayerNormForward" else 2 * res_blocks), (kernel, before, after)


def test_lora_weight_gradients_run_with_their_layers_backward(tmp_path):
    """The tiny UNet with LoRA on every attention projection, its LoRA weights differentiated: each gradient that an
    attention backward writes for the image's tokens (dq, and a self-attention's dk and dv) is read for the last time
    before the next attention backward runs. Its readers are the projections' input and LoRA gradients, the latter
    one kernel writing dx, dA and dB (gm/backends/cpu/kernels/lora.cc). As MatMuls, MindSpore ran the LoRA weight
    gradients at the end of the backward pass and kept every dq, dk and dv alive until then (the peak of the 1024
    train step). A cross-attention's dk and dv (the text's 77 tokens, not on the image's gradient path) may wait."""
    graphs, _, cells = _compile_tiny_unet_gradient(tmp_path, "lora")
    attention_backwards = lora_backwards = checked = expected = 0
    for path in graphs:
        nodes = list(_kernel_graph_dependencies(path))
        by_id, readers = {node.id: node for node in nodes}, _readers(nodes)
        position = {node.id: index for index, node in enumerate(nodes)}

        def last_read(node_id):  # the position of the last node reading node_id's output, through PASSING ops
            return max([position[node_id]] + [last_read(r) if by_id[r].op in PASSING else position[r]
                                               for r in readers[node_id]])

        backwards = [node for node in nodes if node.kernel == "AttentionBackward"]
        attention_backwards += len(backwards)
        lora_backwards += sum(node.kernel == "LoRABackward" for node in nodes)
        expected += sum(3 if len(set(backward.outputs)) == 1 else 1 for backward in backwards[:-1])
        for backward, next_backward in zip(backwards, backwards[1:]):
            for item in (r for r in readers[backward.id] if by_id[r].op == "TupleGetItem"):
                if backward.outputs[by_id[item].item] == backward.outputs[0]:  # the image's tokens
                    assert last_read(item) < position[next_backward.id], (path.name, backward.id, by_id[item].item)
                    checked += 1
    assert attention_backwards == cells["FusedAttention"] > 1
    assert lora_backwards == cells["lora_layers"] == 4 * cells["FusedAttention"]
    assert checked == expected > 0  # dq of every attention, dk and dv of every self-attention (but the last)
