"""A tiny model (any family: SDXL, SSD-1B, SD 1.5, SD 2.1, DeepFloyd IF) with random weights for the quick-start and tests: every parameter drawn (none left at
zero, so gradients reach every LoRA layer), reproducible from a seed."""
import numpy as np
from omegaconf import DictConfig


def random_weights(engine, seed: int = 0) -> dict:
    """{name: float32 array} for every parameter of `engine`: norms at identity, biases zero,
    embeddings N(0, 0.02), matrices and kernels N(0, 1/fan_in)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, param in engine.parameters_and_names():
        shape = tuple(param.shape)
        if name.endswith(".gamma"):
            value = np.ones(shape)
        elif name.endswith((".beta", ".bias", "in_proj_bias")):
            value = np.zeros(shape)
        elif name.endswith("logit_scale"):
            value = np.full(shape, np.log(1 / 0.07))
        elif name.endswith(("embedding_table", "positional_embedding")):
            value = rng.normal(0.0, 0.02, shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            value = rng.normal(0.0, fan_in**-0.5, shape)
        weights[name] = value.astype(np.float32)
    return weights


TINY_T5_WORDS = ("a photo of sks dog cat toy in the bucket on beach with red blue green sunglasses wearing sitting "
                 "floating water mountain snow city night painting style Van Gogh backpack teapot vase").split()


def tiny_t5_tokenizer(vocab_size: int = 60) -> bytes:
    """A small Unigram SentencePiece model (bytes of a `spiece.model`) with T5's special ids (pad 0, </s> 1,
    <unk> 2, no <s>), trained on DreamBooth-like prompts: the tokenizer of a tiny DeepFloyd IF."""
    import io

    import sentencepiece

    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(TINY_T5_WORDS, size=8)) for _ in range(2000)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size,
                                             model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                             minloglevel=2)
    return model.getvalue()


def t5_tokenizer_files(config) -> list:
    """The `tokenizer_file` of each T5 embedder in an engine config (DeepFloyd IF stage I)."""
    conditioner = config.model.params.get("conditioner_config")
    models = conditioner.params.emb_models if isinstance(conditioner, DictConfig) and "params" in conditioner else []
    return [m.params.tokenizer_file for m in models if str(m.target).endswith("FrozenT5Embedder")]
