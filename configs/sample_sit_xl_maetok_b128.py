"""Sample SiT-XL/1 on maetok-b-128 latents (128 tokens x 32, 256x256).

Convert the generator (MAETok/sit-xl_maetok-b-128) and its tokenizer (MAETok/maetok-b-128) once:

  python -m softvq_jax.convert --kind sit --checkpoint model.safetensors --config config.json --out sit-xl_maetok-b-128
  python -m softvq_jax.convert --checkpoint model.safetensors --config config.json --out maetok-b-128
  python -m softvq_jax.main --config=configs/sample_sit_xl_maetok_b128.py:generator_dir=sit-xl_maetok-b-128,tokenizer_dir=maetok-b-128 \
      --workdir=OUT

The reference repository has no MAETok sampling script; this uses the SoftVQ SiT settings
(Euler-Maruyama SDE, 250 steps, CFG 1.75 on t in [0, 0.7]). The latent statistics come from the
tokenizer's config.json. Expected (reference README, ImageNet 256x256): gFID 1.67 with
guidance, 2.31 without (cfg_scale=1.0). `:runlocal` samples tiny random models on CPU.
"""

from softvq_jax.config_lib import sample_recipe


def get_config(arg=None):
  return sample_recipe("sit", "maetok-b-128", arg)
