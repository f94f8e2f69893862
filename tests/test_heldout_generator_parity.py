"""SiT / DiT parity on configs unlike the sit_tiny / dit_tiny fixtures, through the public API.

``heldout_generators.npz`` holds three tiny random models run by the PyTorch
reference (see the ``.json`` for every constructor and sampler argument):

* ``sit``: 7 tokens x 5 channels, 3 heads, mlp_ratio 2.5, ``patch_size`` 2 and
  ``learn_sigma`` true in its config (both without effect in the reference's
  1-D SiT), Heun/Euler/SDE samples whose guidance intervals start or end on a
  grid point of the reference's time grid;
* ``dit_fixed``: learn_sigma false (fixed large variance), DDPM with guidance,
  DDIM on the ``"ddim25"`` respacing;
* ``dit_learned``: learn_sigma true, losses on a 500-step and a respaced process,
  guided DDPM/DDIM and DDIM with eta > 0 on ``"ddim20"``.

Weights go through ``model.safetensors`` + ``config.json`` and
``Generator.from_pytorch``, as a released model would.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, rel_err

from softvq_jax import Generator
from softvq_jax.models.sit import GeneratorConfig, infer_kind
from softvq_jax.transport import diffusion as D
from softvq_jax.transport import samplers
from softvq_jax.transport.loss import sit_loss

pytestmark = pytest.mark.usefixtures("few_xla_optimisations")  # tiny programs, many compiles

TOL = 2e-5  # observed <= 4e-6; a misplaced guidance step is ~1e-2
META = json.load(open(FIXTURES / "heldout_generators.json"))
CASES = META["cases"]


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURES / "heldout_generators.npz"))


@pytest.fixture(scope="module")
def gens(ref, tmp_path_factory):
  from safetensors.numpy import save_file
  out = {}
  for case, meta in CASES.items():
    folder = tmp_path_factory.mktemp(case)
    prefix = f"{case}/param/"
    state = {k[len(prefix):]: v.astype(np.float32) for k, v in ref.items() if k.startswith(prefix)}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(meta["config"]))
    out[case] = Generator.from_pytorch(str(folder / "model.safetensors"),
                                       str(folder / "config.json"))
  return out


def test_released_sit_fields_without_effect_are_accepted():
  cfg = CASES["sit"]["config"]
  assert cfg["learn_sigma"] and cfg["patch_size"] == 2
  assert infer_kind(cfg) == "sit"  # SiT-only fields decide, not learn_sigma
  config = GeneratorConfig.from_json_dict(cfg)
  assert config.kind == "sit" and config.out_channels == cfg["in_channels"]


@pytest.mark.parametrize("case", list(CASES))
def test_forward(gens, ref, case):
  gen = gens[case]
  x, t, y = (ref[f"{case}/in/{k}"] for k in ("x", "t", "y"))
  assert rel_err(gen(x, t, y), ref[f"{case}/out/forward"]) < TOL
  if CASES[case]["kind"] == "sit":
    null = np.full_like(y, gen.config.null_label)
    assert rel_err(gen(x, t, null), ref[f"{case}/out/forward_null"]) < TOL
  else:
    out = gen.model().forward_with_cfg(ref[f"{case}/in/cfg_x"], ref[f"{case}/in/cfg_t"],
                                       ref[f"{case}/in/cfg_y"], 3.5)
    assert rel_err(out, ref[f"{case}/out/forward_with_cfg"]) < TOL


def test_sit_losses(gens, ref):
  gen = gens["sit"]
  x0, t, noise, y = (jnp.asarray(ref[f"sit/in/{k}"]) for k in ("loss_x0", "loss_t", "loss_noise", "y"))
  for path in ("linear", "cosine"):
    out = sit_loss(lambda x, tt, yy, k: gen(x, tt, yy), x0, y, path=path, t=t, noise=noise,
                   label_dropout=False)
    assert rel_err(out["loss"], ref[f"sit/out/loss_{path}"]) < TOL, path


@pytest.mark.parametrize("case", ["dit_fixed", "dit_learned"])
def test_dit_losses(gens, ref, case):
  gen = gens[case]
  y = jnp.asarray(ref[f"{case}/in/y"])
  for name, kw in CASES[case]["losses"].items():
    diff = D.create_diffusion(kw["timestep_respacing"], kw["noise_schedule"],
                              diffusion_steps=kw["diffusion_steps"],
                              learn_sigma=gen.config.learn_sigma)
    terms = diff.training_losses(lambda x, tm: gen(x, tm, y), jnp.asarray(ref[f"{case}/in/loss_x0"]),
                                 jnp.asarray(kw["t"]), jnp.asarray(ref[f"{case}/in/loss_noise"]))
    assert sorted(set(terms) - {"x_t"}) == kw["terms"]
    for term in kw["terms"]:
      assert rel_err(terms[term], ref[f"{case}/out/{name}_{term}"]) < TOL, (name, term)


@pytest.mark.parametrize("name", list(CASES["sit"]["samplers"]))
def test_sit_samplers(gens, ref, name):
  kw = CASES["sit"]["samplers"][name]
  sde = kw["call"].endswith("euler_maruyama_sampler")
  method = "euler_maruyama" if sde else ("heun" if kw.get("heun") else "euler")
  extra = dict(path=kw["path_type"], step_noise=ref[f"sit/in/{name}_eps"]) if sde else {}
  out = gens["sit"].sample(ref[f"sit/in/{name}_z"], ref[f"sit/in/{name}_y"], method=method,
                           num_steps=kw["num_steps"], cfg_scale=kw.get("cfg_scale", 1.0),
                           guidance_interval=(kw.get("guidance_low", 0.0),
                                              kw.get("guidance_high", 1.0)), **extra)
  assert rel_err(out, ref[f"sit/out/{name}"]) < TOL


@pytest.mark.parametrize("case,name", [(c, n) for c in ("dit_fixed", "dit_learned")
                                       for n in CASES[c]["samples"]])
def test_dit_samplers(gens, ref, case, name):
  kw = CASES[case]["samples"][name]
  out = gens[case].sample(ref[f"{case}/in/{name}_z"], ref[f"{case}/in/{name}_y"],
                          method=kw["method"], timestep_respacing=kw["timestep_respacing"],
                          cfg_scale=kw["cfg_scale"], eta=kw["eta"],
                          noise_schedule=kw["noise_schedule"],
                          step_noise=ref.get(f"{case}/in/{name}_eps"))
  assert rel_err(out, ref[f"{case}/out/{name}"]) < TOL


def test_time_grid_is_torch_linspace_bit_for_bit():
  # Values of torch.linspace(..., dtype=float64): each point is one fused multiply-add.
  # Rounding the product first gives 0.55, 0.39999999999999997 and 0.35999999999999993,
  # which moves the first two across the guidance boundaries used above.
  assert samplers.ode_time_grid(20)[9] == float.fromhex("0x1.1999999999999p-1") < 0.55
  assert samplers.sde_time_grid(25)[15] == 0.4
  assert samplers.torch_linspace(1.0, 0.04, 10)[6] == 0.36


def test_bad_dit_respacing_or_schedule_fails_before_compiling(gens):
  gen = gens["dit_fixed"]
  noise = np.zeros((1,) + gen.latent_shape, np.float32)
  labels = np.zeros((1,), np.int32)
  compiled = len(gen._samplers)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="exactly 7000 steps"):
    gen.sample(noise, labels, method="ddim", timestep_respacing="ddim7000")
  with pytest.raises(ValueError, match="noise_schedule"):
    gen.sample(noise, labels, method="ddim", num_steps=5, noise_schedule="cosinee")
  assert len(gen._samplers) == compiled  # pylint: disable=protected-access
