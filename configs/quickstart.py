"""The default job: train a small SoftVQ tokenizer and a small SiT on real images, offline.

  python -m softvq_jax.main --config=configs/quickstart.py --workdir=workdir/quickstart

On 2 CPU cores, in minutes: a SoftVQ tokenizer (32x32 images, 16 tokens of 8) trained
with MSE + entropy on Fashion-MNIST (Debian package dataset-fashion-mnist, which
launch/setup.sh installs; the scikit-image photos otherwise), reconstructions of the
held-out test images, a latent cache of the training images, a class-conditional SiT
trained on it, and 8 samples of each class decoded to PNG (plus an ADM-format npz).

Measured on 2 CPU cores: tokenizer MSE about 0.08 after 2000 steps, held-out PSNR 17.9-18.2 dB
and SSIM 0.56-0.58 on 512 test images (`2_reconstruct`), SiT loss from 2.6-2.9 (step 100) to
1.1-1.3 (step 1000) over the recent runs (each run is deterministic, but training amplifies
rounding-level changes between code versions), samples that look like garments (rows are
classes); 3 to 5 minutes in all, depending on the host (2 min 50 s and 4 min 37 s on the last
two runs).
`summary.json` in the workdir has every number and each stage's wall time.
"""

import ml_collections

from softvq_jax.config_lib import parse_arg, sit_recipe, tokenizer_recipe


def get_config(arg=None):
  args = parse_arg(arg, tokenizer_steps=2000, sit_steps=1000)
  for name in ("tokenizer_steps", "sit_steps"):
    if args[name] < 1:
      raise ValueError(f"{name}={args[name]} must be at least 1")
  c = ml_collections.ConfigDict()
  c.trainer = "quickstart"
  c.seed = 0

  tok = tokenizer_recipe("softvq-b-64", "runlocal")
  tok.model.update(image_size=32, enc_patch_size=8, dec_patch_size=8, num_latent_tokens=16,
                   codebook_embed_dim=8, codebook_size=64,
                   # LayerScale starts at 1 (not DINOv2's 1e-5): trained from scratch, a
                   # small ViT learns several times faster that way.
                   encoder_kwargs=dict(embed_dim=96, depth=2, num_heads=2, init_values=1.0),
                   decoder_kwargs=dict(embed_dim=96, depth=2, num_heads=2, init_values=1.0))
  tok.data.image_size = 32
  tok.data.min_resize, tok.data.max_resize = 32, 36
  tok.global_batch_size = 32
  tok.total_steps = args.tokenizer_steps
  tok.optim.lr = 1e-3 * 256 / 32        # 1e-3 after the reference's batch/256 scaling
  tok.optim.warmup_steps = 0           # no warm-up (it overrides warmup_epochs)
  # LPIPS-VGG16 costs seconds per step on 2 CPU cores, so the quickstart trains
  # with MSE + entropy; real configs keep the reference's LPIPS weight of 1.
  tok.loss.perceptual_weight = 0.0
  # No DINO/DINOv2 weights exist offline, and random frozen networks make the GAN and
  # REPA terms noise: the quickstart leaves them out (configs/softvq_*.py keep them).
  tok.loss.disc_weight = 0.0
  tok.loss.repa = False
  tok.ema_decay = 0.995
  tok.log_every, tok.vis_every, tok.ckpt_every = 100, 500, 500
  c.tokenizer = tok

  sit = sit_recipe("softvq-b-64", "runlocal")
  sit.model.update(hidden_size=128, depth=4, num_heads=4, num_classes=10)
  sit.data = ml_collections.ConfigDict(dict(source="latent_cache", cache_dir="", num_classes=10))
  sit.optim.lr = 5e-4
  sit.global_batch_size = 64
  sit.total_steps = args.sit_steps
  sit.ema_decay = 0.995
  sit.log_every, sit.ckpt_every, sit.sample_every = 100, 500, 500
  sit.sample = ml_collections.ConfigDict(dict(num=20, num_steps=25, cfg_scale=1.0))
  c.sit = sit

  c.heldout_images = 512
  c.cache_examples = 8192
  c.sample = ml_collections.ConfigDict(dict(per_class=8, num_steps=50, cfg_scale=2.0))
  return c
