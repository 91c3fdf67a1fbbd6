"""Benchmark: DeepFloyd IF's text encoder (T5 v1.1 XXL encoder, 4.76B parameters, random weights, fp32, CPU) encoding
one prompt of 77 tokens with its attention mask, as IF's pipelines and `--pre_compute_text_embeddings` call it.

    python benchmarks/bench_t5_encode.py --framework mindspore --rss_limit_gib 22.5
    python benchmarks/bench_t5_encode.py --framework torch --rss_limit_gib 22.5       # jemalloc (--allocator)

MindBooth: gm/modules/embedders/t5.py's T5EncoderModel (in a Cell, GRAPH mode unless --mode pynative). Reference:
transformers' T5EncoderModel with google/t5-v1_1-xxl's config (typed in), torch.no_grad. Tokenizing is left out of
both (the same SentencePiece library does it). The first call (MindSpore: the compile) is apart; prints one
`RESULT {json}` line; `--resolution` is unused."""
import time

import numpy as np

import common

T5_XXL = dict(vocab_size=32128, width=4096, ff_width=10240, layers=24, heads=64, head_dim=64)
TOKENS = 77


def token_inputs(seed: int = 0):
    """One prompt's ids (12 tokens, then padding) and its attention mask, (1, 77) int64 each."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((1, TOKENS), np.int64)
    ids[0, :12] = rng.integers(3, T5_XXL["vocab_size"], 12)
    ids[0, 11] = 1  # </s>
    return ids, (ids != 0).astype(np.int64)


def run_mindspore(args):
    import mindspore as ms
    from mindspore import nn

    from gm.modules.embedders.t5 import T5EncoderModel

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    ms.set_seed(0)

    class Encode(nn.Cell):  # one compiled graph for every call
        def __init__(self, encoder):
            super().__init__(auto_prefix=False)
            self.encoder = encoder

        def construct(self, ids, mask):
            return self.encoder(ids, mask)

    start = time.perf_counter()
    cell = Encode(T5EncoderModel(**T5_XXL))
    cell.set_train(False)
    build_s = time.perf_counter() - start
    common.progress(stage="built", build_s=round(build_s, 1))
    ids, mask = (ms.Tensor(a) for a in token_inputs())
    rss_model = common.rss_gib()
    times, cpu = [], []
    for i in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        cell(ids, mask).asnumpy()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        common.progress(stage=f"encode {i}", seconds=round(times[-1], 2), peak=round(common.peak_rss_gib(), 2))
    return dict(build_s=build_s, times=times, cpu_times=cpu, rss_after_build_gib=rss_model)


def run_torch(args):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=T5_XXL["vocab_size"], d_model=T5_XXL["width"], d_ff=T5_XXL["ff_width"],
                      num_layers=T5_XXL["layers"], num_heads=T5_XXL["heads"], d_kv=T5_XXL["head_dim"],
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False)
    start = time.perf_counter()
    encoder = T5EncoderModel(config).eval()
    build_s = time.perf_counter() - start
    common.progress(stage="built", build_s=round(build_s, 1))
    ids, mask = (torch.from_numpy(a) for a in token_inputs())
    rss_model = common.rss_gib()
    times, cpu = [], []
    with torch.no_grad():
        for i in range(args.steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            encoder(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
            common.progress(stage=f"encode {i}", seconds=round(times[-1], 2), peak=round(common.peak_rss_gib(), 2))
    return dict(build_s=build_s, times=times, cpu_times=cpu, rss_after_build_gib=rss_model)


def main():
    p = common.benchmark_parser(__doc__.split("\n\n")[0])
    p.set_defaults(model="if-i-xl", steps=4)
    common.run_benchmark(p.parse_args(), __file__, "t5_xxl_encode_one_prompt", run_mindspore, run_torch)


if __name__ == "__main__":
    main()
