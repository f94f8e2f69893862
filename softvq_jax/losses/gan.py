"""GAN losses of the stage-1 objective (the reference's ``losses/vq_loss.py``), in float32.

Discriminator step of the reference, per training step ``s`` (= steps done + 1):

  w_d      = adopt_weight(disc_weight, s, disc_start)
  ema      = lecam_update(ema, D(aug(x)), D(aug(x_hat)))      # before the regulariser
  L_D      = w_d * (lecam_weight * lecam_reg(..., ema) + hinge_d_loss(...))
           + (cr_weight if s >= disc_start else 0) * consistency_loss(...)   # not times w_d

``discriminator_objective`` computes exactly that. The generator side is
``adaptive * adopt_weight(disc_weight, s, disc_start) * hinge_g_loss(D(aug(x_hat)))``.

Everything here reduces over the whole array it is given. Under ``jit`` with
batch-sharded global arrays that is the global batch; the reference's DDP
ranks each average their own rows (identical for the losses, whose gradients
DDP averages) and each keep their own LeCAM EMAs of *local* means, which we
replace by one EMA of the global means.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


def _f32(x: Array) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


# ----------------------------------------------------------------------------
# Adversarial losses.

def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
                + jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake))))


def vanilla_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat)))."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-_f32(logits_real)))
                + jnp.mean(jax.nn.softplus(_f32(logits_fake))))


def _bce_with_logits(logits: Array, targets: Array) -> Array:
  """Elementwise torch ``binary_cross_entropy_with_logits(logits, targets)``."""
  return jax.nn.relu(logits) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def non_saturating_d_loss(logits_real: Array, logits_fake: Array, *,
                          reproduce_reference_bug: bool = False) -> Array:
  """BCE D loss: real -> 1, fake -> 0 (equals ``vanilla_d_loss``).

  The reference passes the arguments of ``binary_cross_entropy_with_logits``
  swapped (the constant labels as logits, the logits as targets), giving
  ``0.5 * (softplus(1) - mean D(x) + log 2)``: no gradient from fakes and an
  unbounded push on reals. ``reproduce_reference_bug=True`` computes that; it
  is not used by any released config (they use hinge).
  """
  real, fake = _f32(logits_real), _f32(logits_fake)
  if reproduce_reference_bug:
    loss_real = jnp.mean(_bce_with_logits(jnp.ones_like(real), real))
    loss_fake = jnp.mean(_bce_with_logits(jnp.zeros_like(fake), fake))
  else:
    loss_real = jnp.mean(_bce_with_logits(real, jnp.ones_like(real)))
    loss_fake = jnp.mean(_bce_with_logits(fake, jnp.zeros_like(fake)))
  return 0.5 * (loss_real + loss_fake)


def hinge_g_loss(logits_fake: Array) -> Array:
  """-mean D(x_hat)."""
  return -jnp.mean(_f32(logits_fake))


def non_saturating_g_loss(logits_fake: Array, *, reproduce_reference_bug: bool = False) -> Array:
  """mean softplus(-D(x_hat)); the reference's swapped form is ``softplus(1) - mean D(x_hat)``."""
  fake = _f32(logits_fake)
  if reproduce_reference_bug:
    return jnp.mean(_bce_with_logits(jnp.ones_like(fake), fake))
  return jnp.mean(_bce_with_logits(fake, jnp.ones_like(fake)))


D_LOSSES: dict[str, Callable[..., Array]] = {
    "hinge": hinge_d_loss,
    "vanilla": vanilla_d_loss,
    "non-saturating": non_saturating_d_loss,
}
G_LOSSES: dict[str, Callable[..., Array]] = {
    "hinge": hinge_g_loss,
    "non-saturating": non_saturating_g_loss,
}


def get_d_loss(name: str) -> Callable[[Array, Array], Array]:
  if name not in D_LOSSES:
    raise ValueError(f"unknown discriminator loss {name!r}; expected one of {sorted(D_LOSSES)}")
  return D_LOSSES[name]


def get_g_loss(name: str) -> Callable[[Array], Array]:
  if name not in G_LOSSES:
    raise ValueError(f"unknown generator adversarial loss {name!r}; expected one of {sorted(G_LOSSES)}")
  return G_LOSSES[name]


# ----------------------------------------------------------------------------
# Weights.

def adopt_weight(weight: Any, global_step: Any, threshold: int = 0, value: float = 0.0) -> Array:
  """``value`` before ``threshold`` (disc_start), ``weight`` from it on; works on traced steps.

  The reference passes ``global_step = steps done + 1``.
  """
  return jnp.where(jnp.asarray(global_step) < threshold, _f32(value), _f32(weight))


def _sum_squares(tree: Any) -> Array:
  leaves = jax.tree.leaves(tree)
  return sum(jnp.sum(jnp.square(_f32(g))) for g in leaves) if leaves else jnp.zeros((), jnp.float32)


def adaptive_weight(nll_grads: Any, g_grads: Any, *, eps: float = 1e-4,
                    max_value: float = 1e4) -> Array:
  """||grad L_nll|| / (||grad L_adv|| + 1e-4), clamped to [0, 1e4], without gradient.

  Both arguments are gradients with respect to the decoder's last layer (the
  reference uses the ``to_pixel`` weight alone); a pytree is flattened into
  one vector, so passing just that weight matches the reference.
  """
  ratio = jnp.sqrt(_sum_squares(nll_grads)) / (jnp.sqrt(_sum_squares(g_grads)) + eps)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_value))


# ----------------------------------------------------------------------------
# LeCAM regulariser.

@flax.struct.dataclass
class LecamState:
  """EMAs of the mean real and fake logits (float32 scalars): checkpointable pytree."""

  logits_real_ema: Array
  logits_fake_ema: Array

  @classmethod
  def create(cls, init: float = 0.0) -> "LecamState":
    return cls(jnp.full((), init, jnp.float32), jnp.full((), init, jnp.float32))


def lecam_update(state: LecamState, logits_real: Array, logits_fake: Array, *,
                 decay: float = 0.999) -> LecamState:
  """EMA step with the batch-mean logits; the means carry no gradient (the reference uses ``.item()``)."""
  real = jax.lax.stop_gradient(jnp.mean(_f32(logits_real)))
  fake = jax.lax.stop_gradient(jnp.mean(_f32(logits_fake)))
  # The reference keeps these EMAs as float64 Python floats. In float32, ``ema * decay + x *
  # (1 - decay)`` drifts from them by ~2e-5 relative over 1e5 steps (0.999 is not exact in
  # float32, which biases the steady state); the equivalent ``ema + (x - ema) * (1 - decay)``
  # stays within ~2e-6.
  rate = 1.0 - decay
  return LecamState(state.logits_real_ema + (real - state.logits_real_ema) * rate,
                    state.logits_fake_ema + (fake - state.logits_fake_ema) * rate)


def lecam_reg(logits_real: Array, logits_fake: Array, state: LecamState) -> Array:
  """mean relu(D(x) - ema_fake)^2 + mean relu(ema_real - D(x_hat))^2."""
  ema_real = jax.lax.stop_gradient(state.logits_real_ema)
  ema_fake = jax.lax.stop_gradient(state.logits_fake_ema)
  return (jnp.mean(jnp.square(jax.nn.relu(_f32(logits_real) - ema_fake)))
          + jnp.mean(jnp.square(jax.nn.relu(ema_real - _f32(logits_fake)))))


def lecam_loss(logits_real: Array, logits_fake: Array, state: LecamState, *,
               decay: float = 0.999) -> tuple[Array, LecamState]:
  """The reference's order: update the EMAs with this batch, then regularise against the new EMAs."""
  new_state = lecam_update(state, logits_real, logits_fake, decay=decay)
  return lecam_reg(logits_real, logits_fake, new_state), new_state


# ----------------------------------------------------------------------------
# Consistency regularisation.

def consistency_loss(logits_real: Array, logits_fake: Array, logits_real_strong: Array,
                     logits_fake_strong: Array) -> Array:
  """MSE between [D(aug(x)), D(aug(x_hat))] and the same under the strong augmentation.

  Gradients flow into both sides, as torch's ``mse_loss`` of two live tensors.
  The strong augmentation is ``diffaug.STRONG_POLICY`` at ``prob=1.0``.
  """
  plain = jnp.concatenate([_f32(logits_real), _f32(logits_fake)], axis=0)
  strong = jnp.concatenate([_f32(logits_real_strong), _f32(logits_fake_strong)], axis=0)
  return jnp.mean(jnp.square(plain - strong))


# ----------------------------------------------------------------------------
# The whole discriminator objective.

def discriminator_objective(
    logits_real: Array,
    logits_fake: Array,
    *,
    global_step: Any,
    disc_start: int,
    disc_weight: float,
    loss: str = "hinge",
    lecam_state: LecamState | None = None,
    lecam_weight: float | None = None,
    lecam_decay: float = 0.999,
    strong_logits: tuple[Array, Array] | None = None,
    cr_weight: float = 0.0,
) -> tuple[Array, LecamState | None, dict[str, Array]]:
  """The reference's discriminator loss; returns (loss, new LeCAM state, metrics).

  ``lecam_weight=None`` disables LeCAM (the state is returned unchanged);
  ``strong_logits = (D(strong(x)), D(strong(x_hat)))`` enables consistency
  regularisation when ``cr_weight`` is non-zero. The LeCAM EMAs move even
  before ``disc_start``, as in the reference, whose D step runs every step.
  """
  w_d = adopt_weight(disc_weight, global_step, disc_start)
  adv = get_d_loss(loss)(logits_real, logits_fake)
  metrics = {"d_adv_loss": adv, "disc_weight": w_d,
             "logits_real": jnp.mean(_f32(logits_real)),
             "logits_fake": jnp.mean(_f32(logits_fake))}
  if lecam_weight is not None:
    if lecam_state is None:
      raise ValueError("lecam_weight is set but no lecam_state was given")
    reg, lecam_state = lecam_loss(logits_real, logits_fake, lecam_state, decay=lecam_decay)
    total = w_d * (lecam_weight * reg + adv)
    metrics["lecam_reg"] = reg
  else:
    total = w_d * adv
  if cr_weight and strong_logits is not None:
    cr = consistency_loss(logits_real, logits_fake, *strong_logits)
    total = total + adopt_weight(cr_weight, global_step, disc_start) * cr
    metrics["d_cr_loss"] = cr
  metrics["d_loss"] = total
  return total, lecam_state, metrics
