"""Helpers shared by the ``configs/*.py`` files (ml_collections ``get_config(arg)``)."""

from __future__ import annotations

from typing import Any

import ml_collections

from softvq_jax.data import sources as data_sources
from softvq_jax.models.released import RELEASED_TOKENIZERS
from softvq_jax.utils.errors import JobError


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``"runlocal,key=value,..."`` (the part after ``:`` in ``--config=file.py:arg``).

  A bare word sets a boolean default to True; values are converted to the type
  of their default. Unknown keys are an error, so typos do not pass silently.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise JobError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not _:
      if not isinstance(default, bool):
        raise JobError(f"config argument {key!r} needs a value ({key}=...)")
      result[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise JobError(f"config argument {key}={value!r} is not a boolean")
      result[key] = value.lower() in ("true", "1")
    elif isinstance(default, (int, float)):
      kind = type(default)
      try:
        result[key] = kind(value)
      except ValueError as e:
        noun = "an integer" if kind is int else "a number"
        raise JobError(f"config argument {key}={value!r} is not {noun}") from e
    else:
      result[key] = value
  return result


# The image sources of the evaluation and extraction jobs (``source=`` in their config argument).
JOB_SOURCES = data_sources.SOURCES + ("offline",)  # offline: Fashion-MNIST, else the photos


def integer_problem(name: str, value: Any, minimum: int = 1, meaning: str = "") -> str | None:
  """Why ``value`` of the config field ``name`` is no integer >= ``minimum`` (``meaning``
  is appended), or None where it is one. Booleans are not integers here."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    return f"{name}={value!r} must be an integer >= {minimum}{meaning}"
  return None


def require_integers(config: ml_collections.ConfigDict, *names: str, minimum: int = 1) -> None:
  """Refuses, all in one error and before a job starts, the fields among ``names`` that
  are not integers >= ``minimum``."""
  problems = [problem for name in names
              if (problem := integer_problem(name, config.get(name), minimum))]
  if problems:
    raise JobError("invalid config: " + "; ".join(problems))


def job_source_kwargs(source: str, *, skimage_examples: int = 64) -> dict[str, Any]:
  """The arguments a job's image source takes, declared so that flags can set them.

  A job config is locked, so ``--config.data.kwargs.root=DIR`` works only for a
  key declared here; empty strings mean unset.
  """
  if source not in JOB_SOURCES:
    raise JobError(f"unknown data source {source!r} (config argument source=); choose one of "
                   f"{', '.join(JOB_SOURCES)}")
  return {"tfds": dict(dataset="imagenet2012", data_dir=""), "folder": dict(root=""),
          "array_record": dict(paths=""), "synthetic": dict(num_examples=64),
          "fashion_mnist": {}, "skimage": dict(num_examples=skimage_examples),
          "offline": {}}[source]


def default_eval_split(source: str) -> str:
  """The held-out split of a source: ImageNet's is "validation", the others' "test"."""
  return {"tfds": "validation"}.get(source, "test")


def held_out_data_config() -> ml_collections.ConfigDict:
  """``config.eval_data``: the held-out images of a trainer, where its training data has no
  held-out split of its own (an image folder, ArrayRecord files). Its source "" is unset;
  the fields are those of ``config.data``, its ``eval_split`` the one read."""
  return ml_collections.ConfigDict(dict(
      source="", eval_split="validation",
      kwargs=dict(dataset="imagenet2012", data_dir="", root="", paths="", num_examples=64)))


# Architecture of a tokenizer small enough for 2 CPU cores, used by ``runlocal``.
TINY_VIT = dict(embed_dim=64, depth=2, num_heads=2)


def tokenizer_recipe(name: str, arg: str | None) -> ml_collections.ConfigDict:
  """The reference's stage-1 recipe (configs/softvq-l-64.yaml and train_tokenizer.py defaults).

  The reference passes ``optim: adamw`` in its yaml, but the argument it reads
  is ``--optimizer`` (default ``adam``): it trains with plain Adam and no weight
  decay. We reproduce that by default; ``optim.name='adamw'`` switches.
  """
  args = parse_arg(arg, runlocal=False)
  c = ml_collections.ConfigDict()
  c.trainer = "tokenizer"
  c.seed = 42
  c.model = ml_collections.ConfigDict(dict(RELEASED_TOKENIZERS[name]))
  c.model.entropy_loss_ratio = 0.01
  c.released_name = name
  c.init_from = ""                    # a converted checkpoint directory to fine-tune
  c.encoder_init = "dinov2"           # the reference starts the encoder from DINOv2
  c.dinov2_checkpoint = ""            # local timm/PyTorch DINOv2 weights (nothing is downloaded)

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "imagenet2012"
  c.data.source = "tfds"                        # tfds | folder | array_record | offline | ...
  # Every source's arguments, declared so that flags can set them (empty: unset); each
  # source reads its own: tfds dataset/data_dir, folder root, array_record paths.
  c.data.kwargs = ml_collections.ConfigDict(dict(dataset="imagenet2012", data_dir="", root="",
                                                 paths=""))
  c.data.train_split, c.data.eval_split = "train", "validation"
  c.data.image_size = c.model.image_size
  c.data.min_resize = c.model.image_size        # random short-side resize in [min, max]
  c.data.max_resize = c.model.image_size * 5 // 4
  c.data.horizontal_flip = True
  c.global_batch_size = 256
  c.total_epochs = 50
  c.total_steps = 0                  # 0: total_epochs of the data; > 0 overrides them
  c.max_skipped = 100                # different undecodable training images tolerated

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"
  c.optim.lr = 1e-4                  # scaled by global_batch_size / 256
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.weight_decay = 0.0
  c.optim.schedule = "cosine"
  c.optim.warmup_epochs = 1
  c.optim.warmup_steps = ml_collections.config_dict.placeholder(int)  # set: overrides the epochs
  c.optim.warmup_lr = 1e-5
  c.optim.min_lr_ratio = 0.1         # the reference: min_lr = 0.1 * (scaled) lr
  c.optim.grad_clip = 1.0
  # The discriminator's optimizer: `optim`, with these fields replaced where set (lr is
  # scaled by global_batch_size / 256 as optim.lr is).
  c.disc_optim = ml_collections.ConfigDict({
      name: ml_collections.config_dict.placeholder(float)
      for name in ("lr", "b1", "b2", "eps", "weight_decay", "warmup_lr", "min_lr_ratio",
                   "grad_clip")})

  c.loss = ml_collections.ConfigDict()
  c.loss.reconstruction = "l2"
  c.loss.reconstruction_weight = 1.0
  c.loss.perceptual_weight = 1.0
  c.loss.perceptual_warmup = 10_000
  c.loss.lpips_dropout = True        # the reference leaves LPIPS' dropout on (train mode)
  # LPIPS' VGG convolutions in the compute dtype (bfloat16 runs: as under the reference's
  # autocast); True keeps them in float32, at the float32 matmul rate of GPUs and TPUs.
  c.loss.lpips_float32 = False
  c.loss.disc_type = "dino"
  c.loss.disc_weight = 0.2
  c.loss.disc_start = 20_000
  c.loss.disc_adaptive_weight = False  # the author advises turning it on (issue 13)
  c.loss.diff_aug = True
  c.loss.disc_cr_weight = 4.0
  c.loss.lecam_weight = 0.001
  c.loss.gen_loss = "hinge"
  c.loss.disc_loss = "hinge"
  # Local DINO v1 ViT-S/16 weights (dino_deitsmall16_pretrain.pth); empty: random, with a warning.
  c.loss.disc_checkpoint = ""
  c.loss.disc_backbone = ml_collections.ConfigDict()  # DinoBackbone overrides (tests, tiny runs)
  c.loss.entropy_temperature = 0.01
  # The reference computes the entropy term on each of its 8 GPUs' 32 images and averages
  # the gradients; the term is not linear in the batch, so it is computed per group of 32
  # here, whatever the device count (0: over the whole global batch).
  c.loss.entropy_group_size = 32
  c.loss.repa = True
  c.loss.repa_model = "vit_large_patch14_dinov2.lvd142m"
  c.loss.repa_checkpoint = ""         # local timm DINOv2 weights; empty: random, with a warning
  c.loss.repa_model_kwargs = ml_collections.ConfigDict()  # size overrides (tests, tiny runs)
  c.loss.repa_patch_size = 16
  c.loss.repa_proj_dim = 1024
  c.loss.repa_weight = 0.1
  c.loss.repa_align = "repeat"
  c.ema_decay = 0.9999
  # bf16 matmuls with f32 parameters, norms, softmax and losses: the reference trains under
  # bf16 autocast. "float32" runs every matmul at HIGHEST precision (an order of magnitude
  # slower on GPUs and TPUs); runlocal uses it, as CPUs have no faster bf16 path.
  c.dtype = "bfloat16"
  c.sharding = "dp"                   # or "fsdp" with an fsdp mesh axis
  c.sharding_rules = ()               # [(regex over param path, logical axes)], before the preset's
  c.logical_axis_rules = ()           # [(logical axis, mesh axes)], before the preset's
  c.profile_steps = 0                 # > 0: a profiler trace of that many steps under workdir
  c.profile_first_step = 10
  c.eval_every = 0                    # > 0: rFID/PSNR/SSIM of held-out images every N steps
  c.eval_num_images = 1000
  c.eval_lpips = False
  c.eval_data = held_out_data_config()  # unset: data's own held-out split

  c.mesh = (("data", -1),)  # a tuple, so that --config.mesh=... can override it
  c.log_every = 50
  c.vis_every = 5000
  c.ckpt_every = 10_000
  c.keep_checkpoints = 10

  if args.runlocal:
    c.model.image_size = 64
    c.model.encoder_kwargs = dict(TINY_VIT)
    c.model.decoder_kwargs = dict(TINY_VIT)
    c.model.num_latent_tokens = 16
    c.model.codebook_size = 256
    c.data.dataset = "offline"
    c.data.source = "offline"                   # Fashion-MNIST if installed, else the photos
    c.data.image_size = 64
    c.data.min_resize, c.data.max_resize = 64, 80
    c.global_batch_size = 8
    c.total_epochs = 1
    c.total_steps = 60
    # An epoch of warm-up would outlast the 60 steps (7,500 on Fashion-MNIST), and the
    # reference's scaling rule gives batch 8 a peak of 3e-6: a few steps up to 1e-3 instead.
    c.optim.lr = 1e-3 * 256 / c.global_batch_size
    c.optim.warmup_steps = 5
    c.ema_decay = 0.9  # 0.9999 would export the initial weights after 60 steps
    c.encoder_init = "random"
    c.dtype = "float32"
    # The whole objective on tiny random frozen networks (no weights exist offline).
    c.loss.disc_backbone = ml_collections.ConfigDict(dict(
        img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2))
    c.loss.repa_model_kwargs = ml_collections.ConfigDict(dict(
        embed_dim=32, depth=1, num_heads=2))
    c.loss.repa_proj_dim = 32
    c.loss.disc_start = 10
    c.loss.perceptual_warmup = 10
    c.log_every = 5
    c.vis_every = 20
    c.ckpt_every = 20
  return c


def maetok_recipe(name: str, arg: str | None) -> ml_collections.ConfigDict:
  """MAETok's stage-1 settings (upstream configs/maetok-b-64.yaml of 2025-05-29), as far as
  this trainer implements them: the plain autoencoder (no quantizer) trained from scratch
  with the SoftVQ objective (MSE, LPIPS, DINO discriminator; no entropy term, no REPA) at
  MAETok's batch, epochs and discriminator settings.

  Not implemented: MAETok's mask modeling, that is encoder token masking (40-60 %),
  decoder drop-path 0.05 and the auxiliary decoders predicting HOG, DINOv2 and SigLIP
  features of the masked patches. Their keys are here, off; the trainer refuses other
  values (``check_recipe_config``) rather than train without them silently.
  """
  from softvq_jax.models.released import RELEASED_MAETOK  # pylint: disable=g-import-not-at-top
  c = tokenizer_recipe("softvq-b-64", arg)
  runlocal = parse_arg(arg, runlocal=False).runlocal
  model = ml_collections.ConfigDict(dict(RELEASED_MAETOK[name]))
  if runlocal:
    model.update(image_size=64, num_latent_tokens=16, encoder_kwargs=dict(TINY_VIT),
                 decoder_kwargs=dict(TINY_VIT))
  c.model = model
  c.released_name = name
  if not runlocal:  # the data follow the model's size (512 for maetok-b-128-512)
    size = int(model.image_size)
    c.data.image_size, c.data.min_resize, c.data.max_resize = size, size, size * 5 // 4
  c.encoder_init = "random" if runlocal else "scratch"   # MAETok trains its encoder from scratch
  # Upstream: 0.4-0.6, 0.05 and ("hog", "dinov2", "siglip"); not implemented (see above).
  c.mask_ratio_min, c.mask_ratio_max = 0.0, 0.0
  c.decoder_drop_path = 0.0
  c.aux_targets = ()
  c.model.entropy_loss_ratio = 0.0
  c.loss.repa = False
  if not runlocal:
    c.global_batch_size = 512
    c.total_epochs = 200
    c.optim.warmup_epochs = 2
    c.loss.disc_weight = 0.4
    c.loss.disc_adaptive_weight = True
    c.loss.disc_start = 30_000
  return c


def sit_recipe(tokenizer: str, arg: str | None, *, size: str = "XL") -> ml_collections.ConfigDict:
  """The reference's SiT stage (train/train_sit.py with the README's flags).

  AdamW lr 1e-4, betas (0.9, 0.999), no weight decay, grad clip 1.0, batch 256,
  EMA 0.9999, linear path, velocity prediction, lognormal time sampling,
  label dropout 0.1.
  """
  args = parse_arg(arg, runlocal=False, tokenizer_dir="")
  sizes = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
  hidden, depth, heads = sizes[size]
  c = ml_collections.ConfigDict()
  c.trainer = "sit"
  c.seed = 0
  c.tokenizer_dir = args.tokenizer_dir   # a converted tokenizer (python -m softvq_jax.convert)
  c.tokenizer = ml_collections.ConfigDict(dict(RELEASED_TOKENIZERS[tokenizer]))
  c.model = ml_collections.ConfigDict(dict(
      hidden_size=hidden, depth=depth, num_heads=heads, mlp_ratio=4.0, num_classes=1000,
      class_dropout_prob=0.1,
      qk_norm=False,                   # the reference SiT's per-head q/k LayerNorms
      # Graph options, "auto" by default (resolved when training starts, see
      # train/sit_trainer.py): scan_layers follows the checkpoint being resumed, else
      # per-block on GPUs (scanning copies every block's activations) and scanned
      # elsewhere (compile time flat in depth); remat_policy is "none" when the step fits
      # in device memory, else "dots_with_no_batch_dims_saveable". Either takes an
      # explicit value (true/false; a policy of models.sit.REMAT_POLICIES).
      remat_policy="auto"))
  c.model.scan_layers = ml_collections.FieldReference("auto", field_type=object)
  # source: latent_cache (cache_dir: an extract run's workdir), or images encoded at start:
  # skimage, synthetic (num_examples, seed).
  c.data = ml_collections.ConfigDict(dict(source="latent_cache", cache_dir="", num_classes=1000,
                                          num_examples=64, seed=0))
  c.transport = ml_collections.ConfigDict(dict(path="linear", weighting="lognormal"))
  c.optim = ml_collections.ConfigDict(dict(name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8,
                                           weight_decay=0.0, grad_clip=1.0))
  c.global_batch_size = 256
  c.total_steps = 400_000
  c.ema_decay = 0.9999
  c.dtype = "bfloat16"
  # The residual stream between blocks: float32 as PyTorch autocast keeps it, or "bfloat16"
  # (about 5% faster on GPUs, estimated; rounds the stream once per block).
  c.residual_dtype = "float32"
  c.mesh = (("data", -1),)  # a tuple, so that --config.mesh=... can override it
  c.sharding = "dp"                    # preset: "dp" | "fsdp" (softvq_jax.parallel.PRESETS)
  c.sharding_rules = ()                # [(regex over param path, logical axes)], before the preset's
  c.logical_axis_rules = ()            # [(logical axis, mesh axes)], before the preset's
  c.init_from = ""                     # a Generator.save / converter directory (step 0 only)
  c.log_every = 100
  c.ckpt_every = 10_000
  c.keep_checkpoints = 3
  c.profile_steps = 0                  # > 0: a profiler trace of that many steps under workdir
  c.profile_first_step = 10
  c.sample_every = 10_000
  c.sample = ml_collections.ConfigDict(dict(num=16, num_steps=50, cfg_scale=1.0))
  # FID of EMA samples (decoded, FID Inception) every eval_every steps; 0 = off. Reference:
  # eval_ref (ADM reference batch .npz), else real images (eval_data, or held-out data).
  c.eval_every = 0
  c.eval_num_samples = 1000
  c.eval_batch_size = 32
  c.eval_ref = ""
  # Real images for the reference instead (source "" = unset): a tokenizer-style data config.
  c.eval_data = held_out_data_config()
  c.eval_inception_batch_size = 50
  if args.runlocal:
    c.tokenizer.update(image_size=64, num_latent_tokens=16, codebook_size=256,
                       encoder_kwargs=dict(TINY_VIT), decoder_kwargs=dict(TINY_VIT))
    c.model.update(hidden_size=64, depth=2, num_heads=2, num_classes=8, scan_layers=False,
                   remat_policy="none")
    # cache_dir stays settable: --config.data.cache_dir=DIR trains on a latent cache.
    c.data = ml_collections.ConfigDict(dict(source="skimage", cache_dir="", num_classes=8,
                                            num_examples=64, seed=0))
    c.global_batch_size = 8
    c.total_steps = 40
    c.ema_decay = 0.9  # 0.9999 would export the initial weights after 40 steps
    c.dtype = "float32"
    c.log_every = 10
    c.ckpt_every = 20
    c.sample_every = 20
    c.sample = ml_collections.ConfigDict(dict(num=8, num_steps=10, cfg_scale=1.0))
  return c


def sample_recipe(kind: str, tokenizer: str, arg: str | None) -> ml_collections.ConfigDict:
  """Sampling a released SiT-XL/DiT-XL with the reference README's settings.

  SiT: Euler-Maruyama SDE, 250 steps, CFG 1.75 on t in [0, 0.7], cosine path
  for the score conversion. DiT: 250 respaced DDPM steps of the cosine
  schedule, CFG 1.75. 50,000 class-balanced samples for the ADM evaluator.
  """
  args = parse_arg(arg, runlocal=False, generator_dir="", tokenizer_dir="", num_samples=50_000)
  c = ml_collections.ConfigDict()
  c.trainer = "sample"
  c.seed = 0
  c.generator_dir = args.generator_dir
  c.tokenizer_dir = args.tokenizer_dir
  from softvq_jax.models.released import RELEASED_MAETOK  # pylint: disable=g-import-not-at-top
  c.released_tokenizer = tokenizer
  c.tokenizer = ml_collections.ConfigDict(dict({**RELEASED_TOKENIZERS, **RELEASED_MAETOK}[tokenizer]))
  c.generator = ml_collections.ConfigDict(dict(
      kind=kind, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0, num_classes=1000,
      class_dropout_prob=0.1, learn_sigma=kind == "dit"))
  c.num_samples = args.num_samples
  c.batch_size = 125
  # The reference's generation scripts sample under fp16 autocast; bfloat16 here (float32
  # parameters, norms, softmax). "float32" reproduces PyTorch's float32 outputs to rounding,
  # at HIGHEST precision: about 15x the device time on GPUs for 50,000 samples.
  c.dtype = "bfloat16"
  c.save_pngs = True
  # Both families' fields in both, at their neutral values: a flag setting the other
  # family's option is then refused by name (Generator.check_sample_options), not by the
  # locked config's missing-field error.
  if kind == "sit":
    c.sampler = ml_collections.ConfigDict(dict(
        method="euler_maruyama", num_steps=250, cfg_scale=1.75, guidance_interval=(0.0, 0.7),
        path="cosine", rtol=1e-3, noise_schedule="", eta=0.0, timestep_respacing=""))
  else:
    # noise_schedule "": the one the DiT was trained with (its config.json; the released
    # DiTs: cosine). timestep_respacing (e.g. "ddim25", "10,15,20") replaces num_steps
    # (sampling.json records the steps it keeps).
    c.sampler = ml_collections.ConfigDict(dict(
        method="ddpm", num_steps=250, cfg_scale=1.75, guidance_interval=(0.0, 1.0),
        path="linear", rtol=1e-3, noise_schedule="", eta=0.0, timestep_respacing=""))
  if args.runlocal:
    c.tokenizer.update(image_size=64, num_latent_tokens=16, codebook_size=256,
                       encoder_kwargs=dict(TINY_VIT), decoder_kwargs=dict(TINY_VIT))
    c.generator.update(hidden_size=64, depth=2, num_heads=2, num_classes=10)
    c.num_samples = 20 if args.num_samples == 50_000 else args.num_samples
    c.batch_size = 10
    c.dtype = "float32"
    c.sampler.num_steps = 10
  return c
