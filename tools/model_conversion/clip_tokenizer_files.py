"""The files of a transformers `CLIPTokenizer` folder (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json), written from the BPE file MindBooth's own tokenizer reads
(gm/modules/embedders/bpe_simple_vocab_16e6.txt.gz): the same vocabulary and merges, so both tokenize alike.

The tokenizers differ only in the padding token: CLIP ViT-L pads with `<|endoftext|>`, OpenCLIP (SD 2.x's ViT-H,
SDXL's bigG) with `!` (id 0), as MindBooth's embedders do (`pad_with_eos`).
"""
import gzip
import json

from gm.modules.embedders.tokenizer import BOS_TOKEN, EOS_TOKEN, NUM_MERGES, VOCAB_FILE, load_vocab

MERGES_HEADER = "#version: 0.2"  # transformers' CLIPTokenizer skips the first line of merges.txt
OPEN_CLIP_PAD = "!"


def pad_token(embedder_kind: str) -> str:
    """The padding token of a MindBooth text embedder class."""
    return EOS_TOKEN if embedder_kind == "FrozenCLIPEmbedder" else OPEN_CLIP_PAD


def tokenizer_files(pad: str, max_length: int = 77) -> dict:
    """{file name: text} of a CLIPTokenizer folder padding with `pad`."""
    encoder, _ = load_vocab()
    with gzip.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:NUM_MERGES + 1]  # the merges CLIP uses (see tokenizer.NUM_MERGES)
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": pad, "unk_token": EOS_TOKEN}
    config = {**special, "add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
              "errors": "replace", "model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}
    return {
        "vocab.json": json.dumps(encoder, ensure_ascii=False),
        "merges.txt": "\n".join([MERGES_HEADER] + merges) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }
