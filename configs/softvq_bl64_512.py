"""SoftVQ-VAE BL-64-512: ViT-B encoder, ViT-L decoder, 64 tokens, 512x512 images.

Train with the reference recipe (Adam betas 0.9/0.95, lr 1e-4 at batch 256, cosine
with one warm-up epoch, LPIPS, DINO discriminator from step 20k, entropy 0.01, REPA 0.1):

  python -m softvq_jax.main --config=configs/softvq_bl64_512.py --workdir=gs://BUCKET/softvq_bl64_512

Shrunk to run on 2 CPU cores with offline data:

  python -m softvq_jax.main --config=configs/softvq_bl64_512.py:runlocal --workdir=/tmp/softvq_bl64_512

Expected (the released softvq-bl-64-512, reference README, ImageNet 512x512 val, 50k):
rFID 0.71; SiT-XL on its latents: gFID 7.96 without guidance, 2.21 with CFG.
Hardware the reference used: 8 GPUs, global batch 256, 50 epochs (~250k steps).
"""

from softvq_jax.config_lib import tokenizer_recipe


def get_config(arg=None):
  return tokenizer_recipe("softvq-bl-64-512", arg)
