"""Bottlenecks between the encoder and the decoder: SoftVQ and the diagonal Gaussian (KL).

SoftVQ splits the L latent tokens into G contiguous groups (token t uses
codebook ``t // (L / G)``) and replaces each token by the softmax-weighted mean
of its codebook's L2-normalised codes, with logits ``cos / tau``. All of it runs
in float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` along the last axis (PyTorch ``F.normalize``)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


class SoftVQOutput(NamedTuple):
  quant: jax.Array        # (B, L, d) soft-quantised latents
  probs: jax.Array        # (B, L, K) soft assignments
  logits: jax.Array       # (B, L, K) cosine similarities (before 1/tau), for the entropy term
  tokens_normed: jax.Array  # (B, L, d) the L2-normalised inputs


class SoftVectorQuantizer(nnx.Module):
  """``quantize`` of the reference; ``embedding`` is stored un-normalised, ``(G, K, d)``."""

  def __init__(self, codebook_size: int, embed_dim: int, num_codebooks: int, tau: float, *,
               l2_norm: bool = True, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.num_codebooks = num_codebooks
    self.codebook_size = codebook_size
    self.tau = tau
    self.l2_norm = l2_norm
    init = jax.random.uniform(rngs.params(), (num_codebooks, codebook_size, embed_dim), param_dtype,
                              -1.0 / codebook_size, 1.0 / codebook_size)
    self.embedding = nnx.Param(l2_normalize(init) if l2_norm else init)

  def codebook(self) -> jax.Array:
    """The codes as the quantizer uses them, float32 ``(G, K, d)``."""
    emb = self.embedding[...].astype(jnp.float32)
    return l2_normalize(emb) if self.l2_norm else emb

  def __call__(self, h: jax.Array) -> SoftVQOutput:
    b, length, dim = h.shape
    groups = self.num_codebooks
    if length % groups:
      raise ValueError(f"{length} latent tokens cannot be split into {groups} codebook groups")
    seg = length // groups
    z = h.astype(jnp.float32).reshape(b, groups, seg, dim)
    if self.l2_norm:
      z = l2_normalize(z)
    codebook = self.codebook()
    # Codes get gradients only through the weighted sum, as in the reference.
    logits = jnp.einsum("bgsd,gkd->bgsk", z, jax.lax.stop_gradient(codebook), precision=_HIGHEST)
    probs = jax.nn.softmax(logits / self.tau, axis=-1)
    quant = jnp.einsum("bgsk,gkd->bgsd", probs, codebook, precision=_HIGHEST)
    k = self.codebook_size
    return SoftVQOutput(
        quant=quant.reshape(b, length, dim),
        probs=probs.reshape(b, length, k),
        logits=logits.reshape(b, length, k),
        tokens_normed=z.reshape(b, length, dim),
    )


def entropy_loss(logits: jax.Array, temperature: float = 0.01,
                 group_size: int | None = None) -> jax.Array:
  """Sample entropy minus the entropy of the batch-mean distribution.

  All rows (every token of every codebook in the batch) are pooled, as in the
  reference's ``compute_entropy_loss``; ``logits`` are the cosine logits before
  ``1/tau``, ``(B, ...)``. Multiply by ``entropy_loss_ratio`` for the training loss.

  ``group_size``: the term is computed on each group of that many consecutive examples and
  averaged over the groups, as the reference's data-parallel training computes it on each
  GPU's share of the batch (the batch-mean entropy is not linear in the batch, so the
  pooled value differs). None, or at least B: one group.
  """
  batch = logits.shape[0]
  groups = 1
  if group_size is not None and 0 < group_size < batch:
    if batch % group_size:
      raise ValueError(f"entropy group size {group_size} does not divide the batch of {batch}")
    groups = batch // group_size
  flat = logits.reshape(groups, -1, logits.shape[-1]).astype(jnp.float32) / temperature
  probs = jax.nn.softmax(flat, axis=-1)
  log_probs = jax.nn.log_softmax(flat, axis=-1)
  sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1), axis=-1)
  avg_probs = jnp.mean(probs, axis=1)
  avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-6), axis=-1)
  return jnp.mean(sample_entropy - avg_entropy)


def code_usage(out: SoftVQOutput, num_codebooks: int,
               valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-codebook statistics of a batch, for logging.

  ``usage``: fraction of codes that are the argmax of at least one token;
  ``perplexity``: exp of the entropy of the mean assignment; plus the
  reference's ``avg_probs``, ``max_probs`` and ``zq_z_cos`` scalars.
  ``valid``: optional ``(B,)`` mask of the examples to count, so that the rows a
  sharded batch was padded with do not weigh in.
  """
  b, length, k = out.probs.shape
  seg = length // num_codebooks
  weight = jnp.ones((b,), jnp.float32) if valid is None else valid.astype(jnp.float32)
  count = jnp.sum(weight)
  probs = out.probs.reshape(b, num_codebooks, seg, k)
  hits = jax.nn.one_hot(jnp.argmax(probs, axis=-1), k, dtype=jnp.float32)  # (B, G, S, K)
  hits = hits * weight[:, None, None, None]
  usage = jnp.mean(jnp.max(hits, axis=(0, 2)) > 0, axis=-1)  # (G,)
  mean_probs = jnp.einsum("bgsk,b->gk", probs, weight) / (count * seg)  # (G, K)
  perplexity = jnp.exp(-jnp.sum(mean_probs * jnp.log(mean_probs + 1e-10), axis=-1))
  cos = jnp.sum(l2_normalize(out.tokens_normed) * l2_normalize(out.quant), axis=-1)  # (B, L)
  per_example = lambda x: jnp.sum(jnp.mean(x, axis=1) * weight) / count
  return {
      "usage": usage,
      "perplexity": perplexity,
      "avg_probs": per_example(jnp.mean(out.probs, axis=-1)),
      "max_probs": per_example(jnp.max(out.probs, axis=-1)),
      "zq_z_cos": per_example(cos),
  }


class DiagonalGaussian(NamedTuple):
  """The KL bottleneck's posterior; ``logvar`` is clamped to [-30, 20] as in the reference."""

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  def mode(self) -> jax.Array:
    return self.mean

  def sample(self, key: jax.Array) -> jax.Array:
    return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(key, self.mean.shape)

  def kl(self) -> jax.Array:
    """KL to N(0, I) summed over tokens and channels, per batch element."""
    terms = jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))
