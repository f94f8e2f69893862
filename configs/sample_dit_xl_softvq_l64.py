"""Sample DiT-XL/1 on softvq-l-64 latents (256x256), as the reference README does.

Convert the generator (SoftVQVAE/dit-xl_softvq-l-64) and its tokenizer (SoftVQVAE/softvq-l-64) once:

  python -m softvq_jax.convert --kind dit --checkpoint model.safetensors --config config.json --out dit-xl_softvq-l-64
  python -m softvq_jax.convert --checkpoint model.safetensors --config config.json --out softvq-l-64
  python -m softvq_jax.main --config=configs/sample_dit_xl_softvq_l64.py:generator_dir=dit-xl_softvq-l-64,tokenizer_dir=softvq-l-64 \
      --workdir=OUT

Writes OUT/samples.npz (ADM layout), OUT/samples.png, OUT/images/*.png and OUT/sampling.json.
Sampler: 250 respaced DDPM steps (cosine schedule), CFG 1.75; 50,000 class-balanced samples.
Expected with the ADM evaluator against VIRTUAL_imagenet256_labeled.npz (reference README):
gFID 2.93 (with CFG); 5.83 without guidance (cfg_scale=1.0).
`:runlocal` samples a tiny random generator and tokenizer on CPU.
"""

from softvq_jax.config_lib import sample_recipe


def get_config(arg=None):
  return sample_recipe("dit", "softvq-l-64", arg)
