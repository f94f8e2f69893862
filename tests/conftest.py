"""Test set-up: 8 fake CPU devices (for sharding tests) before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
# The suite runs on the CPU even on a GPU host, so its numbers do not depend on the host;
# JAX_PLATFORMS=cuda runs the GPU-only kernel tests (skipped otherwise).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def run_python(args, site=None) -> "subprocess.CompletedProcess":
  """``python ARGS`` in a fresh process without this session's XLA flags and platform, with
  ``site`` (a ``.deps`` folder) importable when given."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  if site is not None:
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + env.get("PYTHONPATH", "").split(os.pathsep))
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                        timeout=300)


def run_bench(args, site=None) -> "subprocess.CompletedProcess":
  """``python -m softvq_jax.bench ARGS`` through ``run_python``."""
  return run_python(["-m", "softvq_jax.bench", *args], site=site)


def jaxpr_equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in its equations (jit, scan, remat
  regions), depth first, each equation before the ones nested in it."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        yield from jaxpr_equations(inner)


_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_compiles = []


def _compile_listener(event, duration_secs, **kwargs):
  del duration_secs, kwargs
  if event == _BACKEND_COMPILE:
    _compiles.append(event)


jax.monitoring.register_event_duration_secs_listener(_compile_listener)


@contextlib.contextmanager
def count_compiles():
  """``with count_compiles() as n:`` -> ``n[0]``, the XLA compilations inside the block."""
  start = len(_compiles)
  counter = [0]
  yield counter
  counter[0] = len(_compiles) - start


def rel_err(actual, expected) -> float:
  """max |a - b| / max(1, max |b|): the parity measure of the fixtures' README."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / max(1.0, float(np.max(np.abs(expected)))))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  return FIXTURES


@pytest.fixture(scope="module")
def few_xla_optimisations():
  """For files of tiny programs (``pytestmark = pytest.mark.usefixtures(...)``): XLA's
  optimisation passes cost them more than they save."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """``gs://bucket/x`` -> ``tmp_path/bucket/x`` through ``etils.epath``, the library real
  URLs go through (no bucket is reachable offline); returns that local root."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from softvq_jax.utils import fs  # pylint: disable=g-import-not-at-top
  root = tmp_path / "bucket"
  writes = []

  class RecordingPath(type(epath.Path(tmp_path))):
    # Every upload (write_bytes, write_text, a streamed copy) opens the object for writing.
    def open(self, mode="r", *args, **kwargs):
      if "w" in mode:
        writes.append(os.path.relpath(str(self), root))
      return super().open(mode, *args, **kwargs)

  def remote(path):
    assert path.startswith("gs://bucket"), path
    return RecordingPath(str(root) + path[len("gs://bucket"):])

  monkeypatch.setattr(fs, "_remote", remote)
  return _Bucket(root, writes)


class _Bucket:
  """The local folder behind ``gs://bucket`` (``bucket / "x"``) and the uploads, in order."""

  def __init__(self, root, writes):
    self.root, self.writes, self.parent = root, writes, root.parent

  def __truediv__(self, rel):
    return self.root / rel


@pytest.fixture(scope="module")
def persistent_compile_cache(tmp_path_factory):
  """For files that run the same training programs several times (resume tests): a
  compilation cache on disk lets the second and third runs load the first run's
  executables instead of compiling them again. The same executable gives the same bits."""
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  before = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.reset_cache()  # the cache is set up once per process, at first use
  yield
  for name, value in before.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()

