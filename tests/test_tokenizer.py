"""gm CLIPTokenizer vs transformers' CLIPTokenizer built from the same shipped BPE file."""
import gzip
import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from gm.modules.embedders.tokenizer import VOCAB_FILE, CLIPTokenizer  # noqa: E402
from gm.util import instantiate_from_config  # noqa: E402

MAX_LEN = 77

PROMPTS = [
    "a photo of sks dog",
    "Hello, World? ... (yes) -- [no] {maybe}; a+b=c, 50% off @user #tag $100",
    "café crème brûlée naïve",
    "cafe\u0301",  # decomposed accent: NFC-normalised to the same ids as "café"
    "東京タワー 北京 한국어",
    "Ελληνικά русский العربية हिन्दी",
    "a dog 🐶🔥 with 👍🏽",
    "MiXeD CaSe PROMPT",
    "  leading   and trailing  ",
    "line\nbreak\tand\ttab\r\n",
    "dog's it'll we're I'M they've she'd can't",
    "1234 3.14 1,000,000 2nd",
    "",
    "a <|endoftext|> b <|startoftext|>",  # CLIP maps literal special tokens to their ids
    "x" * 300,  # one long word, many BPE pieces
    " ".join(["photo"] * 100),  # > 77 tokens: truncated, EOT kept last
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    """vocab.json + merges.txt derived from the shipped gz file the way CLIP builds its vocabulary."""
    with gzip.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    path = tmp_path_factory.mktemp("clip_vocab")
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (path / "merges.txt").write_text("\n".join(["#version: 0.2"] + merges) + "\n", encoding="utf-8")
    return path


def _hf_classes():
    # transformers 5 has only the tokenizers-backed class (CLIPTokenizerFast is an alias); 4.x has both.
    classes = [transformers.CLIPTokenizer]
    fast = getattr(transformers, "CLIPTokenizerFast", None)
    if fast is not None and fast is not transformers.CLIPTokenizer:
        classes.append(fast)
    return classes


@pytest.fixture(scope="module", params=_hf_classes(), ids=lambda c: c.__name__)
def hf_tokenizers(request, vocab_dir):
    """(CLIP-L style: pad <|endoftext|>, bigG style: pad "!" = id 0)."""
    clip_l = request.param.from_pretrained(str(vocab_dir), pad_token="<|endoftext|>")
    big_g = request.param.from_pretrained(str(vocab_dir), pad_token="!")
    return clip_l, big_g


def _hf_ids(hf, texts, max_length=MAX_LEN):
    out = hf(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return out["input_ids"]


def test_vocabulary_and_special_ids(vocab_dir, hf_tokenizers):
    tok = CLIPTokenizer()
    reference = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    assert tok.vocab_size == len(reference) == 49408
    assert tok.encoder == reference
    assert (tok.bos_id, tok.eos_id) == (49406, 49407)
    assert tok.pad_id == 49407 and CLIPTokenizer(pad_with_eos=False).pad_id == 0
    clip_l, big_g = hf_tokenizers
    assert (clip_l.bos_token_id, clip_l.eos_token_id, clip_l.pad_token_id) == (49406, 49407, 49407)
    assert big_g.pad_token_id == 0


@pytest.mark.parametrize("text", PROMPTS, ids=range(len(PROMPTS)))
def test_ids_match_transformers_clip_l_padding(text, hf_tokenizers):
    clip_l, _ = hf_tokenizers
    ours = CLIPTokenizer(pad_with_eos=True)(text)
    assert ours.dtype == np.int32 and ours.shape == (1, MAX_LEN)
    np.testing.assert_array_equal(ours, _hf_ids(clip_l, text))
    assert CLIPTokenizer().encode(text) == clip_l(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", PROMPTS, ids=range(len(PROMPTS)))
def test_ids_match_transformers_bigg_padding(text, hf_tokenizers):
    # "!" is the bigG pad token in transformers, which then also splits "!" out of the text
    # as a special token; OpenCLIP does not, so the prompt set above avoids "!".
    _, big_g = hf_tokenizers
    np.testing.assert_array_equal(CLIPTokenizer(pad_with_eos=False)(text), _hf_ids(big_g, text))


def test_batch_truncation_and_short_max_length(hf_tokenizers):
    clip_l, big_g = hf_tokenizers
    np.testing.assert_array_equal(CLIPTokenizer()(PROMPTS), _hf_ids(clip_l, PROMPTS))
    np.testing.assert_array_equal(CLIPTokenizer(pad_with_eos=False)(PROMPTS), _hf_ids(big_g, PROMPTS))
    long_ids = CLIPTokenizer()(PROMPTS[-1])[0]
    assert long_ids[0] == 49406 and long_ids[-1] == 49407 and (long_ids[1:-1] == 1125).all()  # "photo</w>"
    for text in ["a photo of sks dog in a bucket on the beach at sunset", "x" * 300]:
        np.testing.assert_array_equal(CLIPTokenizer(max_length=8)(text), _hf_ids(clip_l, text, max_length=8))


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("don\u2019t \u201cquoted\u201d", 'don\'t "quoted"'),  # ftfy straightens curly quotes
        ("caf\u00c3\u00a9", "café"),  # ftfy repairs UTF-8 read as latin-1
        ("&amp; &lt;b&gt; &amp;amp;", "& <b> &"),  # html unescape, applied twice as CLIP does
    ],
)
def test_ftfy_and_html_cleaning(raw, clean, hf_tokenizers):
    # transformers' fast tokenizer skips ftfy/html; CLIP applies them, so compare with the cleaned text.
    clip_l, _ = hf_tokenizers
    np.testing.assert_array_equal(CLIPTokenizer()(raw), _hf_ids(clip_l, clean))
    assert not np.array_equal(_hf_ids(clip_l, raw), _hf_ids(clip_l, clean))  # the cleaning matters here


def test_built_from_config():
    tok = instantiate_from_config(
        {"target": "gm.modules.embedders.tokenizer.CLIPTokenizer", "params": {"pad_with_eos": False}}
    )
    ids = tok(["a photo of sks dog"])
    np.testing.assert_array_equal(ids[0, :7], [49406, 320, 1125, 539, 48136, 1929, 49407])
    assert (ids[0, 7:] == 0).all()


@pytest.mark.parametrize("bad", [123, None, b"a photo", ["a photo", 3], [["nested"]]])
def test_bad_input_raises_type_error(bad):
    with pytest.raises(TypeError, match="str or a list of str"):
        CLIPTokenizer()(bad)


def test_bad_encode_and_max_length():
    with pytest.raises(TypeError, match="expects a str"):
        CLIPTokenizer().encode(["a"])
    with pytest.raises(ValueError, match="max_length"):
        CLIPTokenizer(max_length=1)
