"""MAETok-B-128 at 256x256: ViT-B encoder with mixed RoPE, MoVQ ViT-B decoder, 128 tokens of 32.

Train (upstream batch 512, 200 epochs, adaptive discriminator weight 0.4 from step 30k).
MAETok's mask modeling (token masking 0.4-0.6, decoder drop-path, auxiliary HOG/DINOv2/SigLIP
decoders) is not implemented: this trains the plain autoencoder with the SoftVQ objective
(MSE + LPIPS + GAN), so the released model's rFID is not what it reaches:

  python -m softvq_jax.main --config=configs/maetok_b128.py --workdir=gs://BUCKET/maetok_b128

Shrunk for 2 CPU cores with offline data:

  python -m softvq_jax.main --config=configs/maetok_b128.py:runlocal --workdir=/tmp/maetok_b128

For comparison (the released maetok-b-128, reference README, ImageNet 256x256): rFID 0.48;
SiT-XL on its latents: gFID 2.31 without guidance, 1.67 with CFG.
The released latent statistics (vq_mean, vq_std) come from the checkpoint's config.json.
"""

from softvq_jax.config_lib import maetok_recipe


def get_config(arg=None):
  return maetok_recipe("maetok-b-128", arg)
