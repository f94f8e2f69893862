"""SoftVQ-VAE L-32-512: ViT-B encoder, ViT-L decoder, 32 tokens, 512x512 images.

Train with the reference recipe (Adam betas 0.9/0.95, lr 1e-4 at batch 256, cosine
with one warm-up epoch, LPIPS, DINO discriminator from step 20k, entropy 0.01, REPA 0.1):

  python -m softvq_jax.main --config=configs/softvq_l32_512.py --workdir=gs://BUCKET/softvq_l32_512

Shrunk to run on 2 CPU cores with offline data:

  python -m softvq_jax.main --config=configs/softvq_l32_512.py:runlocal --workdir=/tmp/softvq_l32_512

Expected (the released softvq-l-32-512, reference README, ImageNet 512x512 val, 50k):
rFID 0.64; SiT-XL on its latents: gFID 10.97 without guidance, 4.23 with CFG.
Hardware the reference used: 8 GPUs, global batch 256, 50 epochs (~250k steps).
"""

from softvq_jax.config_lib import tokenizer_recipe


def get_config(arg=None):
  return tokenizer_recipe("softvq-l-32-512", arg)
