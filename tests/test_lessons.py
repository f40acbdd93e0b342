"""The lessons as a reader meets them: stored outputs show only what a reader should see, and each lesson builds only
on the lessons before it."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_"))

# what a stored output must never show, each with the reason a reader would stumble on it
NOISE = {
    "a path of the machine that ran it": re.compile(r"(?<![\w.])/(work|tmp|root|home|usr|opt|var)/|site-packages|\\\\Users\\\\"),
    "a progress bar": re.compile(r"\d+%\||\d+/\d+ \[\d\d:\d\d|it/s\]"),
    "a Python warning": re.compile(r"\b\w*Warning\b:|warnings\.warn\("),
    "a launcher's banner": re.compile(r"Launching training on \d+ \w+"),
    "a script's own usage line": re.compile(r"usage: run_nbs\.py"),
}


def output_text(out: dict) -> str:
    return "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", "")) + \
           "".join(out.get("traceback", []))


def noise(nb: dict) -> list[str]:
    "Where the stored outputs of `nb` show something a reader should not see."
    found = []
    for i, cell in enumerate(nb["cells"]):
        images = []
        for out in cell.get("outputs", []):
            text = output_text(out)
            for what, pattern in NOISE.items():
                if m := pattern.search(text): found.append(f"cell {i}: {what} ({m.group(0)!r})")
            if "image/png" in out.get("data", {}): images.append(out["data"]["image/png"])
            if out.get("output_type") == "error": found.append(f"cell {i}: an error ({out.get('ename')})")
        if len(images) != len(set(map(str, images))): found.append(f"cell {i}: the same figure shown twice")
    return found


def test_the_noise_check_finds_what_it_looks_for():
    def nb(*outs): return {"cells": [{"cell_type": "code", "outputs": list(outs)}]}
    stream = lambda t: {"output_type": "stream", "name": "stderr", "text": t}
    assert noise(nb(stream("  0%|          | 0/12 [00:00<?, ?it/s]")))
    assert noise(nb(stream("/work/main/sd_lora/run.py:140: UserWarning: Not caching latents")))
    assert noise(nb(stream("Launching training on 2 CUDAs.")))
    fig = {"output_type": "display_data", "data": {"image/png": "iVBOR", "text/plain": "<Figure>"}}
    assert noise(nb(fig, {**fig, "output_type": "execute_result"})) == ["cell 0: the same figure shown twice"]
    assert noise(nb(stream("losses: [1.02, 0.98]"), fig)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_outputs_show_only_what_a_reader_should_see(path):
    found = noise(json.loads(path.read_text()))
    assert not found, f"{path.name}: " + "; ".join(found) + " (refresh with tools/run_nbs.py after fixing the cause)"


def lesson_of_module() -> dict[str, int]:
    "Each exported module, by the position of the lesson that exports it."
    where = {}
    for pos, path in enumerate(NOTEBOOKS):
        for cell in json.loads(path.read_text())["cells"]:
            if m := re.search(r"^#\|\s*default_exp\s+(\S+)", "".join(cell["source"]), re.M): where[m.group(1)] = pos
    return where


def test_a_lesson_imports_only_earlier_lessons():
    where, late = lesson_of_module(), []
    for pos, path in enumerate(NOTEBOOKS):
        if path.stem == "index": continue  # the front page shows the finished course
        code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        for mod in set(re.findall(r"(?:from|import)\s+sd_lora\.([\w.]+)", code)):
            if where.get(mod, -1) > pos: late.append(f"{path.stem} imports sd_lora.{mod}, a later lesson's")
    assert not late, "; ".join(late)


def test_lessons_state_their_facts():
    "The team's notes are not part of the course: a lesson states a fact where it uses it, or names a bench result."
    cites = [p.name for p in [*NOTEBOOKS, ROOT / "README.md"] if "FIELD_NOTES" in p.read_text()]
    assert not cites, f"these cite FIELD_NOTES.md, which is not in the repository: {cites}"
