"""The notebooks run top to bottom on CPU (no converted weights: tiny random models) and draw.

Each is executed with nbclient on a fresh local kernel with one CPU device, as a CPU
runtime would have. Checked: no cell errors, the expected number of figures, the note
that random weights stand in for converted ones, that TensorFlow is never imported, and
that the stored notebooks carry no outputs.
"""

from __future__ import annotations

import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"

# name -> (figures it draws, text its output must contain)
EXPECTED = {
    "01_tokenizer.ipynb": (4, ["TINY RANDOMLY INITIALISED tokenizer", "code usage per codebook",
                               "PSNR (dB)"]),
    "02_generate.ipynb": (2, ["TINY RANDOM SiT", "cfg 4.0: mean |z - z(cfg 1)|",
                              "2 steps: mean |z - z(32 steps)|"]),
    "03_embeddings.ipynb": (2, ["no IMAGE_FOLDER given", "24 images in 4 classes",
                                "explained variance", "nearest neighbour"]),
}
NO_TENSORFLOW = ("import sys\n"
                 "print('tensorflow modules:', sorted(m for m in sys.modules "
                 "if m.split('.')[0] == 'tensorflow'))")


def test_every_notebook_is_tested_and_stored_without_outputs():
  assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)
  for name in EXPECTED:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert cell.outputs == [] and cell.execution_count is None, name
    assert "tensorflow" not in "".join(c.source for c in nb.cells)
    # Weight paths are variables at the top, empty by default.
    first_code = next(c.source for c in nb.cells if c.cell_type == "code" and
                      not c.source.lstrip().startswith("#"))
    assert '= ""' in first_code, first_code


def _execute(name, tmp_path, monkeypatch, settings=None):
  """Runs the notebook (its first settings cell's ``NAME = ""`` lines replaced by
  ``settings``); returns (outputs, figures, printed text, seconds)."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, like a CPU runtime
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", str(REPO))  # the package, installed or not
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # compile time dominates; 2 cores
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  for variable, value in (settings or {}).items():
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and f'{variable} = ""' in c.source]
    cell.source = cell.source.replace(f'{variable} = ""', f"{variable} = {value!r}")
  nb.cells.append(nbformat.v4.new_code_cell(NO_TENSORFLOW))
  start = time.time()
  NotebookClient(nb, timeout=120, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  seconds = time.time() - start
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  figures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  return outputs, figures, text, seconds


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_on_cpu(name, tmp_path, monkeypatch):
  outputs, figures, text, seconds = _execute(name, tmp_path, monkeypatch)
  assert not [o for o in outputs if o.output_type == "error"]
  want_figures, want_text = EXPECTED[name]
  assert len(figures) == want_figures, text
  for snippet in want_text:
    assert snippet in text, (snippet, text)
  assert "tensorflow modules: []" in text
  assert seconds < 120, f"{name} took {seconds:.0f} s"


def test_tokenizer_notebook_takes_a_converted_maetok(tmp_path, monkeypatch):
  """The README points the notebooks at converted releases, MAETok included: its plain
  autoencoder has no codebooks, whose plots had raised KeyError('probs')."""
  from softvq_jax.convert.__main__ import main as convert_main  # pylint: disable=g-import-not-at-top
  hf = REPO / "tests" / "fixtures" / "maetok_tiny_hf"
  out = tmp_path / "maetok"
  assert convert_main(["--checkpoint", str(hf / "model.safetensors"), "--config",
                       str(hf / "config.json"), "--out", str(out)]) == 0
  outputs, figures, text, _ = _execute("01_tokenizer.ipynb", tmp_path, monkeypatch,
                                       {"TOKENIZER_DIR": str(out)})
  assert not [o for o in outputs if o.output_type == "error"], text
  assert f"Loaded the converted tokenizer in {out}" in text
  assert "none (this tokenizer has no codebooks)" in text and "PSNR (dB)" in text
  assert len(figures) == EXPECTED["01_tokenizer.ipynb"][0]


def test_generate_notebook_names_a_dit_it_cannot_sample(tmp_path, monkeypatch):
  from nbclient.exceptions import CellExecutionError  # pylint: disable=g-import-not-at-top
  from softvq_jax.convert.__main__ import main as convert_main  # pylint: disable=g-import-not-at-top
  hf = REPO / "tests" / "fixtures" / "dit_tiny_hf"
  out = tmp_path / "dit"
  assert convert_main(["--kind", "dit", "--checkpoint", str(hf / "model.safetensors"),
                       "--config", str(hf / "config.json"), "--out", str(out)]) == 0
  with pytest.raises(CellExecutionError, match="holds a DIT; this notebook's samplers are SiT's"):
    _execute("02_generate.ipynb", tmp_path, monkeypatch, {"GENERATOR_DIR": str(out)})
