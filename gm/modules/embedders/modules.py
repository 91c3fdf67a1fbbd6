"""The conditioner and its embedders (sgm's `modules/encoders/modules.py` names and semantics): SD 1.x's CLIP ViT-L,
SD 2.x's OpenCLIP ViT-H, SDXL's CLIP ViT-L + OpenCLIP bigG and size embeddings, DeepFloyd IF's T5.

Each embedder has `tokenize(value)` (host side: raw batch value -> Tensor input) and
`construct(input)` (graph side). `GeneralConditioner` gathers them: 3-D outputs are cross-attention
context (concatenated on the feature axis), 2-D outputs are the UNet's vector ("ADM") input.
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from gm.modules.diffusionmodules.util import timestep_embedding
from gm.modules.embedders.clip import CLIPTextModel
from gm.modules.embedders.open_clip import OpenCLIPTextModel
from gm.modules.embedders.t5 import T5EncoderModel
from gm.modules.lora import inject_fused_qkv_lora, inject_lora
from gm.util import instantiate_from_config


def _text_list(value):
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, np.ndarray)) and all(isinstance(t, str) for t in value):
        return list(value)
    raise TypeError(f"text input must be a str or a list of str, got {type(value).__name__}")


class AbstractEmbModel(nn.Cell):
    """Set by GeneralConditioner: which batch key feeds this embedder, and whether it trains."""

    input_key = None
    is_trainable = False

    def freeze(self):
        for param in self.get_parameters():
            param.requires_grad = False


class _TextEmbedder(AbstractEmbModel):
    pad_with_eos = True

    def __init__(self, max_length: int):
        super().__init__()
        self.max_length = max_length
        self._tokenizer = None

    def tokenize(self, text):
        """str or list of str -> int32 Tensor (B, max_length)."""
        if self._tokenizer is None:
            from gm.modules.embedders.tokenizer import CLIPTokenizer  # loads the BPE vocabulary: only when used

            self._tokenizer = CLIPTokenizer(max_length=self.max_length, pad_with_eos=self.pad_with_eos)
        return ms.Tensor(self._tokenizer(_text_list(text)), ms.int32)

    def add_lora(self, rank: int, alpha: float, dropout: float = 0.0) -> int:
        """LoRA on the self-attention q/k/v/out projections (diffusers' text-encoder LoRA targets)."""
        raise NotImplementedError


class FrozenCLIPEmbedder(_TextEmbedder):
    """CLIP ViT-L text encoder. layer 'last': final-layer-normed last layer; 'hidden': hidden_states[layer_idx]
    in transformers' numbering (0 = embeddings), without the final norm. Pads with end-of-text."""

    pad_with_eos = True

    def __init__(self, width: int = 768, layers: int = 12, heads: int = 12, mlp_width: int = 3072,
                 act: str = "quick_gelu", layer: str = "last", layer_idx: int = None,
                 vocab_size: int = 49408, max_length: int = 77):
        super().__init__(max_length)
        if layer == "hidden":
            if not isinstance(layer_idx, int) or not -(layers + 1) <= layer_idx <= layers:
                raise ValueError(f"layer 'hidden' needs an int layer_idx in [{-(layers + 1)}, {layers}], got {layer_idx!r}")
            self.num_layers = layer_idx % (layers + 1)
        elif layer == "last":
            self.num_layers = layers
        else:
            raise ValueError(f"layer must be 'last' or 'hidden', got {layer!r}")
        self.layer = layer
        self.transformer = CLIPTextModel(width, layers, heads, mlp_width, act, vocab_size, max_length)

    def add_lora(self, rank: int, alpha: float, dropout: float = 0.0) -> int:
        return inject_lora(self, rank, alpha, dropout, target_modules=("q_proj", "k_proj", "v_proj", "out_proj"),
                           attentions=("self_attn",))

    def construct(self, input_ids):
        z = self.transformer(input_ids, self.num_layers)
        if self.layer == "last":
            z = self.transformer.text_model.final_layer_norm(z)
        return z


class FrozenOpenCLIPEmbedder2(_TextEmbedder):
    """OpenCLIP ViT-bigG text encoder. layer 'penultimate': the input of the last block; 'last': its output.
    legacy=False: that state as is, plus (with always_return_pooled) the projected end-of-text token of
    ln_final(last). legacy=True: ln_final(that state) only. Pads with 0."""

    pad_with_eos = False

    def __init__(self, width: int = 1280, layers: int = 32, heads: int = 20, mlp_width: int = 5120,
                 act: str = "gelu", projection_dim: int = None, layer: str = "last",
                 always_return_pooled: bool = False, legacy: bool = True,
                 vocab_size: int = 49408, max_length: int = 77):
        super().__init__(max_length)
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        if always_return_pooled and legacy:
            raise ValueError("always_return_pooled needs legacy: False (as in sgm)")
        if always_return_pooled and projection_dim is None:
            raise ValueError("always_return_pooled needs projection_dim (the pooled output's width)")
        if layer == "penultimate" and layers < 2:
            raise ValueError("layer 'penultimate' needs layers >= 2")
        self.layer = layer
        self.legacy = legacy
        self.return_pooled = always_return_pooled
        self.model = OpenCLIPTextModel(width, layers, heads, mlp_width, act, projection_dim, vocab_size, max_length)

    def add_lora(self, rank: int, alpha: float, dropout: float = 0.0) -> int:
        # q/k/v live in one fused in_proj_weight: one LoRA each on its rows; out_proj is a Dense.
        return (inject_fused_qkv_lora(self, rank, alpha, dropout) * 3
                + inject_lora(self, rank, alpha, dropout, target_modules=("out_proj",), attentions=("attn",)))

    def construct(self, input_ids):
        penultimate, last = self.model(input_ids)
        z = penultimate if self.layer == "penultimate" else last
        if self.legacy:
            return self.model.ln_final(z)
        if self.return_pooled:
            return z, self.model.pool(last, input_ids)
        return z


class FrozenOpenCLIPEmbedder(FrozenOpenCLIPEmbedder2):
    """SD 2.x's OpenCLIP ViT-H text encoder: ln_final of the penultimate layer's output. Built, like diffusers' SD 2.x
    text encoder, with the layers it uses only (23 of the released 24: `layers` counts those, and the output is the
    last of them), without the projection it never applies. Pads with 0."""

    def __init__(self, width: int = 1024, layers: int = 23, heads: int = 16, mlp_width: int = 4096, act: str = "gelu",
                 vocab_size: int = 49408, max_length: int = 77):
        super().__init__(width, layers, heads, mlp_width, act, projection_dim=None, layer="last",
                         always_return_pooled=False, legacy=True, vocab_size=vocab_size, max_length=max_length)


class FrozenT5Embedder(AbstractEmbModel):
    """DeepFloyd IF's T5 v1.1 encoder: the last hidden state of the prompt, lower-cased and stripped as IF's pipeline
    does (without its optional caption cleaning), tokenized by the released SentencePiece model `tokenizer_file`
    with an attention mask over the real tokens. `tokenize` gives ids and mask stacked as one (B, 2, L) input."""

    def __init__(self, tokenizer_file: str, vocab_size: int = 32128, width: int = 4096, ff_width: int = 10240,
                 layers: int = 24, heads: int = 64, head_dim: int = 64, num_buckets: int = 32,
                 max_distance: int = 128, max_length: int = 77):
        super().__init__()
        self.tokenizer_file, self.max_length = tokenizer_file, max_length
        self._tokenizer = None
        self.transformer = T5EncoderModel(vocab_size, width, ff_width, layers, heads, head_dim, num_buckets,
                                          max_distance, max_length=max(max_length, 512))

    def tokenize(self, text):
        if self._tokenizer is None:
            from gm.modules.embedders.t5_tokenizer import T5Tokenizer  # reads the SentencePiece model: only when used

            self._tokenizer = T5Tokenizer(self.tokenizer_file, self.max_length)
        ids, mask = self._tokenizer([t.lower().strip() for t in _text_list(text)])
        return ms.Tensor(np.stack([ids, mask], axis=1), ms.int32)

    def construct(self, ids_and_mask):
        return self.transformer(ids_and_mask[:, 0], ids_and_mask[:, 1])


class ConcatTimestepEmbedderND(AbstractEmbModel):
    """(B, D) numbers (image sizes, crop offsets) -> sinusoidal embedding of each -> (B, D * outdim)."""

    def __init__(self, outdim: int):
        super().__init__()
        self.outdim = outdim

    def tokenize(self, value):
        """List of pairs, numpy array or Tensor, (B, D) -> float32 Tensor (B, D)."""
        array = value.asnumpy() if isinstance(value, ms.Tensor) else np.asarray(value)
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"{self.input_key or 'size input'} must be numbers of shape (batch, D), e.g. "
                             f"[[1024, 1024]], got {array.dtype} array of shape {array.shape}")
        return ms.Tensor(array.astype(np.float32))

    def construct(self, x):
        if x.ndim == 1:
            x = x[:, None]
        batch, dims = x.shape
        emb = timestep_embedding(x.reshape(-1), self.outdim)
        return emb.reshape(batch, dims * self.outdim)


class GeneralConditioner(nn.Cell):
    """Runs every embedder on its batch entry; 3-D outputs -> "crossattn", 2-D outputs -> "vector"."""

    OUTPUT_KEYS = {2: "vector", 3: "crossattn"}

    def __init__(self, emb_models: list):
        super().__init__()
        embedders = []
        for n, config in enumerate(emb_models):
            unknown = set(config) - {"target", "params", "is_trainable", "input_key"}
            if unknown:
                raise ValueError(f"emb_models[{n}] has unsupported keys {sorted(unknown)}; "
                                 "allowed: target, params, is_trainable, input_key")
            if "input_key" not in config:
                raise ValueError(f"emb_models[{n}] ({config.get('target')}) needs an input_key")
            embedder = instantiate_from_config(config)
            if not isinstance(embedder, AbstractEmbModel):
                raise TypeError(f"emb_models[{n}]: {config['target']} is not an AbstractEmbModel")
            embedder.input_key = config["input_key"]
            embedder.is_trainable = bool(config.get("is_trainable", False))
            if not embedder.is_trainable:
                embedder.freeze()
            embedders.append(embedder)
        self.embedders = nn.CellList(embedders)
        self.no_zeros = (False,) * len(embedders)

    def add_text_encoder_lora(self, rank: int, alpha: float, dropout: float = 0.0) -> int:
        """LoRA on every text embedder's attention; returns the number of LoRA branches added."""
        added = sum(embedder.add_lora(rank, alpha, dropout) for embedder in self.embedders if isinstance(embedder, _TextEmbedder))
        if not added:
            raise ValueError("the conditioner has no text encoder to put LoRA on")
        return added

    def tokenize(self, batch: dict) -> tuple:
        """Batch dict -> one Tensor input per embedder (text ids, or float sizes)."""
        inputs = []
        for embedder in self.embedders:
            if embedder.input_key not in batch:
                raise KeyError(f"batch has no '{embedder.input_key}' entry (keys: {sorted(batch)}), "
                               f"needed by {type(embedder).__name__}")
            inputs.append(embedder.tokenize(batch[embedder.input_key]))
        return tuple(inputs)

    def embed(self, inputs, zero_flags):
        """Run the embedders; an embedder whose flag is set gives zeros of its outputs' shapes."""
        vector, crossattn = [], []
        for i in range(len(self.embedders)):
            out = self.embedders[i](inputs[i])
            if not isinstance(out, tuple):
                out = (out,)
            for emb in out:
                if zero_flags[i]:
                    emb = ops.zeros_like(emb)
                if emb.ndim == 3:
                    crossattn.append(emb)
                elif emb.ndim == 2:
                    vector.append(emb)
                else:
                    raise ValueError(f"embedder {i} gave a {emb.ndim}-D output; expected 2-D (vector) or 3-D (crossattn)")
        crossattn = ops.cat(crossattn, axis=-1)
        if not vector:  # SD 1.x/2.x: text only; an empty vector keeps one conditioning signature for every model
            return ops.zeros((crossattn.shape[0], 0), crossattn.dtype), crossattn
        return ops.cat(vector, axis=-1), crossattn

    def construct(self, *inputs):
        """Inputs from `tokenize` -> (vector (B, sum of 2-D widths: 0 without 2-D outputs), crossattn (B, L, sum of
        3-D widths))."""
        return self.embed(inputs, self.no_zeros)

    def encode(self, batch: dict, force_zero_embeddings=()) -> dict:
        """Batch dict -> {"crossattn", "vector"}. Embedders fed by a key in `force_zero_embeddings`
        give zeros (SDXL's unconditional branch for an empty negative prompt)."""
        vector, crossattn = self.embed(self.tokenize(batch), self.zero_flags(force_zero_embeddings))
        return {"crossattn": crossattn, "vector": vector}

    def zero_flags(self, force_zero_embeddings=()) -> tuple:
        """Per embedder: whether its batch key is in `force_zero_embeddings` (its outputs become zeros)."""
        force_zero_embeddings = force_zero_embeddings or ()
        return tuple(embedder.input_key in force_zero_embeddings for embedder in self.embedders)
