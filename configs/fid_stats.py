"""An ADM reference batch (mu, sigma, mu_s, sigma_s, optionally arr_0) of any dataset.

  python -m softvq_jax.main --config=configs/fid_stats.py:source=tfds,split=train,images \\
      --workdir=/data/fid_refs/imagenet256_train

streams ImageNet (TFDS, prepared as ArrayRecord) through the ADM centre crop at
`image_size=256` and the FID Inception, and writes WORKDIR/fid_stats.npz for
configs/eval_gen.py (`ref=WORKDIR/fid_stats.npz`) or the ADM evaluator. `images` also stores
the cropped images (arr_0), needed for precision/recall; leave it out for statistics only
(any number of hosts). Other sources: `source=folder --config.data.kwargs.root=DIR`,
`source=fashion_mnist,image_size=32`, `source=skimage`; `max_images=N` takes the first N.
On 2 CPU cores the Inception costs about 0.25 s per image.
"""

import ml_collections

from softvq_jax import config_lib
from softvq_jax.config_lib import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, source="tfds", split="", image_size=256, max_images=0, images=False,
                   batch_size=100, output="fid_stats.npz")
  c = ml_collections.ConfigDict()
  c.trainer = "fid_stats"
  c.image_size = args.image_size
  c.max_images = args.max_images        # 0: every image of the split
  c.images = args.images                # also store arr_0 (for precision/recall)
  c.output = args.output                # relative to the workdir (an absolute path is kept)
  c.overwrite = False                   # replace an existing output file
  c.batch_size = args.batch_size
  c.inception_batch_size = args.batch_size
  c.inception_weights = ""
  c.max_skipped = 100
  split = args.split or config_lib.default_eval_split(args.source)
  c.data = ml_collections.ConfigDict(dict(source=args.source, train_split="train",
                                          eval_split=split))
  c.data.kwargs = config_lib.job_source_kwargs(args.source)
  return c
