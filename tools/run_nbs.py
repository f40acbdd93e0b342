"""Run notebooks in place so they carry fresh outputs (the docs site shows them).

Cells run as under `nbdev_test`: `#| eval: false` cells and cells flagged with a `tst_flags` flag (gpu, slow) are
skipped. Progress bars are switched off so stored outputs stay readable. Usage: `python tools/run_nbs.py nbs/*.ipynb`,
then `nbdev_clean`.
"""
import os
import sys
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from nbdev.config import get_config
from nbdev.process import NBProcessor

SKIP_FLAGS = set(get_config().get("tst_flags", "").split())


def skipped(cell) -> bool:
    "True for cells `nbdev_test` would not run (cells as `NBProcessor(path, process=True)` parses them)."
    if cell.cell_type != "code": return True
    directives = getattr(cell, "directives_", {}) or {}
    return directives.get("eval:", [""])[0].lower() == "false" or bool(SKIP_FLAGS & directives.keys())


def run_notebook(path: Path):
    "Execute `path` and write its outputs back into it."
    nb, raw = NBProcessor(path, process=True).nb, read_nb(path)
    for cell in nb.cells:  # execnb keeps a cell's old outputs when it prints nothing now: start from none
        if cell.cell_type == "code": cell.outputs = []
    shell = CaptureShell(path, mpl_format="png")
    cwd = os.getcwd()
    os.chdir(path.parent)
    try: shell.run_all(nb, exc_stop=True, preproc=skipped)
    except BaseException:
        sys.stderr.write(shell.prettytb(fname=path) + "\n")
        raise SystemExit(f"{path} failed")
    finally: os.chdir(cwd)
    for cell, out in zip(raw.cells, nb.cells):
        if cell.cell_type == "code": cell["outputs"] = out.get("outputs", [])
    write_nb(raw, path)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ["TQDM_DISABLE"] = "1"
    for arg in sys.argv[1:]:
        run_notebook(Path(arg).resolve())
        print("ran", arg, flush=True)
