"""PyTorch checkpoint conversion: ``python -m softvq_jax.convert --checkpoint ... --config ... --out DIR``."""

from softvq_jax.convert.core import ConversionError, Transform, map_state_dict
from softvq_jax.convert.readers import CheckpointFormatError, read_checkpoint

__all__ = ["CheckpointFormatError", "ConversionError", "Transform", "map_state_dict",
           "read_checkpoint"]
