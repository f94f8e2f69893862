"""The stage-1 objective and its one jitted step: generator and discriminator updated together.

Per step, in the reference's order:

1. generator: ``w_rec*MSE + w_p(step)*LPIPS + a*w_d(step)*L_adv + entropy + REPA`` (+ KL for
   the KL bottleneck), ``L_adv = -mean D(DiffAug(x_hat))``; Adam step, EMA update;
2. discriminator, on the same (detached) reconstructions:
   ``w_d(step)*(hinge + 0.001*LeCAM) + w_cr(step)*CR``; its own Adam step.

The discriminator is in train mode in both passes, as in the reference: each call uses its
batch's statistics and moves the BatchNorm running statistics and the spectral-norm vectors,
which therefore live in the train state (``disc_rest``) next to the LeCAM EMAs. Frozen
networks (LPIPS, the DINO backbone, the REPA teacher) are arguments of the step, not
constants, so their weights stay out of the compiled program and out of the optimizers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from softvq_jax.data import transforms
from softvq_jax.losses import diffaug, gan
from softvq_jax.losses.discriminator import discriminator
from softvq_jax.losses.repa import RepaProjector, repa_alignment_loss, teacher_features
from softvq_jax.models.config import TokenizerConfig
from softvq_jax.models.quantizers import code_usage, entropy_loss
from softvq_jax.models.tokenizer import TokenizerModel
from softvq_jax.train.state import LeafStep, TrainState, ema_update, optimizer_step


class TrainableTokenizer(nnx.Module):
  """The tokenizer plus what stage 1 trains with it: the REPA projector (``projection``).

  The reference keeps the projector inside its tokenizer (``projection.0/2/4``); here it
  sits next to it so that the exported tokenizer is exactly the released architecture.
  """

  def __init__(self, cfg: TokenizerConfig, *, repa_dims: tuple[int, int] | None = None,
               rngs: nnx.Rngs, dtype=None):
    self.tokenizer = TokenizerModel(cfg, rngs=rngs, dtype=dtype)
    self.projection = (RepaProjector(cfg.codebook_embed_dim, repa_dims[0], repa_dims[1],
                                     rngs=rngs, dtype=dtype)
                       if repa_dims is not None else None)

  def __call__(self, images, *, sample_key=None):
    return self.tokenizer(images, sample_key=sample_key)


@flax.struct.dataclass
class Stage1State:
  """``TrainState``'s fields for the generator, plus the discriminator and LeCAM state."""

  step: jax.Array
  params: nnx.State
  rest: nnx.State
  opt_state: Any
  ema: nnx.State
  rng: jax.Array
  disc_params: nnx.State
  disc_rest: nnx.State        # BatchNorm running statistics, spectral-norm vectors
  disc_opt_state: Any
  lecam: gan.LecamState

  def generator(self) -> TrainState:
    return TrainState(step=self.step, params=self.params, rest=self.rest,
                      opt_state=self.opt_state, ema=self.ema, rng=self.rng)


@dataclasses.dataclass(frozen=True)
class Objective:
  """The weights and switches of the stage-1 loss (from ``config.loss``)."""

  reconstruction_weight: float = 1.0
  reconstruction: str = "l2"   # the reference's --reconstruction-loss: "l2" (MSE) or "l1"
  perceptual_weight: float = 1.0
  perceptual_warmup: int = 10_000
  lpips_dropout: bool = True
  entropy_ratio: float = 0.01
  entropy_temperature: float = 0.01
  entropy_group_size: int = 0   # 0: the whole global batch
  kl_weight: float = 1e-6
  gan: bool = True
  disc_weight: float = 0.2
  disc_start: int = 20_000
  disc_adaptive_weight: bool = False
  diff_aug: bool = True
  disc_cr_weight: float = 4.0
  lecam_weight: float | None = 0.001
  gen_loss: str = "hinge"
  disc_loss: str = "hinge"
  repa: bool = False
  repa_weight: float = 0.1
  repa_align: str = "repeat"

  @classmethod
  def from_config(cls, config) -> "Objective":
    loss = config.loss
    lecam = loss.get("lecam_weight", 0.001)
    return cls(
        reconstruction_weight=float(loss.get("reconstruction_weight", 1.0)),
        reconstruction=str(loss.get("reconstruction", "l2")),
        perceptual_weight=float(loss.get("perceptual_weight", 1.0)),
        perceptual_warmup=max(int(loss.get("perceptual_warmup", 1)), 1),
        lpips_dropout=bool(loss.get("lpips_dropout", False)),
        entropy_ratio=float(config.model.get("entropy_loss_ratio", 0.0)),
        entropy_temperature=float(loss.get("entropy_temperature", 0.01)),
        entropy_group_size=int(loss.get("entropy_group_size", 0) or 0),
        kl_weight=float(config.model.get("kl_loss_weight", 1e-6)),
        gan=float(loss.get("disc_weight", 0.0)) > 0,
        disc_weight=float(loss.get("disc_weight", 0.0)),
        disc_start=int(loss.get("disc_start", 0)),
        disc_adaptive_weight=bool(loss.get("disc_adaptive_weight", False)),
        diff_aug=bool(loss.get("diff_aug", True)),
        disc_cr_weight=float(loss.get("disc_cr_weight", 0.0)),
        lecam_weight=float(lecam) if lecam else None,
        gen_loss=str(loss.get("gen_loss", "hinge")),
        disc_loss=str(loss.get("disc_loss", "hinge")),
        repa=bool(loss.get("repa", False)),
        repa_weight=float(loss.get("repa_weight", 0.1)),
        repa_align=str(loss.get("repa_align", "repeat")),
    )


@dataclasses.dataclass(frozen=True)
class FrozenGraphs:
  """Graph definitions of the frozen networks whose states the step receives."""

  lpips: Any = None
  backbone: Any = None
  teacher: Any = None


def _not_param(module) -> nnx.State:
  return nnx.state(module, nnx.Not(nnx.Param))


def _last_layer(grads: nnx.State):
  """The kernel of the decoder's last layer, the reference's ``last_layer`` for the adaptive weight.

  ``to_pixel.model`` is the Linear itself, or a sequence whose last entry with parameters
  is the last conv (``conv`` head) or the last sine layer's Linear (``siren``).
  """
  head = grads["tokenizer"]["decoder"]["to_pixel"]["model"]
  if "kernel" in head:
    return head["kernel"]
  last = head[max(key for key in head if isinstance(key, int))]
  return last["linear"]["kernel"] if "linear" in last else last["kernel"]


def make_stage1_step(graphdef, disc_graphdef, frozen: FrozenGraphs, objective: Objective, *,
                     tx: optax.GradientTransformation, disc_tx: optax.GradientTransformation,
                     ema_decay: float, num_codebooks: int, state_shardings, batch_sharding,
                     frozen_shardings, learning_rate_fn: Callable | None = None,
                     kl_bottleneck: bool = False):
  """A jitted ``(state, batch, frozen_states) -> (state, metrics)`` that donates the state.

  ``batch["image"]``: float images in [-1, 1], or uint8 images in [0, 255], which the
  step maps to [-1, 1] to the same values as ``transforms.to_float`` (what the trainer
  feeds it).
  """
  obj = objective

  def step(state: Stage1State, batch, frozen_states):
    images = batch["image"]
    if images.dtype == jnp.uint8:  # the trainer's batches: mapped to [-1, 1] here
      images = transforms.to_float_on_device(images)
    keys = iter(jax.random.split(jax.random.fold_in(state.rng, state.step), 16))
    global_step = state.step + 1  # the reference counts from 1
    backbone = (nnx.merge(frozen.backbone, frozen_states["backbone"]) if obj.gan else None)

    def call_d(heads, x, aug_key, crop_key, policy=diffaug.DEFAULT_POLICY, prob=0.5):
      if obj.diff_aug or prob == 1.0:
        x = diffaug.diff_augment(x, aug_key, policy, prob)
      return discriminator(heads, backbone, x, crop_key, train=True)

    # ------------------------------------------------------------------ generator
    k_sample, k_lpips, k_repa, k_gaug, k_gcrop = (next(keys) for _ in range(5))

    def generator_losses(params, disc_rest):
      model = nnx.merge(graphdef, params, state.rest)
      recon, enc = model.tokenizer(images, sample_key=k_sample if kl_bottleneck else None)
      error = recon.astype(jnp.float32) - images
      mse = jnp.mean(jnp.square(error))
      p_weight = obj.perceptual_weight * jnp.minimum(1.0, global_step / obj.perceptual_warmup)
      metrics = {"mse": mse, "perceptual_weight": p_weight}
      if obj.reconstruction == "l1":
        metrics["l1"] = jnp.mean(jnp.abs(error))
        nll = obj.reconstruction_weight * metrics["l1"]
      else:
        nll = obj.reconstruction_weight * mse
      if obj.perceptual_weight > 0:
        lpips = nnx.merge(frozen.lpips, frozen_states["lpips"])
        lp = jnp.mean(lpips(images, recon, dropout_key=k_lpips if obj.lpips_dropout else None))
        nll = nll + p_weight * lp
        metrics["lpips"] = lp
      other = jnp.zeros((), jnp.float32)
      if enc.softvq is not None:
        if obj.entropy_ratio > 0:
          ent = entropy_loss(enc.softvq.logits, obj.entropy_temperature,
                             obj.entropy_group_size or None)
          other = other + obj.entropy_ratio * ent
          metrics["entropy"] = ent
        stats = code_usage(enc.softvq, num_codebooks)
        metrics.update(code_usage=jnp.mean(stats["usage"]),
                       perplexity=jnp.mean(stats["perplexity"]), max_probs=stats["max_probs"])
        for i in range(num_codebooks):
          metrics[f"code_usage_{i}"] = stats["usage"][i]
          metrics[f"perplexity_{i}"] = stats["perplexity"][i]
      if enc.posterior is not None:
        kl = jnp.mean(enc.posterior.kl())
        other = other + obj.kl_weight * kl
        metrics["kl"] = kl
      if obj.repa:
        teacher = nnx.merge(frozen.teacher, frozen_states["teacher"])
        target = teacher_features(teacher, images)
        align = repa_alignment_loss(model.projection, enc.quant, target, obj.repa_align,
                                    rng=k_repa)
        other = other + obj.repa_weight * align
        metrics["repa"] = align
      g_adv = jnp.zeros((), jnp.float32)
      new_disc_rest = disc_rest
      if obj.gan:
        # copy=True: the heads mutate their statistics, which NNX allows only for
        # variables created inside the differentiated function.
        heads = nnx.merge(disc_graphdef, jax.lax.stop_gradient(state.disc_params), disc_rest,
                          copy=True)
        logits_fake = call_d(heads, recon, k_gaug, k_gcrop)
        g_adv = gan.get_g_loss(obj.gen_loss)(logits_fake)
        new_disc_rest = _not_param(heads)
        metrics["g_adv_loss"] = g_adv
      return (nll + other, g_adv), (recon, metrics, new_disc_rest)

    w_d = (gan.adopt_weight(obj.disc_weight, global_step, obj.disc_start) if obj.gan
           else jnp.zeros((), jnp.float32))
    if obj.gan and obj.disc_adaptive_weight:
      # One forward, two backward passes: the adaptive factor needs both gradients at the
      # last layer (entropy, REPA and KL do not reach it, so this equals the reference's nll).
      (losses, vjp_fn, aux) = jax.vjp(lambda p: generator_losses(p, state.disc_rest),
                                      state.params, has_aux=True)
      one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
      (grads_nll,) = vjp_fn((one, zero))
      (grads_adv,) = vjp_fn((zero, one))
      adaptive = gan.adaptive_weight(_last_layer(grads_nll), _last_layer(grads_adv))
      grads = jax.tree.map(lambda a, b: a + (adaptive * w_d) * b, grads_nll, grads_adv)
      (loss_a, g_adv) = losses
    else:
      adaptive = jnp.ones((), jnp.float32)

      def total(p):
        (a, b), aux = generator_losses(p, state.disc_rest)
        return a + w_d * b, ((a, b), aux)
      (_, ((loss_a, g_adv), aux)), grads = jax.value_and_grad(total, has_aux=True)(state.params)
    recon, metrics, disc_rest = aux
    loss = loss_a + adaptive * w_d * g_adv
    params, opt_state, norms = optimizer_step(tx, grads, state.opt_state, state.params)
    metrics = dict(metrics)
    metrics.update(loss=loss, **norms)
    if learning_rate_fn is not None:
      metrics["learning_rate"] = learning_rate_fn(state.step)
    ema = ema_update(state.ema, params, ema_decay)

    # -------------------------------------------------------------- discriminator
    disc_params, disc_opt_state, lecam = state.disc_params, state.disc_opt_state, state.lecam
    if obj.gan:
      metrics.update(disc_weight=w_d, adaptive_weight=adaptive)
      fake = jax.lax.stop_gradient(recon).astype(jnp.float32)
      k = [next(keys) for _ in range(8)]

      def disc_loss(dparams):
        heads = nnx.merge(disc_graphdef, dparams, disc_rest, copy=True)
        logits_real = call_d(heads, images, k[0], k[1])
        logits_fake = call_d(heads, fake, k[2], k[3])
        strong = None
        if obj.disc_cr_weight:
          strong = (call_d(heads, images, k[4], k[5], diffaug.STRONG_POLICY, 1.0),
                    call_d(heads, fake, k[6], k[7], diffaug.STRONG_POLICY, 1.0))
        d_loss, new_lecam, d_metrics = gan.discriminator_objective(
            logits_real, logits_fake, global_step=global_step, disc_start=obj.disc_start,
            disc_weight=obj.disc_weight, loss=obj.disc_loss, lecam_state=state.lecam,
            lecam_weight=obj.lecam_weight, strong_logits=strong, cr_weight=obj.disc_cr_weight)
        return d_loss, (new_lecam, d_metrics, _not_param(heads))

      (_, (lecam, d_metrics, new_disc_rest)), d_grads = jax.value_and_grad(
          disc_loss, has_aux=True)(disc_params)
      disc_params, disc_opt_state, d_norms = optimizer_step(disc_tx, d_grads, disc_opt_state,
                                                            disc_params)
      disc_rest = new_disc_rest
      metrics.update(d_metrics)
      metrics.update(disc_grad_norm=d_norms["grad_norm"],
                     lecam_real_ema=lecam.logits_real_ema, lecam_fake_ema=lecam.logits_fake_ema)

    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                              disc_params=disc_params, disc_rest=disc_rest,
                              disc_opt_state=disc_opt_state, lecam=lecam)
    return new_state, metrics

  return LeafStep(step, state_shardings, (batch_sharding, frozen_shardings))


def init_stage1_state(model_fn, disc_fn, tx, disc_tx, seed: int) -> Stage1State:
  """The whole stage-1 state from seeds (called under ``jit`` with output shardings)."""
  key = jax.random.PRNGKey(seed)
  init_key, train_key, disc_key = jax.random.split(key, 3)
  model = model_fn(nnx.Rngs(params=init_key))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  heads = disc_fn(nnx.Rngs(params=disc_key))
  if heads is not None:
    _, dparams, drest = nnx.split(heads, nnx.Param, ...)
  else:
    dparams, drest = nnx.State({}), nnx.State({})
  return Stage1State(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                     opt_state=tx.init(params), ema=jax.tree.map(jnp.copy, params),
                     rng=train_key, disc_params=dparams, disc_rest=drest,
                     disc_opt_state=disc_tx.init(dparams), lecam=gan.LecamState.create())
