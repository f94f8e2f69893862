"""SiT-XL/1 on SoftVQ-B-64 latents (64 tokens x 32), the paper's best 256x256 generator.

Convert the tokenizer once, cache the latents of ImageNet, then train (reference: batch 256,
bf16, AdamW 1e-4, EMA 0.9999, linear path with lognormal t; the paper trains 3M steps):

  python -m softvq_jax.convert --checkpoint model.safetensors --config config.json --out softvq-b-64
  python -m softvq_jax.main --config=configs/extract_latents.py:tokenizer_dir=softvq-b-64 \
      --workdir=/data/latents/b64
  python -m softvq_jax.main --config=configs/sit_xl_softvq_b64.py:tokenizer_dir=softvq-b-64 \
      --config.data.cache_dir=/data/latents/b64 --workdir=gs://BUCKET/sit_xl_b64

Blocks are scanned on TPUs and per block on GPUs, rematerialised only where the step would not
fit in device memory (config.model.scan_layers / remat_policy, both "auto"; see the README).

Shrunk for 2 CPU cores (tiny random tokenizer and SiT, the bundled photos):

  python -m softvq_jax.main --config=configs/sit_xl_softvq_b64.py:runlocal --workdir=/tmp/sit_local

Expected (released sit-xl_softvq-b-64, reference README, ImageNet 256x256, 50k samples):
gFID 5.98 without guidance, 1.78 with CFG 1.75 on t in [0, 0.7] (SDE, 250 steps).
"""

from softvq_jax.config_lib import sit_recipe


def get_config(arg=None):
  return sit_recipe("softvq-b-64", arg)
