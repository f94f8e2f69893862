"""Stage 2: SiT (flow matching) on the tokenizer's normalised latents.

Latents are ``(z - vq_mean) / vq_std`` of the tokenizer's ``encode`` (and of
the horizontally flipped image, one of the two picked at random per example,
as the reference's cached-latent loader does). Until a latent cache is given,
the images of ``config.data`` are encoded once at start-up.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from softvq_jax import parallel
from softvq_jax.models.layers import inference_compiler_options
from softvq_jax.models.config import ConfigError
from softvq_jax.models.sit import GeneratorConfig, SiT
from softvq_jax.tokenizer import Tokenizer
from softvq_jax.train import common
from softvq_jax.train import state as state_lib
from softvq_jax.train.inputs import ArrayIterator
from softvq_jax.train.loop import metrics_path, train_loop
from softvq_jax.transport.loss import sit_loss
from softvq_jax.transport.samplers import euler_sampler
from softvq_jax.utils import fs
from softvq_jax.utils.errors import JobError
from softvq_jax.utils.images import make_grid, samples_to_uint8, save_png, to_uint8
from softvq_jax.utils.periodic import PeriodicHook


def load_tokenizer(config: ml_collections.ConfigDict, mesh=None) -> Tokenizer:
  if config.get("tokenizer_dir"):
    return Tokenizer.load(config.tokenizer_dir, mesh=mesh)
  logging.warning("No tokenizer_dir: encoding with a RANDOMLY INITIALISED tokenizer (seed %d); "
                  "its latents carry little about the images.", config.seed)
  return Tokenizer.random(config.tokenizer.to_dict(), seed=config.seed, mesh=mesh)


def load_images(data: ml_collections.ConfigDict, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(images NHWC in [-1, 1], int labels) of a small in-memory dataset."""
  if data.source == "skimage":
    from softvq_jax.data.photos import skimage_photos  # pylint: disable=g-import-not-at-top
    images, _ = skimage_photos(image_size)
    return images, np.arange(len(images), dtype=np.int32) % data.num_classes
  if data.source == "synthetic":
    rng = np.random.default_rng(data.get("seed", 0))
    n = data.num_examples
    labels = (np.arange(n) % data.num_classes).astype(np.int32)
    # Smooth class-dependent colour fields: learnable, and cheap to make.
    yy, xx = np.meshgrid(np.linspace(-1, 1, image_size), np.linspace(-1, 1, image_size),
                         indexing="ij")
    base = np.stack([np.sin(3 * xx), np.cos(3 * yy), xx * yy], -1)[None]
    phase = (labels[:, None, None, None] + 1) / data.num_classes
    images = np.clip(base * phase + 0.1 * rng.normal(size=(n, image_size, image_size, 3)), -1, 1)
    return images.astype(np.float32), labels
  raise JobError(f"unknown data.source {data.source!r}; supported: 'latent_cache' (with "
                 "data.cache_dir, written by configs/extract_latents.py), 'skimage', "
                 "'synthetic'")


def encode_dataset(tok: Tokenizer, images: np.ndarray, batch_size: int) -> np.ndarray:
  """Normalised latents of each image and of its mirror image: ``(N, 2, L, d)``."""
  out = []
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    z = tok.normalize(tok.encode(chunk))
    z_flip = tok.normalize(tok.encode(chunk[:, :, ::-1]))
    out.append(np.stack([parallel.to_host(z), parallel.to_host(z_flip)], axis=1))
  return np.concatenate(out)


def _cache_iterator(config: ml_collections.ConfigDict, tok: Tokenizer, num_classes: int):
  """Normalised latents from a cache written by ``softvq_jax.data.cache_latents``."""
  from softvq_jax.data.cache_latents import LatentCacheSource, latent_pipeline  # pylint: disable=g-import-not-at-top
  source = LatentCacheSource(config.data.cache_dir)
  info = source.info
  if tuple(info["latent_shape"]) != tuple(tok.latent_shape):
    raise JobError(f"latent cache {config.data.cache_dir} holds latents {info['latent_shape']}, "
                   f"the tokenizer makes {tok.latent_shape}")
  from softvq_jax.data.cache_latents import same_tokenizer, tokenizer_fingerprint  # pylint: disable=g-import-not-at-top
  if "tokenizer" in info:
    ours = tokenizer_fingerprint(tok)
    if not same_tokenizer(info["tokenizer"], ours):
      raise JobError(f"latent cache {config.data.cache_dir} was written by another tokenizer "
                     f"(fingerprint {info['tokenizer']}, this run's tokenizer_dir gives "
                     f"{ours}): its latents would be decoded wrongly")
  if (info["vq_mean"], info["vq_std"]) != (tok.config.vq_mean, tok.config.vq_std):
    raise JobError(f"latent cache {config.data.cache_dir} was written with vq_mean/vq_std "
                   f"{info['vq_mean']}/{info['vq_std']}, the tokenizer has "
                   f"{tok.config.vq_mean}/{tok.config.vq_std}")
  data_classes = info.get("num_classes")  # recorded by caches written since it was added
  if data_classes and data_classes > num_classes:
    raise JobError(f"latent cache {config.data.cache_dir} holds {data_classes} classes, the "
                   f"generator has num_classes={num_classes}: set --config.model.num_classes="
                   f"{data_classes}")
  if data_classes and data_classes < num_classes:
    logging.warning("latent cache %s holds %d classes, the generator is built for "
                    "num_classes=%d: classes %d to %d are never trained, yet class-balanced "
                    "sampling draws them; for your own data set --config.model.num_classes=%d",
                    config.data.cache_dir, data_classes, num_classes, data_classes,
                    num_classes - 1, data_classes)
  logging.info("Training on %d cached latents from %s", len(source), config.data.cache_dir)
  return iter(latent_pipeline(source, batch_size=config.global_batch_size // jax.process_count(),
                              train=True, seed=config.seed, normalize=True,
                              num_classes=num_classes))


def latent_data(config: ml_collections.ConfigDict, tok: Tokenizer, num_classes: int):
  """Checkpointable iterator of normalised latent batches: a latent cache, or images encoded now.

  Labels must lie in ``[0, num_classes)``, the generator's classes. A ``data.cache_dir``
  selects the cache whatever ``data.source`` says (a ``:runlocal`` run pointed at a cache).
  """
  if config.data.source == "latent_cache" or config.data.get("cache_dir"):
    if config.data.source != "latent_cache":
      logging.info("data.cache_dir is set: training on that latent cache, not data.source=%r",
                   config.data.source)
    return _cache_iterator(config, tok, num_classes)
  images, labels = load_images(config.data, tok.image_size)
  if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
    raise JobError(f"data.source={config.data.source!r} gives labels in [{labels.min()}, "
                   f"{labels.max()}], the generator has num_classes={num_classes}: set "
                   "data.num_classes and model.num_classes alike")
  latents = encode_dataset(tok, images, config.get("encode_batch_size", 16))
  logging.info("Encoded %d images into latents %s (and their mirror images)", len(images),
               latents.shape[2:])
  return ArrayIterator({"latent": latents, "label": labels}, config.global_batch_size,
                       seed=config.seed, process_index=jax.process_index(),
                       process_count=jax.process_count(), transform=pick_flip)


def pick_flip(batch, rng):
  choice = rng.integers(0, 2, len(batch["latent"]))
  return {"latent": batch["latent"][np.arange(len(choice)), choice], "label": batch["label"]}


# Options of the training graph, not of the architecture (the checkpoint layout of a
# scanned model converts with models.sit.stack_layers / unstack_layers).
_GRAPH_OPTIONS = ("scan_layers", "remat_policy")


def generator_config(config: ml_collections.ConfigDict, tok: Tokenizer,
                     kind: str = "sit") -> GeneratorConfig:
  fields = {k: v for k, v in config.model.to_dict().items() if k not in _GRAPH_OPTIONS}
  fields.update(input_size=tok.latent_shape[0], in_channels=tok.latent_shape[1], vae_1d=True)
  if kind == "dit":
    fields.setdefault("learn_sigma", True)
    # The process it is trained on travels with the exported model (samplers respace it).
    fields.update(noise_schedule=config.diffusion.noise_schedule,
                  diffusion_steps=config.diffusion.num_steps)
  return GeneratorConfig.from_json_dict(fields, kind=kind)


def graph_options(config: ml_collections.ConfigDict) -> dict:
  """The configured graph options, ``"auto"`` left as is (see :func:`resolve_scan_layers` and
  :class:`AutoRematStep`)."""
  return {k: config.model[k] for k in _GRAPH_OPTIONS if k in config.model}


# What remat_policy="auto" falls back to when the step without rematerialisation does not fit
# in AUTO_MEMORY_FRACTION of the device memory (the rest is left to the samplers and the
# allocator's fragmentation).
AUTO_REMAT_POLICY = "dots_with_no_batch_dims_saveable"
AUTO_MEMORY_FRACTION = 0.85


def stacked_layout(state_paths: list[tuple[str, ...]]) -> bool | None:
  """Whether a saved train state holds scanned (stacked) blocks; None if it has no blocks."""
  blocks = [p for p in state_paths if len(p) > 2 and p[:2] == ("params", "blocks")]
  if not blocks:
    return None
  return not all(p[2].isdigit() for p in blocks)


def resolve_scan_layers(value, *, state_paths: list[tuple[str, ...]] | None = None,
                        platform: str | None = None) -> bool:
  """``config.model.scan_layers``: true, false, or ``"auto"``.

  ``"auto"`` resumes in the layout of the checkpoint being resumed (``state_paths``, its
  saved key paths), and otherwise scans everywhere but on GPUs. On a GPU the scanned step
  writes every block's saved activations into stacked buffers and reads them back: compiled
  for an H200, the SiT-XL batch-256 step moves 66% more bytes (146 vs 107 ms estimated,
  ``bench --what kernels --scan``). On TPUs scanning keeps compile time flat in depth.
  """
  stacked = stacked_layout(state_paths) if state_paths else None
  if value == "auto":
    if stacked is not None:
      return stacked
    return (platform or jax.default_backend()) != "gpu"
  if not isinstance(value, bool):
    raise ConfigError(f"config.model.scan_layers must be true, false or 'auto', got {value!r}")
  if stacked is not None and stacked != value:
    raise ConfigError(
        f"config.model.scan_layers={value}, but the checkpoint being resumed was written "
        f"with scan_layers={stacked} (parameters {'stacked' if stacked else 'per block'}); "
        f"set scan_layers={stacked} or 'auto' to resume it")
  return value


def device_memory_limit() -> int | None:
  """Bytes the first local device can allocate, or None where it reports none (CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


class AutoRematStep:
  """The train step of ``remat_policy="auto"``, chosen on its first call.

  It compiles the step without rematerialisation for the first batch and keeps it if
  XLA's memory analysis of it fits in ``AUTO_MEMORY_FRACTION`` of ``memory_limit``
  (always, where the device reports no limit); otherwise it takes the step with
  ``AUTO_REMAT_POLICY``. Rematerialising costs a partial second forward pass (estimated
  11% of the SiT-XL batch-256 step on an H200), so it is only paid where memory needs it.
  ``make_step(policy)`` returns the jitted step of that policy. When the plain step is
  kept, the program compiled for the check is the one later calls run (JAX caches it);
  otherwise the rematerialised step compiles on the first call.
  """

  takes_leaf_state = True  # the steps it chooses between are LeafSteps

  def __init__(self, make_step: Callable[[str], Any], mesh, rules, *,
               memory_limit: int | None):
    self.make_step = make_step
    self.mesh = mesh
    self.rules = rules
    self.memory_limit = memory_limit
    self._step = None
    self.policy: str | None = None
    self.needed_bytes: int | None = None

  def __call__(self, state, batch, *args):
    if self._step is None:
      self._choose(state, batch, *args)
    return self._step(state, batch, *args)

  def _choose(self, *args) -> None:
    step = self.make_step("none")
    with parallel.activation_sharding(self.mesh, self.rules):
      compiled = step.lower(*args).compile()
    self.needed_bytes = state_lib.compiled_memory(compiled).get("per_device_total_bytes")
    budget = (None if self.memory_limit is None
              else int(AUTO_MEMORY_FRACTION * self.memory_limit))
    fits = budget is None or self.needed_bytes is None or self.needed_bytes <= budget
    if jax.process_count() > 1:
      # Every process must compile the same program: the plain step only if it fits on all.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      fits = bool(np.min(multihost_utils.process_allgather(np.int32(fits))))
    if fits:
      self.policy = "none"
    else:
      self.policy = AUTO_REMAT_POLICY
      step = self.make_step(AUTO_REMAT_POLICY)
    logging.info("remat_policy=auto: the step without rematerialisation needs %s GiB per "
                 "device, %s; using %r",
                 "?" if self.needed_bytes is None else f"{self.needed_bytes / 2**30:.2f}",
                 "no memory budget on this platform" if budget is None
                 else f"the budget is {budget / 2**30:.2f} GiB", self.policy)
    self._step = parallel.with_activation_sharding(step, self.mesh, self.rules)


def make_loss_fn(transport: ml_collections.ConfigDict):
  def loss_fn(model: SiT, batch, key, step):
    del step
    out = sit_loss(lambda x, t, y, k: model(x, t, y, drop_key=k), batch["latent"], batch["label"],
                   key, path=transport.path, weighting=transport.weighting)
    return jnp.mean(out["loss"]), {}
  return loss_fn


def ema_sampler(graphdef, gen_config: GeneratorConfig, *, num_steps: int, cfg_scale: float):
  """``(state, noise, labels, batch=0) -> latents``: Euler ODE samples of the EMA model,
  compiled once per batch shape (the sample grid's and the FID hook's sampler). The ODE
  draws no noise of its own, so the batch index changes nothing."""
  null = gen_config.null_label
  if cfg_scale > 1.0 and not gen_config.has_null_label:
    raise JobError(f"sample.cfg_scale={cfg_scale}: classifier-free guidance needs the null-"
                   "class row, which a model trained with class_dropout_prob=0 does not have")

  def sample(ema, rest, noise, labels):
    model = nnx.merge(graphdef, ema, rest)
    velocity = lambda x, t, y, k=None: model(x, t, y)
    return euler_sampler(velocity, noise, labels, num_steps=num_steps, cfg_scale=cfg_scale,
                         null_label=null)

  jitted = jax.jit(sample, compiler_options=inference_compiler_options())
  return lambda state, noise, labels, batch=0: jitted(state.ema, state.rest, noise, labels)


class SampleGrid(PeriodicHook):
  """Every ``every`` steps: Euler ODE samples of the EMA model, decoded, as a PNG grid."""

  def __init__(self, graphdef, tok: Tokenizer, gen_config: GeneratorConfig, *, workdir: str,
               every: int, total_steps: int, num: int, num_steps: int, cfg_scale: float, seed: int,
               writer=None):
    self.tok, self.every, self.total, self.writer = tok, every, total_steps, writer
    self.dir = os.path.join(workdir, "samples")
    key = jax.random.key(seed)
    self.noise = jax.random.normal(key, (num,) + gen_config.latent_shape)
    self.labels = jnp.arange(num) % gen_config.num_classes  # class-balanced
    self._sample = ema_sampler(graphdef, gen_config, num_steps=num_steps, cfg_scale=cfg_scale)

  def _draw(self, state):
    return self._sample(state, self.noise, self.labels)

  def __call__(self, step: int, state) -> None:
    if not self.due(step):
      return
    z = parallel.to_host(self._draw(state)).astype(np.float32)
    images = parallel.to_host(self.tok.decode(self.tok.denormalize(z)))
    grid = make_grid([samples_to_uint8(images)])
    if jax.process_index() == 0:
      save_png(os.path.join(self.dir, f"step_{step:08d}.png"), grid)
    if self.writer is not None:
      self.writer.write_images(step, {"samples": grid[None]})


def reference_images(config: ml_collections.ConfigDict, image_size: int, num: int) -> np.ndarray:
  """Real images for the FID hook's reference when ``config.eval_ref`` is not set.

  ``config.eval_data`` (a tokenizer-style data config: source, kwargs, eval_split) gives its
  eval split; otherwise the training data's held-out counterpart: ``synthetic`` with the next
  seed, ``skimage`` (no split: the training photos, with a warning).
  """
  if config.get("eval_data") and config.eval_data.get("source"):
    from softvq_jax.data.pipeline import image_pipeline  # pylint: disable=g-import-not-at-top
    from softvq_jax.train.tokenizer_trainer import resolve_source  # pylint: disable=g-import-not-at-top
    source = resolve_source(config.eval_data, "eval")
    batch = next(iter(image_pipeline(source, batch_size=min(num, len(source)),
                                     image_size=image_size, train=False, shard_index=0,
                                     shard_count=1)))
    return to_uint8(batch["image"])
  data = config.data
  if data.source == "synthetic":
    held_out = ml_collections.ConfigDict(dict(data.to_dict(), seed=data.get("seed", 0) + 1,
                                              num_examples=num))
    return to_uint8(load_images(held_out, image_size)[0])
  if data.source == "skimage":
    logging.warning("FID reference: data.source=skimage has no held-out split; using the "
                    "training photos (set eval_ref or eval_data for a real reference)")
    return to_uint8(load_images(data, image_size)[0][:num])
  raise JobError(f"eval_every needs a reference: set eval_ref (an ADM reference batch .npz) "
                 f"or eval_data (an image data config); data.source={data.source!r} has no "
                 "images")


def sample_fid_hook(config: ml_collections.ConfigDict, sample, tok: Tokenizer,
                    gen_config: GeneratorConfig, *, workdir: str, writer=None):
  """The :class:`~softvq_jax.eval.hooks.SampleFID` of ``config.eval_every``/``eval_num_samples``."""
  from softvq_jax.eval.hooks import SampleFID  # pylint: disable=g-import-not-at-top
  num = int(config.get("eval_num_samples", 1000))
  reference = config.get("eval_ref", "") or reference_images(config, tok.image_size, num)
  return SampleFID(sample, lambda z: tok.decode(tok.denormalize(z)),
                   latent_shape=gen_config.latent_shape, num_classes=gen_config.num_classes,
                   reference=reference, every=config.eval_every, total_steps=config.total_steps,
                   num_samples=num, batch_size=int(config.get("eval_batch_size", 32)),
                   seed=config.seed + 1, writer=writer,
                   jsonl_path=metrics_path(workdir),
                   inception_batch_size=int(config.get("eval_inception_batch_size", 50)))


@dataclasses.dataclass
class GeneratorTraining:
  """What the SiT and DiT trainers share: tokenizer, data, sharded state, compiled step."""

  mesh: jax.sharding.Mesh
  tok: Tokenizer
  gen_config: GeneratorConfig
  data: Any
  graphdef: Any
  state: Any
  ckpt: Any
  step_fn: Any
  writer: Any


def prepare_training(config: ml_collections.ConfigDict, workdir: str,
                     make_loss: Callable[[GeneratorConfig], Any], *,
                     kind: str = "sit") -> GeneratorTraining:
  """Mesh, tokenizer, latents, restored-or-new state (or ``init_from``) and the jitted step of
  a ``kind`` ("sit" | "dit") generator; ``make_loss(gen_config)`` gives its loss function."""
  common.check_run_settings(config)
  fs.makedirs(workdir)
  mesh = common.make_mesh(config)
  common.check_batch(config.global_batch_size, mesh)
  tok = load_tokenizer(config, mesh)
  gen_config = generator_config(config, tok, kind=kind)
  data = latent_data(config, tok, gen_config.num_classes)
  dtype = common.COMPUTE_DTYPES[config.get("dtype", "float32")]
  ckpt = common.train_checkpointer(workdir, config.get("keep_checkpoints", 3))
  options = graph_options(config)
  try:
    scan_layers = resolve_scan_layers(
        options.get("scan_layers", False),
        state_paths=ckpt.state_paths() if ckpt.latest_step() is not None else None)
  except ConfigError:
    ckpt.close()
    raise
  remat = options.get("remat_policy", "none")
  residual_dtype = config.get("residual_dtype", "float32")
  logging.info("Graph: scan_layers=%s, remat_policy=%s, residual_dtype=%s", scan_layers, remat,
               residual_dtype)
  # The state is built with this policy's graph ("auto" tries "none" first); the policy
  # changes the graph, never the state.
  initial_policy = "none" if remat == "auto" else remat

  def model_fn(rngs, policy=initial_policy):
    return SiT(gen_config, dtype=dtype, scan_layers=scan_layers, remat_policy=policy,
               residual_dtype=residual_dtype, rngs=rngs)

  tx, lr_fn = common.make_optimizer(config.optim, config.total_steps)
  common.warn_if_the_ema_stays_near_init(config.ema_decay, config.total_steps)
  rules = common.sharding_rules(config)
  try:
    common.check_resumable(ckpt, {"generator": gen_config.to_json_dict(),
                                  "vq_mean": tok.config.vq_mean, "vq_std": tok.config.vq_std})
    common.warn_of_other_run_settings(ckpt, config)
  except ConfigError:
    ckpt.close()
    raise
  graphdef, state, shardings, ckpt = common.init_or_restore(
      model_fn, tx, mesh, seed=config.seed, strategy=rules, workdir=workdir,
      keep=config.get("keep_checkpoints", 3), data=data, checkpointer=ckpt)
  if config.get("init_from") and ckpt.latest_step() is None:
    state = common.init_generator_from(state, config.init_from, gen_config,
                                       scan_layers=scan_layers)
  common.log_parameter_overview(state)

  def make_step(policy: str):
    policy_graphdef = (graphdef if policy == initial_policy else
                       nnx.graphdef(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0), policy))))
    return state_lib.make_train_step(
        policy_graphdef, tx, make_loss(gen_config), ema_decay=config.ema_decay,
        state_shardings=shardings,
        batch_sharding=parallel.batch_sharding(parallel.auto_mesh(mesh)),
        learning_rate_fn=lr_fn)

  if remat == "auto":
    step_fn = AutoRematStep(make_step, mesh, rules, memory_limit=device_memory_limit())
  else:
    step_fn = parallel.with_activation_sharding(make_step(remat), mesh, rules)
  return GeneratorTraining(mesh, tok, gen_config, data, graphdef, state, ckpt, step_fn,
                           common.make_writer(workdir, resumed_step=int(state.step)))


def finish_training(config: ml_collections.ConfigDict, workdir: str, run: GeneratorTraining,
                    hooks: list, meta: dict) -> dict:
  """The training loop to ``config.total_steps``, then the EMA generator exported to
  ``workdir/generator`` (``Generator.load``; the ``sample`` job's ``generator_dir``);
  returns the last logged metrics."""
  state, last = train_loop(state=run.state, train_step=run.step_fn, data=run.data,
                           mesh=run.mesh, workdir=workdir, total_steps=config.total_steps,
                           checkpointer=run.ckpt, log_every=config.log_every,
                           ckpt_every=config.ckpt_every, hooks=tuple(hooks), writer=run.writer,
                           meta=meta, **common.profile_options(config))
  run.ckpt.close()
  if int(state.step) >= config.total_steps:
    export_ema_generator(run.graphdef, state, run.gen_config, os.path.join(workdir, "generator"))
  return last


def export_ema_generator(graphdef, state, gen_config: GeneratorConfig, directory: str) -> None:
  """Writes the EMA weights of a training ``state`` as a ``Generator`` directory (scanned
  layers unstacked). Every process takes part in gathering sharded leaves; one writes."""
  from softvq_jax.generator import Generator, build_model  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.sit import unstack_layers  # pylint: disable=g-import-not-at-top
  ema, rest = (jax.tree.map(parallel.to_host, t) for t in (state.ema, state.rest))
  if jax.process_index() != 0:
    return
  model = nnx.merge(graphdef, ema, rest)
  flat = {tuple(path): np.asarray(variable.get_value())
          for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))}
  Generator(build_model(gen_config, unstack_layers(flat))).save(directory, overwrite=True)
  logging.info("Exported the EMA generator to %s (load with Generator.load)", directory)


def train_generator(config: ml_collections.ConfigDict, workdir: str, r, *, grid_class,
                    fid_sampler, extra_meta: dict | None = None) -> dict:
  """Trains a prepared SiT/DiT run with its sample-grid and FID hooks (shared by both).

  ``fid_sampler(graphdef, gen_config)`` makes the EMA sampler the FID hook draws from.
  """
  tok, gen_config = r.tok, r.gen_config
  hooks = []
  if config.get("sample_every"):
    hooks.append(grid_class(r.graphdef, tok, gen_config, workdir=workdir,
                            every=config.sample_every, total_steps=config.total_steps,
                            num=config.sample.num, num_steps=config.sample.num_steps,
                            cfg_scale=config.sample.cfg_scale, seed=config.seed, writer=r.writer))
  if config.get("eval_every"):
    hooks.append(sample_fid_hook(config, fid_sampler(r.graphdef, gen_config), tok, gen_config,
                                 workdir=workdir, writer=r.writer))
  meta = {common.RUN_CONFIG_META: common.run_config_record(config),
          "tokenizer_dir": config.get("tokenizer_dir", ""), "vq_mean": tok.config.vq_mean,
          "vq_std": tok.config.vq_std, "generator": gen_config.to_json_dict(),
          **(extra_meta or {})}
  return finish_training(config, workdir, r, hooks, meta)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  r = prepare_training(config, workdir, lambda _: make_loss_fn(config.transport))
  return train_generator(
      config, workdir, r, grid_class=SampleGrid,
      fid_sampler=lambda graphdef, gen_config: ema_sampler(
          graphdef, gen_config, num_steps=config.sample.num_steps,
          cfg_scale=config.sample.cfg_scale))
