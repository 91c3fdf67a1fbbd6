"""T5 v1.1 encoder and tokenizer (DeepFloyd IF's text side) against transformers on the same weights and the same
SentencePiece model: a tiny random encoder within 1e-4 relative, the relative-position buckets exactly, the full-size
XXL encoder's names and shapes, and token ids/masks equal to transformers' T5Tokenizer."""
import io

import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from mindspore.nn.utils import no_init_parameters

from gm.modules.embedders.t5 import T5EncoderModel, relative_position_buckets
from gm.modules.embedders.t5_tokenizer import T5Tokenizer
from mindbooth.tiny_model import tiny_t5_tokenizer

TINY = dict(vocab_size=120, d_model=32, d_ff=48, num_layers=3, num_heads=4, d_kv=8, relative_attention_num_buckets=32,
            relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
           relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu")


def mindbooth_t5(config: dict, **kwargs) -> T5EncoderModel:
    return T5EncoderModel(vocab_size=config["vocab_size"], width=config["d_model"], ff_width=config["d_ff"],
                          layers=config["num_layers"], heads=config["num_heads"], head_dim=config["d_kv"],
                          num_buckets=config["relative_attention_num_buckets"],
                          max_distance=config["relative_attention_max_distance"], **kwargs)


def released_names(state: dict) -> dict:
    """transformers' state dict as the released files hold it: the token embedding once, as `shared.weight`."""
    return {name: value for name, value in state.items() if name != "encoder.embed_tokens.weight"}


@pytest.mark.parametrize("length", [77, 512])
def test_relative_position_buckets_equal_transformers(length):
    position = torch.arange(length)
    relative = position[None, :] - position[:, None]
    expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        relative, bidirectional=True, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(relative_position_buckets(length, 32, 128), expected.numpy())


def test_tiny_encoder_matches_transformers():
    torch.manual_seed(0)
    reference = transformers.T5EncoderModel(transformers.T5Config(**TINY)).eval()
    with torch.no_grad():  # visible layer-norm weights, so a wrong norm cannot hide behind ones
        for name, value in reference.named_parameters():
            if "layer_norm" in name:
                value.uniform_(0.5, 1.5)
    model = mindbooth_t5(TINY)
    state = released_names(reference.state_dict())
    params = {p.name: p for p in model.get_parameters()}
    assert sorted(params) == sorted(state)
    for name, value in state.items():
        params[name].set_data(ms.Tensor(value.numpy()))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY["vocab_size"], (2, 77)).astype(np.int32)
    mask = np.ones((2, 77), np.int32)
    mask[0, 20:], mask[1, 5:] = 0, 0  # different padding per row
    with torch.no_grad():
        expected = reference(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state
    got = model(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
    expected = expected.numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_full_size_xxl_encoder_names_and_shapes_equal_transformers():
    with torch.device("meta"):
        reference = transformers.T5EncoderModel(transformers.T5Config(**XXL))
    expected = {name: tuple(value.shape) for name, value in released_names(reference.state_dict()).items()}
    with no_init_parameters():  # names and shapes only: nothing is allocated
        model = mindbooth_t5(XXL)
    got = {p.name: tuple(p.shape) for p in model.get_parameters()}
    assert got == expected
    assert sum(np.prod(shape) for shape in got.values()) == pytest.approx(4.76e9, rel=0.01)


@pytest.fixture(scope="module")
def spiece_model(tmp_path_factory):
    """A small Unigram SentencePiece model with T5's special ids (pad 0, </s> 1, <unk> 2, no <s>)."""
    path = tmp_path_factory.mktemp("t5_tokenizer") / "spiece.model"
    path.write_bytes(tiny_t5_tokenizer())
    return path


@pytest.mark.parametrize("max_length", [77, 6])
def test_tokenizer_matches_transformers(spiece_model, max_length):
    prompts = ["a photo of sks dog", "", "A Photo of a Teapot floating in water, van gogh style!",
               "zebra quartz xylophone 123"]
    reference = transformers.T5Tokenizer.from_pretrained(spiece_model.parent, extra_ids=0)  # converts spiece.model
    expected = reference(prompts, max_length=max_length, padding="max_length", truncation=True,
                         add_special_tokens=True, return_tensors="np")
    ids, mask = T5Tokenizer(spiece_model, max_length=max_length)(prompts)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])


def test_tokenizer_refuses_a_model_without_t5_special_pieces(tmp_path):
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(["a photo of a dog"] * 50), model_writer=model,
                                             vocab_size=20, pad_id=-1, eos_id=1, unk_id=0, bos_id=-1,
                                             hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "other.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="not a T5 SentencePiece model"):
        T5Tokenizer(tmp_path / "other.model")


def test_conditioner_with_t5_gives_ifs_prompt_embeddings(spiece_model):
    """IF's text path through the conditioner: prompt -> lower-cased, stripped, tokenized with the mask -> T5's last
    hidden state as the cross-attention context, no vector; equal to transformers on what IF's pipeline feeds it."""
    from gm.modules.embedders.modules import GeneralConditioner

    torch.manual_seed(1)
    reference = transformers.T5EncoderModel(transformers.T5Config(**TINY)).eval()
    embedder = {"target": "gm.modules.embedders.modules.FrozenT5Embedder", "input_key": "txt",
                "params": {"tokenizer_file": str(spiece_model), "vocab_size": TINY["vocab_size"],
                           "width": TINY["d_model"], "ff_width": TINY["d_ff"], "layers": TINY["num_layers"],
                           "heads": TINY["num_heads"], "head_dim": TINY["d_kv"], "max_length": 77}}
    conditioner = GeneralConditioner([embedder])
    params = {p.name: p for p in conditioner.get_parameters()}
    for name, value in released_names(reference.state_dict()).items():
        params[f"embedders.0.transformer.{name}"].set_data(ms.Tensor(value.numpy()))
    prompts = ["  A Photo of SKS Dog ", "a red teapot"]
    got = conditioner.encode({"txt": prompts})
    tokens = transformers.T5Tokenizer.from_pretrained(spiece_model.parent, extra_ids=0)(
        [p.lower().strip() for p in prompts], max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state.numpy()
    assert got["vector"].shape == (2, 0)
    assert np.abs(got["crossattn"].asnumpy() - expected).max() <= 1e-4 * np.abs(expected).max()
