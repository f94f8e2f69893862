"""Sample DiT-XL/1 on softvq-l-32 latents (256x256), as the reference README does.

Convert the generator (SoftVQVAE/dit-xl_softvq-l-32) and its tokenizer (SoftVQVAE/softvq-l-32) once:

  python -m softvq_jax.convert --kind dit --checkpoint model.safetensors --config config.json --out dit-xl_softvq-l-32
  python -m softvq_jax.convert --checkpoint model.safetensors --config config.json --out softvq-l-32
  python -m softvq_jax.main --config=configs/sample_dit_xl_softvq_l32.py:generator_dir=dit-xl_softvq-l-32,tokenizer_dir=softvq-l-32 \
      --workdir=OUT

Writes OUT/samples.npz (ADM layout), OUT/samples.png, OUT/images/*.png and OUT/sampling.json.
Sampler: 250 respaced DDPM steps (cosine schedule), CFG 1.75; 50,000 class-balanced samples.
Expected with the ADM evaluator against VIRTUAL_imagenet256_labeled.npz (reference README):
gFID 3.69 (with CFG); 9.07 without guidance (cfg_scale=1.0).
`:runlocal` samples a tiny random generator and tokenizer on CPU.
"""

from softvq_jax.config_lib import sample_recipe


def get_config(arg=None):
  return sample_recipe("dit", "softvq-l-32", arg)
