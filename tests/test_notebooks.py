"""Every lesson notebook, executed in a real Jupyter kernel (nbclient + ipykernel) as JupyterLab would run it.

`nbdev_test` runs notebooks in its own IPython shell; users run them in a kernel, where `__name__`, display hooks,
matplotlib's backend and the working folder differ. Cells that `nbdev_test` skips (`#| eval: false`, and the flags of
`tst_flags` in settings.ini: gpu, slow) are left out here too; everything else must run without an error, and every
lesson must show at least one picture and leave no temporary folder behind.
"""
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbdev.process import NBProcessor

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_"))
sys.path.insert(0, str(ROOT / "tools"))
from run_nbs import skipped  # the rule tools/run_nbs.py refreshes outputs with: nbdev_test's


def test_the_skip_rule_is_nbdev_tests():
    cells = {"#| eval: false\nx = 1": True, "#| slow\n#| export\nx = 1": True, "#| gpu\nimport torch": True,
             "#| export\ndef f(): pass": False, "x = 1": False}
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in cells])
    with tempfile.TemporaryDirectory() as d:
        nbformat.write(nb, Path(d) / "t.ipynb")
        parsed = NBProcessor(Path(d) / "t.ipynb", process=True).nb.cells
    assert [skipped(c) for c in parsed] == list(cells.values())


def execute(path: Path) -> tuple[str|None, int, list[str]]:
    "Run `path` in a fresh kernel as nbdev_test would: the error (or `None`), how many pictures it showed, and what it left in its temporary folder."
    tmp = Path(tempfile.mkdtemp(prefix=f"nb-{path.stem}-"))
    os.environ["TMPDIR"] = str(tmp)  # the kernel (and what it starts) inherits it: their temporary folders land here
    try:  # torch's compile cache (torchinductor_USER) is shared and reused across runs, as ~/.cache would be
        return _execute(path) + (sorted(p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")),)
    finally: shutil.rmtree(tmp, ignore_errors=True)


def _execute(path: Path) -> tuple[str|None, int]:
    nb = nbformat.read(path, as_version=4)
    parsed = NBProcessor(path, process=True).nb.cells  # same cells, with nbdev's reading of their directives
    nb.cells = [c for c, p in zip(nb.cells, parsed) if c.cell_type != "code" or not skipped(p)]
    for cell in nb.cells:
        if cell.cell_type == "code": cell.outputs = []
    try: NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    except Exception as e: return f"{type(e).__name__}: {e}"[-3000:], 0
    pictures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    drawn = [m for c in nb.cells if c.cell_type == "markdown" for m in re.findall(r"!\[[^]]*\]\(([^)]+)\)", c.source)
             if (path.parent / m).is_file()]
    return None, len(pictures) + len(drawn)


@pytest.fixture(scope="module")
def executed():
    "Every notebook executed once, two kernels at a time (one thread each, as on CI's two cores)."
    env = {"MPLBACKEND": "module://matplotlib_inline.backend_inline",  # not conftest's Agg: figures must show
           "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernels inherit this process's environment
    try:
        with ProcessPoolExecutor(max_workers=2) as pool: return dict(zip(NOTEBOOKS, pool.map(execute, NOTEBOOKS)))
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_a_jupyter_kernel_and_shows_a_picture(path, executed):
    error, pictures, left = executed[path]
    assert error is None, f"{path.name} failed in a Jupyter kernel:\n{error}"
    assert pictures, f"{path.name} ran but shows no picture"
    assert not left, f"{path.name} left temporary files behind: {left}"
