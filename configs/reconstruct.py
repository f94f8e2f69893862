"""Reconstruct the photos bundled with scikit-image with a tokenizer.

  python -m softvq_jax.main --config=configs/reconstruct.py --workdir=/tmp/softvq_reconstruct

Runs offline in seconds on 2 CPU cores. Without ``--config.tokenizer_dir`` it uses a
tiny randomly initialised tokenizer (the reconstructions are noise: PSNR about
11 dB); with a converted release, e.g.

  python -m softvq_jax.convert --checkpoint model.safetensors --config config.json --out softvq-l-64
  python -m softvq_jax.main --config=configs/reconstruct.py:released=softvq-l-64 \\
      --config.tokenizer_dir=softvq-l-64 --workdir=/tmp/recon_l64

the PSNR of these photos is that of the released model (the reference reports
22.97 dB for softvq-l-64 on ImageNet val).
Writes reconstructions.png, latents.npz and metrics.json to the workdir.
"""

import ml_collections

from softvq_jax.config_lib import TINY_VIT, parse_arg
from softvq_jax.models.released import RELEASED_TOKENIZERS


def get_config(arg=None):
  # image_size: of the random tokenizer (default 64); with a tokenizer_dir, a check of its size.
  args = parse_arg(arg, released="", image_size=0)
  c = ml_collections.ConfigDict()
  c.trainer = "reconstruct"
  c.seed = 0
  c.tokenizer_dir = ""
  c.dtype = "float32"
  c.batch_size = 4
  c.overwrite = False                   # replace the outputs of an earlier run in the workdir
  c.released = args.released            # with tokenizer_dir: the release it must hold
  c.image_size = args.image_size
  if args.released:
    if args.released not in RELEASED_TOKENIZERS:
      raise ValueError(f"released={args.released!r} is not a released SoftVQ tokenizer; choose "
                       f"one of {', '.join(sorted(RELEASED_TOKENIZERS))}")
    c.model = ml_collections.ConfigDict(dict(RELEASED_TOKENIZERS[args.released]))
  else:
    c.model = ml_collections.ConfigDict(dict(
        RELEASED_TOKENIZERS["softvq-b-64"], image_size=args.image_size or 64, num_latent_tokens=16,
        codebook_size=256, encoder_kwargs=dict(TINY_VIT), decoder_kwargs=dict(TINY_VIT)))
  c.data = ml_collections.ConfigDict()
  c.data.source = "skimage"
  return c
