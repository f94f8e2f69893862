"""DiT-XL/1 on SoftVQ-L-64 latents (64 tokens x 32) with ADM diffusion, 256x256.

Convert the tokenizer once, cache the latents of ImageNet, then train (reference: batch 256,
bf16, AdamW 1e-4 without weight decay or clipping, EMA 0.9999, cosine schedule, 1000 steps,
MSE + VB, 1400 epochs):

  python -m softvq_jax.convert --checkpoint model.safetensors --config config.json --out softvq-l-64
  python -m softvq_jax.main --config=configs/extract_latents.py:tokenizer_dir=softvq-l-64 \
      --workdir=/data/latents/l64
  python -m softvq_jax.main --config=configs/dit_xl_softvq_l64.py:tokenizer_dir=softvq-l-64 \
      --config.data.cache_dir=/data/latents/l64 --workdir=gs://BUCKET/dit_xl_l64

Shrunk for 2 CPU cores (tiny random tokenizer and DiT, the bundled photos, 10 DDPM steps
for the sample grids):

  python -m softvq_jax.main --config=configs/dit_xl_softvq_l64.py:runlocal --workdir=/tmp/dit_local

Expected (released dit-xl_softvq-l-64, reference README, ImageNet 256x256, 50k samples,
250 DDPM steps): gFID 5.83 without guidance, 2.93 with CFG 1.75.
"""

from softvq_jax.train.dit_config import dit_recipe


def get_config(arg=None):
  return dit_recipe("softvq-l-64", arg)
