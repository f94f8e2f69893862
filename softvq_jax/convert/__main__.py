"""Converts a released PyTorch checkpoint into a directory that ``Tokenizer.load`` reads.

    python -m softvq_jax.convert --checkpoint model.safetensors --config config.json --out DIR
    python -m softvq_jax.convert --kind sit --checkpoint model.safetensors --config config.json --out DIR

``--kind sit|dit`` converts a generator (loaded with ``Generator.load``).
"""

from __future__ import annotations

import argparse
import hashlib
import sys

from softvq_jax import __version__


def _file_sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m softvq_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kind", default="tokenizer", choices=["tokenizer", "sit", "dit"],
                      help="model family of the checkpoint")
  parser.add_argument("--checkpoint", required=True,
                      help="model.safetensors, or a PyTorch .pt/.pth/.bin zip checkpoint")
  parser.add_argument("--config", required=True, help="the checkpoint's config.json")
  parser.add_argument("--out", required=True, help="output directory (must not exist)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  parser.add_argument("--weights", default="auto", choices=["auto", "ema", "model"],
                      help="which state dict of a training checkpoint to take (auto: ema first)")
  args = parser.parse_args(argv)

  from softvq_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from softvq_jax.convert.core import ConversionError  # pylint: disable=g-import-not-at-top
  from softvq_jax.convert.readers import CheckpointFormatError  # pylint: disable=g-import-not-at-top
  from softvq_jax.models.config import ConfigError  # pylint: disable=g-import-not-at-top

  try:
    if args.kind == "tokenizer":
      from softvq_jax.convert.tokenizer import convert  # pylint: disable=g-import-not-at-top
      config, flat, ignored = convert(args.checkpoint, args.config, weights=args.weights)
      what = f"{config.bottleneck} tokenizer"
    else:
      from softvq_jax.convert.generator import convert  # pylint: disable=g-import-not-at-top
      config, flat, ignored = convert(args.checkpoint, args.config, weights=args.weights,
                                      kind=args.kind)
      what = config.kind
    report = {
        "converter": f"softvq_jax {__version__}",
        "kind": args.kind,
        "source_sha256": _file_sha256(args.checkpoint),
        "num_parameters": int(sum(v.size for v in flat.values())),
        "ignored_tensors": ignored,
    }
    if args.kind == "tokenizer":
      report["bottleneck"] = config.bottleneck
    out = checkpoint.write_param_dir(args.out, flat, config.to_json_dict(),
                                     extra_json={"conversion.json": report},
                                     overwrite=args.overwrite)
  except (ConversionError, CheckpointFormatError, ConfigError, FileNotFoundError,
          FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}: {what}, {report['num_parameters']:,} parameters, "
        f"latents {config.latent_shape}, ignored {len(ignored)} tensors")
  return 0


if __name__ == "__main__":
  sys.exit(main())
