"""MAETok-B-128 at 256x256: ViT-B encoder with mixed RoPE, MoVQ ViT-B decoder, 128 tokens of 32.

Train (upstream recipe: batch 512, 200 epochs, mask ratio 0.4-0.6, auxiliary
HOG/DINOv2/SigLIP decoders, adaptive discriminator weight 0.4 from step 30k):

  python -m softvq_jax.main --config=configs/maetok_b128.py --workdir=gs://BUCKET/maetok_b128

Shrunk for 2 CPU cores with offline data:

  python -m softvq_jax.main --config=configs/maetok_b128.py:runlocal --workdir=/tmp/maetok_b128

Expected (the released maetok-b-128, reference README, ImageNet 256x256): rFID 0.48;
SiT-XL on its latents: gFID 2.31 without guidance, 1.67 with CFG.
The released latent statistics (vq_mean, vq_std) come from the checkpoint's config.json.
"""

from softvq_jax.config_lib import maetok_recipe


def get_config(arg=None):
  return maetok_recipe("maetok-b-128", arg)
