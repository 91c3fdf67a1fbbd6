"""Which tensors are alive at the peak of the compiled train step (MindSpore GRAPH mode, CPU): a diagnostic.

    python benchmarks/bench_graph_liveness.py --transformer_depth 1 2 2 --resolution 512

Compiles (does not run) the gradient step of bench_train_step.py with MindSpore's IR dump on, in a child process,
then replays the kernel graph in its listed order (which respects every dependency): a node's outputs are allocated
when it runs and freed after their last reader, each output of a multi-output kernel on its own. Reshape, ExpandDims and the like share their input's memory; the
ordering inputs of Depend and UpdateState do not read. Prints the peak of live bytes and what is alive then, by the
producing op and by forward/backward (a node in the "Gradients/" scope or depending on one). This models the memory
pool's share of a step; MS_DEV_RUNTIME_CONF=memory_statistics:True on a real run (bench_train_step.py) gives the
pool's measured peak. Section 14 of RESULTS.md found with it that recomputations in hand-written backward passes
ran during the forward."""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_train_step import mindspore_grad_step  # imports common, which puts the repository on sys.path

NODE = re.compile(r"^\s+%(\d+)\([^)]*\) = (?:PrimFunc_)?(\w+)\((.*)$")
TENSOR = re.compile(r"<Tensor\[(\w+)\], \(([\d, ]*)\)")
TUPLE = re.compile(r"Tuple\[Tensor\[(\w+)\]\*\d+\], TupleShape\((.*?)\)>")
ITEM_BYTES = {"Float32": 4, "Float16": 2, "BFloat16": 2, "Float64": 8, "Int64": 8, "Int32": 4, "Int8": 1,
              "UInt8": 1, "Bool": 1}
SAME_MEMORY = {"Reshape", "ExpandDims", "Squeeze", "Flatten", "Depend", "Load", "TupleGetItem", "MakeTuple"}
ORDERING_ONLY = {"UpdateState"}  # and Depend's second input


def output_sizes(signature: str) -> list:
    """Bytes of each of a node's outputs, from the `(inputs) -> (outputs)` line under it."""
    outputs = signature.split("->", 1)[1] if "->" in signature else ""
    shapes = TENSOR.findall(outputs)
    for dtype, shape_list in TUPLE.findall(outputs):
        shapes += [(dtype, shape) for shape in re.findall(r"\(([\d, ]*)\)", shape_list)]
    sizes = []
    for dtype, shape in shapes:
        count = 1
        for dim in shape.split(","):
            count *= int(dim) if dim.strip() else 1
        sizes.append(count * ITEM_BYTES.get(dtype, 4))
    return sizes


def read_kernel_graph(path: Path):
    """[(id, op, input ids, bytes of each output, backward?, TupleGetItem's index or None)] in the IR's order."""
    lines = path.read_text().splitlines()
    nodes, backward = [], set()
    for index, line in enumerate(lines[:-1]):
        match = NODE.match(line)
        if not match:
            continue
        node_id, op = int(match.group(1)), match.group(2)
        args = re.split(r" primitive_attrs:| cnode_attrs:| \{instance name", match.group(3))[0]
        inputs = [int(i) for i in re.findall(r"%(\d+)\b", args)]
        item = re.search(r"I64\((\d+)\)", args) if op == "TupleGetItem" else None
        scope = next((l for l in lines[index + 2:index + 8] if "Fullname with scope" in l), "")
        if "scope: (Gradients/" in scope or any(i in backward for i in inputs):
            backward.add(node_id)
        nodes.append((node_id, op, inputs, output_sizes(lines[index + 1]), node_id in backward,
                      int(item.group(1)) if item else None))
    return nodes


def peak_live_set(nodes):
    """(peak bytes, position of the peak, ids alive then) when each output of a node lives from the node's run to
    the run of its last reader. The outputs of a multi-output kernel are separate allocations (as in MindSpore's
    runtime): TupleGetItem reads only the one it takes. Ids alive are (node id, output index)."""
    storage = {}  # id -> the (id, output index) whose memory it uses
    for node_id, op, inputs, sizes, _, item in nodes:
        if op == "TupleGetItem" and item is not None and item < len(storage.get(inputs[0], [])):
            storage[node_id] = [storage[inputs[0]][item]]
        elif op in SAME_MEMORY:
            readers = inputs if op == "MakeTuple" else inputs[:1]
            storage[node_id] = [s for i in readers for s in storage.get(i, [(i, 0)])]
        else:
            storage[node_id] = [(node_id, k) for k in range(max(1, len(sizes)))]
    last_read = {}
    for position, (node_id, op, inputs, _, _, item) in enumerate(nodes):
        if op in ORDERING_ONLY:
            continue
        if op == "TupleGetItem" and item is not None:  # reads only the output it takes
            read = storage[node_id]
        else:
            read = [s for i in (inputs[:1] if op == "Depend" else inputs) for s in storage.get(i, [(i, 0)])]
        for s in read:
            last_read[s] = position
    frees = collections.defaultdict(list)
    sizes_of = {}
    for position, (node_id, op, _, sizes, _, _) in enumerate(nodes):
        if op not in SAME_MEMORY | ORDERING_ONLY:
            for k, nbytes in enumerate(sizes or [0]):
                sizes_of[node_id, k] = nbytes
                frees[last_read.get((node_id, k), position)].append((node_id, k))
    live, current, peak = set(), 0, (0, 0, set())
    for position, (node_id, _, _, sizes, _, _) in enumerate(nodes):
        for k in range(len(sizes or [0])):
            if (node_id, k) in sizes_of:
                live.add((node_id, k))
                current += sizes_of[node_id, k]
        if current > peak[0]:
            peak = (current, position, set(live))
        for freed in frees[position]:
            live.discard(freed)
            current -= sizes_of[freed]
    return peak


def compile_with_ir_dump(args):
    """The child (its IR folder comes in the environment): compile the gradient step of bench_train_step.py only."""
    grad_step, _, _, inputs, _ = mindspore_grad_step(args)
    grad_step.compile(*inputs[0])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--transformer_depth", type=int, nargs=3, default=[1, 2, 2],
                   help="transformer blocks per UNet level (default: a reduced full-width UNet; SDXL: 1 2 10)")
    p.add_argument("--frozen_dtype", choices=["fp32", "fp16"], default="fp16")
    p.add_argument("--split_prior_batch", type=int, default=0, help="one sample per pass (bench_train_step.py's option)")
    p.add_argument("--gradient_checkpointing", type=int, default=0, help="recompute each UNet block (bench_train_step.py's option)")
    p.add_argument("--gradient_checkpointing_res_blocks", type=int, default=0, help="bench_train_step.py's option")
    p.add_argument("--top", type=int, default=15, help="rows of the table of what is alive at the peak")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.mode, args.context_projections, args.model, args.finetune = "graph", 1, "sdxl", "lora"
    if args.child:
        compile_with_ir_dump(args)
        return
    with tempfile.TemporaryDirectory(prefix="mindbooth-ir-") as ir_folder:
        env = dict(os.environ, MS_DEV_SAVE_GRAPHS="1", MS_DEV_DUMP_IR_PASSES="graph_build",
                   MS_DEV_SAVE_GRAPHS_PATH=ir_folder)
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", ir_folder], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        graphs = sorted(Path(ir_folder).glob("graph_build_*.ir"))
        if not graphs:
            sys.exit("MindSpore wrote no kernel graph")
        nodes = read_kernel_graph(max(graphs, key=lambda g: g.stat().st_size))  # the gradient step's
    peak, position, live = peak_live_set(nodes)
    by_id = {(node_id, k): (op, nbytes, backward) for node_id, op, _, sizes, backward, _ in nodes
             for k, nbytes in enumerate(sizes or [0])}
    print(f"{len(nodes)} nodes; peak of live tensors {peak / 2**30:.2f} GiB at node {position} "
          f"({nodes[position][1]}); alive then, by producing op:")
    table = collections.Counter()
    counts = collections.Counter()
    for node_id in live:
        op, nbytes, backward = by_id[node_id]
        table[op, "backward" if backward else "forward"] += nbytes
        counts[op, "backward" if backward else "forward"] += 1
    print("| producing op | pass | tensors | MiB |\n| --- | --- | --- | --- |")
    for (op, side), nbytes in table.most_common(args.top):
        print(f"| {op} | {side} | {counts[op, side]} | {nbytes / 2**20:.1f} |")


if __name__ == "__main__":
    main()
