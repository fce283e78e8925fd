"""Every Colab notebook runs top to bottom on the CPU in its TINY setting, so none can rot."""

import json
from pathlib import Path

import pytest

papermill = pytest.importorskip("papermill")
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


def test_notebooks_are_generated_and_carry_no_outputs():
  import importlib.util

  import nbformat
  spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "colab" / "make_notebooks.py")
  maker = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(maker)
  SOURCES, build = maker.NOTEBOOKS, maker.build
  assert {p.stem for p in NOTEBOOKS} == set(SOURCES)
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells
               if c.cell_type == "code"), path
    want = build(path.stem, *SOURCES[path.stem])
    assert [c.source for c in nb.cells] == [c.source for c in want.cells], \
        f"{path.name} is stale: run python colab/make_notebooks.py"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    # installed as a package: no repository to clone, no URL to edit
    assert "git clone" not in code and "://" not in code and "os.chdir" not in code, path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """One workdir for all notebooks: the teacher is fine-tuned once, as in a user's Colab."""
  return tmp_path_factory.mktemp("colab") / "runs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, workdir, monkeypatch):
  # The kernel sees one CPU device, as a Colab runtime sees its one accelerator (8 fake devices
  # would each redo the replicated work, e.g. OPDF's contractions, on 2 cores).
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  out = tmp_path / path.name
  # run outside the repository: the presets come from the installed package
  papermill.execute_notebook(str(path), str(out), cwd=str(tmp_path), kernel_name="python3",
                             parameters={"TINY": True, "INSTALL": False, "WORKDIR": str(workdir)},
                             progress_bar=False)
  cells = json.loads(out.read_text())["cells"]
  text = "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))
  assert "max |logit difference|" in text and "test accuracy" in text
