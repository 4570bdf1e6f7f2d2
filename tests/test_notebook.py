"""docs/notebook.ipynb is executed, cell by cell, in a real Jupyter kernel (nbclient), so it cannot rot."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "notebook.ipynb"

nbformat = pytest.importorskip("nbformat", reason="the notebook extra is not installed (pip install -e '.[test,notebook]')")
nbclient = pytest.importorskip("nbclient", reason="the notebook extra is not installed (pip install -e '.[test,notebook]')")
pytest.importorskip("ipykernel", reason="no Python kernel: the notebook extra (ipykernel) is not installed")


@pytest.fixture(scope="module")
def executed():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "docs")}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError:
        raise                                   # a cell failed: that is the notebook rotting, not the machine
    except (RuntimeError, TimeoutError, OSError) as exc:   # the kernel itself could not start
        pytest.skip(f"the Jupyter kernel could not start here: {exc}")
    return notebook


def _outputs(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        data = out.get("data", {})
        parts += [data.get("text/html", ""), data.get("text/plain", "")]
    return "\n".join(parts)


def test_every_cell_runs_without_an_error(executed):
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code)
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors


def test_it_shows_the_scan_the_runs_the_divergence_and_a_plot(executed):
    text = "\n".join(_outputs(c) for c in executed.cells if c.cell_type == "code")
    assert '<table class="popek">' in text and "sidt" in text          # the scan as a table
    assert "sgdt" in text and "diverges" in text                        # popek.diff names the instruction
    from popek.monitors import MONITORS
    assert all(f"{m}" in text for m in MONITORS)                        # every registered monitor ran
    pictures = [o for c in executed.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert pictures, "the compare cell drew no plot"
