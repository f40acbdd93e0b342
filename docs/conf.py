# Sphinx settings of the sd_lora site. `python tools/build_docs.py` writes the pages (the notebooks, processed
# by nbdev) into a build folder and runs `sphinx-build -c docs` on it; the names come from settings.ini.
from configparser import ConfigParser
from importlib.util import find_spec
from pathlib import Path
import shutil

_settings = ConfigParser()
_settings.read(Path(__file__).resolve().parent.parent / "settings.ini")
_settings = _settings["DEFAULT"]

project = html_title = _settings["title"]
author = _settings["author"]
copyright = _settings["copyright"]
language = "en"

extensions = ["myst_nb"]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_dmath_double_inline = True  # `$$...$$` inside a paragraph is display maths, as in Jupyter
myst_heading_anchors = 4  # `[text](core.ipynb#to_pil)` links to a heading
nb_execution_mode = "off"  # show the outputs stored in the notebooks; never run them
nb_merge_streams = True

html_theme = "furo"
html_static_path = ["_static"]
html_css_files = ["custom.css"]  # a wider content column, and code that wraps instead of being cut off
html_favicon = "_static/favicon.svg"  # without one, every browser asks for /favicon.ico and gets a 404
html_copy_source = False
html_show_sourcelink = False
exclude_patterns = ["_build", "jupyter_execute", "**/.ipynb_checkpoints"]

# MathJax 3 from the django-static-mathjax package, so that the maths renders with no network. Only the parts
# that the TeX-to-HTML component loads are copied: itself, its fonts, the TeX extensions it loads on demand and
# the menu's accessibility tools.
mathjax_path = "mathjax/tex-chtml.js"
MATHJAX_FILES = ["tex-chtml.js", "input/tex/extensions", "output/chtml/fonts/woff-v2", "ui", "a11y"]


def copy_mathjax(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    spec = find_spec("mathjax")
    es5 = Path(next(iter(spec.submodule_search_locations or []), "")) / "static" / "mathjax" / "es5" if spec else None
    if es5 is None or not (es5 / "tex-chtml.js").is_file():
        raise RuntimeError("MathJax not found: `pip install django-static-mathjax==3.2.2.1`")
    dest = Path(app.outdir) / "_static" / "mathjax"
    for rel in MATHJAX_FILES:
        if (es5 / rel).is_dir():
            shutil.copytree(es5 / rel, dest / rel, dirs_exist_ok=True)
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(es5 / rel, dest / rel)
    shutil.copy2(es5.parent / "LICENSE", dest / "LICENSE")


def setup(app):
    app.connect("build-finished", copy_mathjax)
