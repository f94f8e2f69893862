"""Stage 1: train a tokenizer on images with the reference's full objective.

Generator: MSE + LPIPS (linear warm-up, dropout on as in the reference) + hinge GAN
through the DINO discriminator after ``disc_start`` (optional adaptive weight) + SoftVQ
entropy + REPA alignment to a frozen DINOv2 teacher. Discriminator: frozen DINO ViT-S/16
features, spectral-norm/BatchNorm heads, hinge + LeCAM, consistency regularisation,
DiffAugment. Two Adam optimizers with the reference's cosine schedule, stepped in one
jitted step (``softvq_jax.train.stage1``); EMA of the generator; everything checkpointed.

Frozen backbones come from local files named in the config (``loss.disc_checkpoint``:
DINO ``dino_deitsmall16_pretrain.pth``; ``loss.repa_checkpoint``: timm DINOv2-L/14
weights); without one they are random and the run says so loudly. ``dinov2_checkpoint``
(timm DINOv2 weights of the encoder's size) starts the trained encoder when
``encoder_init="dinov2"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

import optax

from softvq_jax import checkpoint, parallel
from softvq_jax.checkpoint import TrainCheckpointer
from softvq_jax.models.config import TokenizerConfig
from softvq_jax.tokenizer import Tokenizer, param_shapes
from softvq_jax.train import common
from softvq_jax.train import stage1
from softvq_jax.train.loop import metrics_path, train_loop
from softvq_jax.utils import fs
from softvq_jax.utils.errors import JobError
from softvq_jax.utils.images import make_grid, save_png, to_uint8
from softvq_jax.utils.periodic import PeriodicHook



def resolve_source(data: ml_collections.ConfigDict, split: str):
  """A data source for ``split`` ('train' or 'eval') from ``config.data``."""
  from softvq_jax.data import sources  # pylint: disable=g-import-not-at-top
  kind = data.source
  # Empty strings are unset optional arguments (configs are locked, so they are declared).
  kwargs = {k: v for k, v in dict(data.get("kwargs", {}) or {}).items() if v != ""}
  if kind == "offline":
    try:
      return sources.FashionMnistSource("train" if split == "train" else "test")
    except FileNotFoundError as e:
      logging.warning("%s; using the scikit-image photos instead", e)
      return sources.SkimagePhotosSource(num_examples=256 if split == "train" else 16,
                                         seed=0 if split == "train" else 1)
  if kind == "latent_cache":
    raise JobError("data.source=latent_cache holds latents, not images")
  if kind not in sources.SOURCES:
    raise JobError(f"unknown data.source {kind!r}; choose one of offline, "
                   f"{', '.join(sources.SOURCES)}")
  if kind in ("tfds", "fashion_mnist") and "split" not in kwargs:
    kwargs["split"] = data.get("train_split" if split == "train" else "eval_split",
                               "train" if split == "train" else "test")
    if kind == "fashion_mnist" and split != "train" and kwargs["split"] not in ("train", "test"):
      kwargs["split"] = "test"  # its only held-out split (ImageNet recipes say "validation")
  if kind == "synthetic" and split != "train":
    kwargs["seed"] = kwargs.get("seed", 0) + 1
  kwargs, ignored = sources.split_kwargs(kind, kwargs)
  if ignored:
    logging.info("data.source=%s ignores data.kwargs %s", kind, sorted(ignored))
  missing = sources.required_arguments(kind) - set(kwargs)
  if missing:
    flags = " ".join(f"--config.data.kwargs.{name}=..." for name in sorted(missing))
    raise JobError(f"data.source={kind} needs data.kwargs {', '.join(sorted(missing))} "
                   f"(unset or empty): add {flags}")
  return sources.make_source(kind, **kwargs)


# Sources that hold one set of images: their "eval" split is the training images again.
SOURCES_WITHOUT_HELD_OUT_SPLIT = ("folder", "array_record", "skimage")


def held_out_source(config: ml_collections.ConfigDict, purpose: str):
  """The held-out images of a trainer: ``config.eval_data`` where its source is set, else
  the eval split of ``config.data``, which for an image folder or ArrayRecord files is the
  training images, said in a warning naming ``purpose``."""
  eval_data = config.get("eval_data")
  if eval_data and eval_data.get("source"):
    return resolve_source(eval_data, "eval")
  source = config.data.source
  if source in SOURCES_WITHOUT_HELD_OUT_SPLIT:
    flag_source, argument = {"array_record": ("array_record", "paths=GLOB")}.get(
        source, ("folder", "root=DIR"))
    logging.warning(
        "data.source=%s has no held-out split: the images of %s are TRAINING images, which "
        "measure fitting, not generalisation; name held-out ones with --config.eval_data.source=%s "
        "--config.eval_data.kwargs.%s", source, purpose, flag_source, argument)
  return resolve_source(config.data, "eval")


class ReconstructionGrid(PeriodicHook):
  """Every ``every`` steps: held-out images above their reconstructions by the EMA model."""

  def __init__(self, graphdef, images: np.ndarray, *, workdir: str, every: int,
               total_steps: int, writer=None):
    self.images, self.every, self.total, self.writer = images, every, total_steps, writer
    self.dir = os.path.join(workdir, "reconstructions")
    self.psnr = None

    def reconstruct(ema, rest, x):
      return nnx.merge(graphdef, ema, rest)(x)[0]

    self._reconstruct = jax.jit(reconstruct)

  def __call__(self, step: int, state) -> None:
    if not self.due(step):
      return
    recon = parallel.to_host(self._reconstruct(state.ema, state.rest, self.images))
    originals, recons = to_uint8(self.images), to_uint8(recon)
    mse = np.mean((originals.astype(np.float64) - recons) ** 2, axis=(1, 2, 3))
    self.psnr = float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))))
    grid = make_grid([originals, recons])
    if jax.process_index() == 0:
      save_png(os.path.join(self.dir, f"step_{step:08d}.png"), grid)
    if self.writer is not None:
      self.writer.write_images(step, {"reconstructions": grid[None]})
      self.writer.write_scalars(step, {"heldout_psnr": self.psnr})




# ------------------------------------------------------------------ optimizers
def timm_cosine_schedule(lr: float, *, total_steps: int, warmup_steps: int, warmup_lr: float,
                         min_lr: float):
  """timm's ``cosine`` scheduler stepped per update with ``warmup_prefix=False``.

  Linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup_steps``, then
  ``min_lr + (lr - min_lr) (1 + cos(pi t / T)) / 2`` with t counted from step 0, not
  from the end of the warm-up (so the curve is already slightly below ``lr`` when the
  warm-up ends), as the reference's ``create_scheduler_v2`` does.
  """
  total = max(int(total_steps), 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    cosine = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(math.pi * jnp.minimum(t, total) / total))
    if warmup_steps <= 0:
      return cosine
    warm = warmup_lr + (lr - warmup_lr) * t / warmup_steps
    return jnp.where(t < warmup_steps, warm, cosine)

  return schedule


def weight_decay_mask(params):
  """True where AdamW decays: the reference's ``param_groups_weight_decay`` skips every
  tensor of at most one dimension and every ``*.bias``."""
  def decays(path, leaf) -> bool:
    names = parallel.path_parts(path)
    return jnp.ndim(leaf) > 1 and not (names and names[-1] == "bias")
  return jax.tree_util.tree_map_with_path(decays, params)


def make_stage1_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
  """``(tx, schedule)``: Adam (the reference's default, no weight decay) or AdamW, clipped."""
  lr = float(optim.lr)
  if optim.get("schedule", "cosine") == "cosine":
    schedule = timm_cosine_schedule(
        lr, total_steps=total_steps, warmup_steps=int(optim.get("warmup_steps", 0)),
        warmup_lr=float(optim.get("warmup_lr", 0.0)),
        min_lr=float(optim.get("min_lr_ratio", 0.1)) * lr)
  elif optim.schedule == "constant":
    schedule = optax.constant_schedule(lr)
  else:
    raise JobError(f"optim.schedule must be 'cosine' or 'constant', got {optim.schedule!r}")
  name = optim.get("name", "adam")
  if name == "adam":
    base = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  elif name == "adamw":
    base = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.get("weight_decay", 0.0), mask=weight_decay_mask)
  else:
    raise JobError(f"optim.name must be 'adam' or 'adamw', got {name!r}")
  parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.get("grad_clip") else []
  return optax.chain(*parts, base), schedule


# -------------------------------------------------------------- frozen networks
def build_backbone(config: ml_collections.ConfigDict, dtype):
  """The discriminator's frozen DINO ViT-S/16 (or the size ``loss.disc_backbone`` gives)."""
  from softvq_jax.convert.timm_vit import load_timm_vit, warn_random_weights  # pylint: disable=g-import-not-at-top
  from softvq_jax.losses.discriminator import DinoBackbone  # pylint: disable=g-import-not-at-top
  kwargs = dict(config.loss.get("disc_backbone", {}) or {})
  backbone = DinoBackbone(rngs=nnx.Rngs(config.seed + 101), dtype=dtype, **kwargs)
  path = config.loss.get("disc_checkpoint", "")
  if path:
    load_timm_vit(backbone, path, zero_k_bias=True)
    logging.info("Discriminator backbone: DINO weights from %s", path)
  else:
    warn_random_weights("discriminator backbone", "dino_deitsmall16 (loss.disc_checkpoint)")
  return backbone


def build_teacher(config: ml_collections.ConfigDict, image_size: int, dtype):
  from softvq_jax.convert.timm_vit import repa_teacher  # pylint: disable=g-import-not-at-top
  return repa_teacher(config.loss.repa_model, config.loss.get("repa_checkpoint", "") or None,
                      image_size=image_size, patch_size=int(config.loss.get("repa_patch_size", 16)),
                      overrides=dict(config.loss.get("repa_model_kwargs", {}) or {}) or None,
                      dtype=dtype, seed=config.seed + 202)


def check_recipe_config(config: ml_collections.ConfigDict) -> None:
  """Refuses settings of recipes this trainer does not implement (MAETok's mask modeling)."""
  unsupported = {
      "mask_ratio_max": float(config.get("mask_ratio_max", 0.0) or 0.0) > 0,
      "mask_ratio_min": float(config.get("mask_ratio_min", 0.0) or 0.0) > 0,
      "decoder_drop_path": float(config.get("decoder_drop_path", 0.0) or 0.0) > 0,
      "aux_targets": bool(tuple(config.get("aux_targets", ()) or ())),
  }
  named = [f"{key}={config.get(key)!r}" for key, on in unsupported.items() if on]
  if named:
    raise JobError(
        f"{', '.join(named)}: MAETok's mask modeling (encoder token masking, decoder "
        "drop-path, auxiliary HOG/DINOv2/SigLIP decoders) is not implemented by this trainer; "
        "set mask_ratio_min/max=0, decoder_drop_path=0 and aux_targets=() to train the plain "
        "autoencoder objective")


def check_loss_config(config: ml_collections.ConfigDict, tok_config: TokenizerConfig) -> None:
  check_recipe_config(config)
  loss = config.loss
  if loss.get("reconstruction", "l2") not in ("l1", "l2"):
    raise JobError(f"loss.reconstruction={loss.reconstruction!r}; known: ['l1', 'l2']")
  group, batch = int(loss.get("entropy_group_size", 0) or 0), int(config.global_batch_size)
  if group < 0 or (0 < group < batch and batch % group):
    raise JobError(f"loss.entropy_group_size={group} must be 0 (the whole batch) or divide "
                   f"global_batch_size={batch}")
  if loss.get("disc_weight", 0) > 0 and loss.get("disc_type", "dino") != "dino":
    raise JobError(f"loss.disc_type={loss.disc_type!r}: only the DINO discriminator ('dino') "
                   "of the reference is implemented")
  for name in ("gen_loss", "disc_loss"):
    value = loss.get(name, "hinge")
    from softvq_jax.losses import gan  # pylint: disable=g-import-not-at-top
    table = gan.G_LOSSES if name == "gen_loss" else gan.D_LOSSES
    if value not in table:
      raise JobError(f"loss.{name}={value!r}; known: {sorted(table)}")
  if loss.get("repa", False):
    from softvq_jax.losses.repa import ALIGN_MODES  # pylint: disable=g-import-not-at-top
    if loss.repa_align not in ALIGN_MODES:
      raise JobError(f"loss.repa_align={loss.repa_align!r}; known: {ALIGN_MODES}")
    if tok_config.bottleneck != "softvq" and tok_config.bottleneck != "kl":
      raise JobError("REPA aligns the soft latents of a softvq/kl bottleneck")


# ------------------------------------------------------------------- the state
def stage1_shardings(abstract: stage1.Stage1State, mesh, strategy):
  """Generator leaves by the sharding strategy; the small discriminator replicated."""
  gen = parallel.state_shardings(abstract.generator(), mesh, strategy)
  replicated = jax.sharding.NamedSharding(parallel.auto_mesh(mesh), jax.sharding.PartitionSpec())
  rep = lambda tree: jax.tree.map(lambda _: replicated, tree)
  return stage1.Stage1State(step=gen.step, params=gen.params, rest=gen.rest,
                            opt_state=gen.opt_state, ema=gen.ema, rng=gen.rng,
                            disc_params=rep(abstract.disc_params),
                            disc_rest=rep(abstract.disc_rest),
                            disc_opt_state=rep(abstract.disc_opt_state),
                            lecam=rep(abstract.lecam))


def _replace_params(state, params):
  params = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), params, state.params)
  return state.replace(params=params, ema=jax.tree.map(jnp.copy, params))


# Settings that change the function without changing any parameter shape.
_SHAPE_FREE_VIT = ("num_heads", "mlp_ratio", "movq")
_SHAPE_FREE_TOKENIZER = ("bottleneck", "num_codebooks", "tau", "codebook_l2_norm", "use_rope",
                         "decoder_use_ape", "decoder_cls_token")


def check_init_from(directory: str, tok_config: TokenizerConfig) -> None:
  """Refuses a tokenizer directory built with other settings of the same shapes (twice the
  heads at one width...), which the shape check of the weights cannot see; warns when its
  latent statistics differ from the config's, which the exported tokenizer records."""
  theirs = TokenizerConfig.from_json_dict(checkpoint.read_config(directory, family="tokenizer"))
  differ = [f"{part}.{name}: {getattr(getattr(theirs, part), name)!r} there, "
            f"{getattr(getattr(tok_config, part), name)!r} here"
            for part in ("encoder", "decoder") for name in _SHAPE_FREE_VIT
            if getattr(getattr(theirs, part), name) != getattr(getattr(tok_config, part), name)]
  differ += [f"{name}: {getattr(theirs, name)!r} there, {getattr(tok_config, name)!r} here"
             for name in _SHAPE_FREE_TOKENIZER
             if getattr(theirs, name) != getattr(tok_config, name)]
  if differ:
    raise JobError(f"init_from={directory!r} is another tokenizer: " + "; ".join(differ))
  if (theirs.vq_mean, theirs.vq_std) != (tok_config.vq_mean, tok_config.vq_std):
    logging.warning(
        "init_from=%s has vq_mean/vq_std %s/%s, this config %s/%s, which the exported "
        "tokenizer will record; --config.model.vq_mean=%s --config.model.vq_std=%s keeps its own",
        directory, theirs.vq_mean, theirs.vq_std, tok_config.vq_mean, tok_config.vq_std,
        theirs.vq_mean, theirs.vq_std)


def _init_from(state, directory: str, tok_config: TokenizerConfig):
  """Starts from converted weights (parameters only; optimizer and EMA start fresh)."""
  check_init_from(directory, tok_config)
  flat = checkpoint.read_param_dir(directory, param_shapes(tok_config))
  params = jax.tree.map(lambda x: x, state.params)
  for path, value in flat.items():
    node = params["tokenizer"]
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = nnx.Param(jnp.asarray(value).astype(node[path[-1]].dtype))
  logging.info("Initialised the tokenizer parameters from %s", directory)
  return _replace_params(state, params)


def _init_encoder_from_dinov2(state, graphdef, path: str):
  """The reference starts its encoder from DINOv2 (resampled to 16-pixel patches)."""
  from softvq_jax.convert.timm_vit import load_timm_vit  # pylint: disable=g-import-not-at-top
  model = nnx.merge(graphdef, jax.tree.map(parallel.to_host, state.params),
                    jax.tree.map(parallel.to_host, state.rest))
  ignored = load_timm_vit(model.tokenizer.encoder.model, path)
  logging.info("Encoder initialised from DINOv2 weights %s (ignored: %s)", path, ignored)
  return _replace_params(state, nnx.state(model, nnx.Param))


# ---------------------------------------------------------------------- set-up
@dataclasses.dataclass
class Stage1Setup:
  """Everything a stage-1 step needs, built from a config (shared by ``run``, tests, AOT)."""

  tok_config: TokenizerConfig
  objective: stage1.Objective
  model_fn: Any
  disc_fn: Any
  tx: Any
  disc_tx: Any
  lr_fn: Any
  frozen_graphs: stage1.FrozenGraphs
  frozen_states: dict
  init: Any                # () -> Stage1State
  graphdef: Any
  disc_graphdef: Any

  def shardings(self, mesh, strategy: str = "dp"):
    return stage1_shardings(jax.eval_shape(self.init), mesh, strategy)

  def make_step(self, config, mesh, shardings):
    replicated = jax.sharding.NamedSharding(parallel.auto_mesh(mesh), jax.sharding.PartitionSpec())
    step = stage1.make_stage1_step(
        self.graphdef, self.disc_graphdef, self.frozen_graphs, self.objective, tx=self.tx,
        disc_tx=self.disc_tx, ema_decay=config.ema_decay,
        num_codebooks=self.tok_config.num_codebooks, state_shardings=shardings,
        batch_sharding=parallel.batch_sharding(parallel.auto_mesh(mesh)),
        frozen_shardings=jax.tree.map(lambda _: replicated, self.frozen_states),
        learning_rate_fn=self.lr_fn, kl_bottleneck=self.tok_config.bottleneck == "kl")
    return parallel.with_activation_sharding(step, mesh, common.sharding_rules(config))


def _split_frozen(module: nnx.Module):
  """``(graphdef, nested dict of arrays)`` of a network the step reads but never trains.

  It is an argument of every step: as plain dicts its arrays need no Python per call,
  where NNX variables are flattened one by one (``nnx.merge`` takes either).
  """
  graphdef, state = nnx.split(module)
  return graphdef, nnx.to_pure_dict(state)


def build_stage1(config: ml_collections.ConfigDict, *, total_steps: int,
                 steps_per_epoch: int = 1) -> Stage1Setup:
  from softvq_jax.eval.lpips import load_lpips  # pylint: disable=g-import-not-at-top
  from softvq_jax.losses.discriminator import DiscriminatorHeads  # pylint: disable=g-import-not-at-top
  tok_config = TokenizerConfig.from_json_dict(config.model.to_dict())
  check_loss_config(config, tok_config)
  objective = stage1.Objective.from_config(config)
  dtype = common.COMPUTE_DTYPES[config.get("dtype", "float32")]
  optim = ml_collections.ConfigDict(config.optim.to_dict())
  optim.lr = config.optim.lr * config.global_batch_size / 256  # the reference's scaling rule
  if config.optim.get("warmup_steps") is None:
    optim.warmup_steps = int(config.optim.get("warmup_epochs", 0) * steps_per_epoch)
  if optim.warmup_steps >= total_steps:
    logging.warning("The warm-up (%d steps) is as long as the run (%d steps): the learning rate "
                    "never reaches optim.lr. Set optim.warmup_steps (or warmup_epochs) lower.",
                    optim.warmup_steps, total_steps)
  frozen_graphs, frozen_states = {}, {}
  if objective.perceptual_weight > 0:
    frozen_graphs["lpips"], frozen_states["lpips"] = _split_frozen(
        load_lpips(dtype=None if config.loss.get("lpips_float32", False) else dtype))
  backbone = None
  if objective.gan:
    backbone = build_backbone(config, dtype)
    frozen_graphs["backbone"], frozen_states["backbone"] = _split_frozen(backbone)
  repa_dims = None
  if objective.repa:
    teacher = build_teacher(config, tok_config.image_size, dtype)
    repa_dims = (int(config.loss.repa_proj_dim), teacher.embed_dim)
    frozen_graphs["teacher"], frozen_states["teacher"] = _split_frozen(teacher)
  model_fn = lambda rngs: stage1.TrainableTokenizer(tok_config, repa_dims=repa_dims, rngs=rngs,
                                                    dtype=dtype)
  if objective.gan:
    channels, taps = backbone.embed_dim, backbone.num_features
    disc_fn = lambda rngs: DiscriminatorHeads(channels, taps, rngs=rngs, dtype=dtype)
  else:
    disc_fn = lambda rngs: None
  tx, lr_fn = make_stage1_optimizer(optim, total_steps)
  disc_optim = ml_collections.ConfigDict(optim.to_dict())
  overrides = {k: v for k, v in dict(config.get("disc_optim", {}) or {}).items()
               if v is not None}  # unset placeholders keep optim's value
  if "lr" in overrides:
    overrides["lr"] *= config.global_batch_size / 256  # scaled as optim.lr is
  disc_optim.update(overrides)
  disc_tx, _ = make_stage1_optimizer(disc_optim, total_steps)
  init = functools.partial(stage1.init_stage1_state, model_fn, disc_fn, tx, disc_tx, config.seed)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
  disc_graphdef = (nnx.graphdef(nnx.eval_shape(lambda: disc_fn(nnx.Rngs(0))))
                   if objective.gan else None)
  return Stage1Setup(tok_config, objective, model_fn, disc_fn, tx, disc_tx, lr_fn,
                     stage1.FrozenGraphs(**frozen_graphs), frozen_states, init, graphdef,
                     disc_graphdef)


def init_or_restore(setup: Stage1Setup, mesh, *, strategy: str, workdir: str, keep: int,
                    data=None, config: ml_collections.ConfigDict | None = None):
  """Restores the latest checkpoint of ``workdir`` or initialises; ``(state, shardings, ckpt)``.

  ``config``: the job config, compared with the one that wrote the checkpoint.
  """
  abstract = jax.eval_shape(setup.init)
  shardings = stage1_shardings(abstract, mesh, strategy)
  ckpt = TrainCheckpointer(os.path.join(fs.abspath(workdir), "checkpoints"), keep=keep)
  # Loss weights carried in the model config may change between runs; the architecture not.
  try:
    common.check_resumable(ckpt, {"tokenizer": setup.tok_config.to_json_dict()},
                           ignore=("entropy_loss_ratio", "entropy_temperature", "kl_loss_weight"))
    if config is not None:
      common.warn_of_other_run_settings(ckpt, config)
  except ValueError:
    ckpt.close()
    raise
  latest = ckpt.latest_step()
  if latest is None:
    state = jax.jit(setup.init, out_shardings=shardings)()
    logging.info("Initialised a new stage-1 state")
  else:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    state, data_state, _ = ckpt.restore(target, latest)
    if data is not None and data_state:
      data.set_state(data_state)
    logging.info("Resumed stage 1 from step %d of %s", latest, ckpt.directory)
  return state, shardings, ckpt


# ------------------------------------------------------------------------- run
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from softvq_jax.data.pipeline import image_pipeline  # pylint: disable=g-import-not-at-top

  common.check_run_settings(config, steps_from_epochs=True)
  fs.makedirs(workdir)
  mesh = common.make_mesh(config)
  common.check_batch(config.global_batch_size, mesh)
  train_source = resolve_source(config.data, "train")
  steps_per_epoch = max(len(train_source) // config.global_batch_size, 1)
  total_steps = int(config.get("total_steps", 0) or config.total_epochs * steps_per_epoch)
  setup = build_stage1(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  common.warn_if_the_ema_stays_near_init(config.ema_decay, total_steps)
  tok_config = setup.tok_config
  size = tok_config.image_size
  logging.info("Training %s tokenizer on %s (%d images): %d steps; objective %s",
               tok_config.bottleneck, getattr(train_source, "name", config.data.source),
               len(train_source), total_steps, setup.objective)
  local_batch = config.global_batch_size // jax.process_count()
  data = iter(image_pipeline(train_source, batch_size=local_batch, image_size=size, train=True,
                             seed=config.seed, min_resize=config.data.get("min_resize"),
                             max_resize=config.data.get("max_resize"),
                             flip=config.data.get("horizontal_flip", True),
                             max_skipped=config.get("max_skipped", 100),
                             image_dtype="uint8"))  # the step maps them to [-1, 1]
  replicated = jax.sharding.NamedSharding(parallel.auto_mesh(mesh), jax.sharding.PartitionSpec())
  frozen_states = jax.device_put(setup.frozen_states, replicated)
  state, shardings, ckpt = init_or_restore(setup, mesh, strategy=common.sharding_rules(config),
                                           workdir=workdir,
                                           keep=config.get("keep_checkpoints", 3), data=data,
                                           config=config)
  graphdef = setup.graphdef
  if int(state.step) == 0:
    if config.get("init_from"):
      state = _init_from(state, config.init_from, tok_config)
    elif config.get("encoder_init", "random") == "dinov2":
      if config.get("dinov2_checkpoint"):
        state = _init_encoder_from_dinov2(state, graphdef, config.dinov2_checkpoint)
      else:
        logging.warning("encoder_init='dinov2' but no dinov2_checkpoint is given: the encoder "
                        "starts from RANDOM weights (the reference starts it from DINOv2)")
    elif config.get("dinov2_checkpoint"):
      logging.warning("dinov2_checkpoint=%s is not read: encoder_init=%r (set "
                      "encoder_init='dinov2' to start the encoder from it)",
                      config.dinov2_checkpoint, config.get("encoder_init", "random"))
  common.log_parameter_overview(state)
  step_fn = setup.make_step(config, mesh, shardings)

  writer = common.make_writer(workdir, resumed_step=int(state.step))
  eval_source = held_out_source(
      config, "the reconstruction grid" + (" and the held-out rFID" if config.get("eval_every")
                                           else ""))
  # The same images on every process (the grid's PSNR is logged, and the reconstruct program
  # is replicated): not this host's shard.
  heldout = next(iter(image_pipeline(eval_source, batch_size=min(8, len(eval_source)),
                                     image_size=size, train=False, shard_index=0,
                                     shard_count=1)))["image"]
  grid = ReconstructionGrid(graphdef, heldout, workdir=workdir, every=config.vis_every,
                            total_steps=total_steps, writer=writer)
  hooks = [grid]
  rfid = None
  if config.get("eval_every", 0):
    from softvq_jax.eval.hooks import HeldoutRFID  # pylint: disable=g-import-not-at-top
    count = min(int(config.get("eval_num_images", 256)), len(eval_source))
    images = next(iter(image_pipeline(eval_source, batch_size=count, image_size=size,
                                      train=False, shard_index=0, shard_count=1)))["image"]
    rfid = HeldoutRFID(graphdef, images, every=config.eval_every, total_steps=total_steps,
                       writer=writer, lpips=bool(config.get("eval_lpips", False)),
                       jsonl_path=metrics_path(workdir))
    hooks.append(rfid)
  state, last = train_loop(state=state, train_step=step_fn, data=data, mesh=mesh, workdir=workdir,
                           total_steps=total_steps, checkpointer=ckpt, log_every=config.log_every,
                           ckpt_every=config.ckpt_every, hooks=tuple(hooks), writer=writer,
                           meta={"tokenizer": tok_config.to_json_dict(),
                                 common.RUN_CONFIG_META: common.run_config_record(config)},
                           step_args=(frozen_states,), **common.profile_options(config))
  ckpt.close()
  if grid.psnr is not None:
    last["heldout_psnr"] = grid.psnr
  if rfid is not None and rfid.last:
    last.update({f"heldout_{k}": v for k, v in rfid.last.items()})
  export_dir = os.path.join(workdir, "tokenizer")
  if int(state.step) >= total_steps:
    # Every process takes part in reading (sharded leaves are gathered); one writes.
    ema, rest = (jax.tree.map(parallel.to_host, t) for t in (state.ema, state.rest))
    if jax.process_index() == 0:
      ema_model = nnx.merge(graphdef, ema, rest)
      Tokenizer(ema_model.tokenizer).save(export_dir, overwrite=True)
      logging.info("Exported the EMA tokenizer to %s (load with Tokenizer.load)", export_dir)
  return last
