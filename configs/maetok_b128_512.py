"""MAETok-B-128 at 512x512: ViT-B encoder with mixed RoPE, MoVQ ViT-B decoder, 128 tokens of 32.

Train (upstream recipe: batch 512, 200 epochs, mask ratio 0.4-0.6, auxiliary
HOG/DINOv2/SigLIP decoders, adaptive discriminator weight 0.4 from step 30k):

  python -m softvq_jax.main --config=configs/maetok_b128_512.py --workdir=gs://BUCKET/maetok_b128_512

Shrunk for 2 CPU cores with offline data:

  python -m softvq_jax.main --config=configs/maetok_b128_512.py:runlocal --workdir=/tmp/maetok_b128_512

Expected (the released maetok-b-128-512, reference README, ImageNet 512x512): rFID 0.62;
SiT-XL on its latents: gFID 2.79 without guidance, 1.69 with CFG.
The released latent statistics (vq_mean, vq_std) come from the checkpoint's config.json.
"""

from softvq_jax.config_lib import maetok_recipe


def get_config(arg=None):
  return maetok_recipe("maetok-b-128-512", arg)
