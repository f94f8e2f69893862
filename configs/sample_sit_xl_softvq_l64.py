"""Sample SiT-XL/1 on softvq-l-64 latents (256x256), as the reference README does.

Convert the generator (SoftVQVAE/sit-xl_softvq-l-64) and its tokenizer (SoftVQVAE/softvq-l-64) once:

  python -m softvq_jax.convert --kind sit --checkpoint model.safetensors --config config.json --out sit-xl_softvq-l-64
  python -m softvq_jax.convert --checkpoint model.safetensors --config config.json --out softvq-l-64
  python -m softvq_jax.main --config=configs/sample_sit_xl_softvq_l64.py:generator_dir=sit-xl_softvq-l-64,tokenizer_dir=softvq-l-64 \
      --workdir=OUT

Writes OUT/samples.npz (ADM layout), OUT/samples.png, OUT/images/*.png and OUT/sampling.json.
Sampler: Euler-Maruyama SDE, 250 steps, CFG 1.75 on t in [0, 0.7] (cosine path); 50,000 class-balanced samples.
Expected with the ADM evaluator against VIRTUAL_imagenet256_labeled.npz (reference README):
gFID 1.86 (with CFG); 5.35 without guidance (cfg_scale=1.0).
`:runlocal` samples a tiny random generator and tokenizer on CPU.
"""

from softvq_jax.config_lib import sample_recipe


def get_config(arg=None):
  return sample_recipe("sit", "softvq-l-64", arg)
