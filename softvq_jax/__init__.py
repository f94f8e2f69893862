"""softvq-jax: SoftVQ-VAE 1-D tokenizers (and their generators) in JAX/Flax NNX."""

__version__ = "0.1.0"

from softvq_jax.generator import Generator  # noqa: E402
from softvq_jax.models.sit import GeneratorConfig  # noqa: E402
from softvq_jax.tokenizer import Tokenizer  # noqa: E402

__all__ = ["Generator", "GeneratorConfig", "Tokenizer", "__version__"]
