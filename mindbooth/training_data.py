"""The DreamBooth examples as the training step's arrays.

Each item is encoded on the host (VAE moments, text conditioning); with `cache_latents` once per distinct item
(a fixed crop) and kept. A micro-batch's latents, noise and sigmas are drawn from one generator per sample, keyed
by the micro-batch's key and the sample's place in the global batch, so N ranks x batch B train as 1 rank x
batch N*B, and a resumed run draws what an uninterrupted one draws (the sampler and `rng` are saved with it).
"""
import mindspore as ms
import numpy as np
from tqdm import tqdm

from mindbooth.bucket_sampler import BucketBatchSampler
from mindbooth.data import BatchSampler, collate
from mindbooth.text_embeddings import lookup
from mindbooth.train_step import step_conditioning


class TrainingData:
    """`dataset`'s items for `engine`'s step, for this rank of `world_size`: `next_batch()` gives the arrays
    (latents, noise, sigmas, *conditioning) of the next micro-batch, instance rows first, then class rows.
    `text_embeddings`: the prompts' embeddings computed before the engine was built without its text encoder."""

    def __init__(self, dataset, engine, batch_size: int, seed: int, rank: int, world_size: int, with_prior: bool,
                 train_text_encoder: bool, cache_latents: bool, text_embeddings: dict = None):
        self.dataset, self.engine, self.text_embeddings = dataset, engine, text_embeddings
        self.seed, self.with_prior, self.train_text_encoder = seed, with_prior, train_text_encoder
        if dataset.buckets:  # aspect-ratio buckets: a micro-batch (global batch) holds one bucket's items
            self.sampler = BucketBatchSampler([dataset.item_size(i) for i in range(len(dataset))], batch_size, seed, rank, world_size)
        else:
            self.sampler = BatchSampler(len(dataset), batch_size, seed, rank, world_size)
        self.rng = np.random.default_rng([seed, 1])  # one key per micro-batch, the same on every rank
        self.cache = {} if cache_latents else None

    def encode_examples(self, index, rng):
        """Item `index` -> VAE moments of its instance (and class) example, and their conditioning: the
        (crossattn, vector) embeddings, or, when the text encoders train, the conditioner's inputs (token ids, sizes)."""
        batch = collate([self.dataset.examples(index, rng)])
        moments = self.engine.first_stage_model.encode_moments(ms.Tensor(batch["pixels"])).asnumpy()
        text_and_sizes = {k: v for k, v in batch.items() if k != "pixels"}
        if self.train_text_encoder:
            return moments, tuple(t.asnumpy() for t in self.engine.conditioner.tokenize(text_and_sizes))
        if self.text_embeddings is not None:  # encoded before the model was built (mindbooth/text_embeddings.py)
            return moments, lookup(self.text_embeddings, batch["txt"])
        cond = self.engine.conditioner.encode(text_and_sizes)
        return moments, (cond["crossattn"].asnumpy(), cond["vector"].asnumpy())

    def encode_item(self, index, rng):
        """encode_examples, or with the cache its kept result (cached crops are fixed per item, alike on every rank)."""
        if self.cache is None:
            return self.encode_examples(index, rng)
        index %= self.dataset.num_distinct
        if index not in self.cache:
            self.cache[index] = self.encode_examples(index, np.random.default_rng([self.seed, 2, index]))
        return self.cache[index]

    def encode_all(self, show_progress: bool):
        """Fill the cache with every distinct item (the encoders are not needed afterwards)."""
        what = "latents" if self.train_text_encoder else "latents and text embeddings"
        for index in tqdm(range(self.dataset.num_distinct), desc=f"caching {what}", disable=not show_progress):
            self.encode_item(index, None)

    def next_batch(self) -> list:
        """The next micro-batch's arrays (make_batch), its indices from the sampler, its key from `rng`."""
        indices = self.sampler.next_indices()
        return self.make_batch(indices, self.sampler.sample_generators(int(self.rng.integers(2**63))))

    def make_batch(self, indices, rngs) -> list:
        """Arrays (latents, noise, sigmas, *conditioning) of a micro-batch: all instance examples first, then all
        class examples; each item's randomness from its own generator."""
        loss_fn = self.engine.loss_fn
        items = []
        for index, rng in zip(indices, rngs):
            moments, conditioning = self.encode_item(index, rng)
            mean, logvar = np.split(moments, 2, axis=1)
            std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
            latents = ((mean + std * rng.standard_normal(mean.shape).astype(np.float32)) * self.engine.scale_factor).astype(np.float32)
            noise = loss_fn.sample_noise(latents.shape, rng)
            sigmas = loss_fn.sample_sigmas(latents.shape[0], rng)
            items.append((latents, noise, sigmas, *conditioning))
        examples = range(2 if self.with_prior else 1)  # row 0 of an item: its instance example; row 1: its class example
        return [np.stack([item[field][row] for row in examples for item in items]) for field in range(len(items[0]))]


def pass_inputs(fields, rows, context_projections=None):
    """GradStep's (latents, noise, sigmas, conditioning) of the micro-batch's `rows` (`fields` from make_batch)."""
    latents, noise, sigmas, *conditioning = (ms.Tensor(field[rows]) for field in fields)
    return latents, noise, sigmas, step_conditioning(conditioning, context_projections)
