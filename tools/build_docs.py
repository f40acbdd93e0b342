#!/usr/bin/env python
"""Build the sd_lora documentation site with Sphinx, myst-nb and furo, without quarto.

    python tools/build_docs.py [--out _site]    # build the HTML site
    python tools/build_docs.py --readme         # write README.md from nbs/index.ipynb
    python tools/build_docs.py --check-readme   # fail if README.md is out of date

The site is built in four steps:

1. nbdev's `nbdev_proc_nbs` processes nbs/ into _proc/: it adds a `show_doc` cell after each
   exported definition, links names in backticks and drops `#| hide` cells. The parts of it that
   need or install quarto, or that write into nbs/ and sd_lora/, are switched off for the call.
2. Each processed notebook is turned into a page for myst-nb: `show_doc` cells become markdown
   cells holding the rendered documentation (heading, signature, docstring and a table of the
   parameters' docments), quarto's `#|` cell options become myst-nb cell tags, and links to the
   nbdev site become links between the pages. The notebooks' stored outputs are kept as they are;
   nothing is executed.
3. A Sphinx project is written next to the pages: conf.py, an index with the lessons in file-name
   order, and a copy of MathJax so that the maths renders with no network.
4. `sphinx-build -W --keep-going -b html` writes the site.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from configparser import ConfigParser
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import nbformat

ROOT = Path(__file__).resolve().parent.parent
README_HEADER = "<!-- Generated from nbs/index.ipynb by `python tools/build_docs.py --readme`; do not edit. -->"
NOTEBOOK_LANGUAGE_INFO = {"name": "python", "pygments_lexer": "ipython3"}


# ---------------------------------------------------------------------------------------------
# Settings and small helpers


def settings(root: Path = ROOT) -> dict:
    "The `[DEFAULT]` section of the project's settings.ini, with `%(...)s` references resolved."
    cfg = ConfigParser()
    cfg.read(root / "settings.ini")
    return dict(cfg["DEFAULT"])


def page_name(notebook: Path) -> str:
    "nbdev's name for a notebook's page: the file name, lower-cased, less any `00_` lesson number."
    return re.sub(r"^\d+[a-zA-Z0-9]*_", "", notebook.stem.lower())


def lesson_notebooks(nbs: Path) -> list[Path]:
    "The notebooks of `nbs` in site order: index first, then the lessons by file name."
    found = sorted(p for p in nbs.glob("*.ipynb") if not p.name.startswith((".", "_")))
    return sorted(found, key=lambda p: p.stem != "index")


@contextlib.contextmanager
def working_directory(path: Path):
    "Run the block with `path` as the current directory (nbdev finds settings.ini from there)."
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def exclusive_lock(root: Path):
    "Serialise builds of one checkout: they all share its _proc/ folder."
    name = "sd_lora-docs-" + hashlib.sha1(str(root).encode()).hexdigest()[:12] + ".lock"
    with open(Path(tempfile.gettempdir()) / name, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Step 1: nbdev_proc_nbs without quarto


def docs_filter():
    "nbdev's docs processors, less the few whose work this script does differently for Sphinx."
    from nbdev.processors import FilterDefaults

    skipped = {
        "FrontmatterProc",  # keeps a heading and blockquote as the page title; it would cut a
                            # description to its first line and move it into quarto front matter
        "insert_warning",   # an HTML comment right after the title; nothing to show on the site
        "rm_export",        # the site shows exported code, followed by its documentation
        "exec_show_docs",   # show_doc cells are rendered by `render_doc` instead of executing every
                            # import cell, which may also train or download something
    }

    class DocsFilter(FilterDefaults):
        def base_procs(self):
            return [p for p in super().base_procs() if p.__name__ not in skipped]

    return DocsFilter


def run_nbdev_proc_nbs(root: Path = ROOT) -> Path:
    "Run nbdev's `nbdev_proc_nbs` on nbs/ into `root/_proc`, with its quarto parts switched off."
    import nbdev.doclinks
    import nbdev.quarto
    import nbdev.serve

    def noop(*args, **kwargs):
        return None

    patches = [
        # Without quarto on the PATH, nbdev downloads quarto with sudo and then runs `pip install -e .[dev]`.
        mock.patch.object(nbdev.quarto, "_ensure_quarto", noop),
        # These write nbs/_quarto.yml, nbs/nbdev.yml, nbs/sidebar.yml and sd_lora/_modidx.py.
        mock.patch.object(nbdev.quarto, "refresh_quarto_yml", noop),
        mock.patch.object(nbdev.quarto, "nbdev_sidebar", SimpleNamespace(__wrapped__=noop)),
        mock.patch.object(nbdev.doclinks, "_build_modidx", noop),
        mock.patch.object(nbdev.serve, "FilterDefaults", docs_filter()),
    ]
    with working_directory(root), contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        # force: nbdev's cache goes by file times; n_workers=0: process in this process, serially.
        nbdev.quarto.nbdev_proc_nbs(force=True, n_workers=0)
    return root / "_proc"


def process_notebooks(dest: Path, root: Path = ROOT) -> Path:
    """Run `nbdev_proc_nbs` and copy its output to `dest`. A lock keeps two builds of one checkout
    (say, the tests and a manual build) from rewriting _proc/ under each other."""
    with exclusive_lock(root):
        proc = run_nbdev_proc_nbs(root)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(proc, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# Step 2: processed notebooks to myst-nb pages

_DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")
_CELL_TAGS = {("echo", "false"): "remove-input", ("output", "false"): "remove-output",
              ("include", "false"): "remove-cell"}
_LINK_ATTRS = re.compile(r"(\]\([^)\s]*\))\{[^}\n]*\}")  # quarto's `[text](url){target="_blank"}`
_HEADING = re.compile(r"^(#{1,6})\s")
_WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def split_directives(source: str) -> tuple[dict[str, str], str]:
    "Split the leading `#| name: value` lines off a cell's source: `({name: value}, rest)`."
    lines = source.splitlines()
    directives = {}
    while lines and (m := _DIRECTIVE.match(lines[0])):
        directives[m.group(1).lower()] = m.group(2).strip().strip("'\"").lower()
        lines.pop(0)
    return directives, "\n".join(lines).strip("\n")


def strip_link_attributes(markdown: str) -> str:
    "Drop pandoc-only attribute blocks such as `{target=\"_blank\"}` after links."
    return _LINK_ATTRS.sub(r"\1", markdown)


def show_doc_calls(source: str) -> list[tuple[str, dict]]:
    """The `show_doc(sym, ...)` calls among a cell's statements: the source of each `sym`, and the
    literal `name` and `title_level` keywords. nbdev hides the code of such cells and shows only
    their documentation, which is what the site shows too."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    calls = []
    for node in tree.body:
        call = node.value if isinstance(node, ast.Expr) else None
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "show_doc" and call.args:
            keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("name", "title_level")}
            calls.append((ast.get_source_segment(source, call.args[0]), keywords))
    return calls


def _md_escape(text: str) -> str:
    "Escape the characters that markdown would read as emphasis in a symbol name."
    return re.sub(r"([_*])", r"\\\1", text)


def _table_cell(text) -> str:
    return str(text).replace("\n", " ").replace("|", r"\|")


def docments_table(obj) -> str:
    "A markdown table of `obj`'s parameters: type, default and docment (its `# comment`)."
    from fastcore.docments import docments

    try:
        params = docments(obj, full=True, args_kwargs=True)  # args_kwargs: read `**kw` comments too
    except (TypeError, ValueError):
        return ""
    params.pop("self", None)
    ret = params.pop("return", None)
    if not params:
        return ""
    prefixes = {inspect.Parameter.VAR_POSITIONAL: "\\*", inspect.Parameter.VAR_KEYWORD: "\\*\\*"}

    def fmt_type(anno):
        if anno is inspect.Parameter.empty:
            return ""
        return f"`{_table_cell(anno if isinstance(anno, str) else inspect.formatannotation(anno))}`"

    def fmt_default(default):
        if default is inspect.Parameter.empty:
            return ""
        return f"`{_table_cell(getattr(default, '__name__', None) or repr(default))}`"

    rows = ["|  | **Type** | **Default** | **Details** |", "| -- | -- | -- | -- |"]
    for name, p in params.items():
        label = prefixes.get(p.get("kind"), "") + _md_escape(name)
        rows.append(f"| {label} | {fmt_type(p['anno'])} | {fmt_default(p['default'])} | "
                    f"{_table_cell(p['docment'] or '')} |")
    if ret and not inspect.isclass(obj) and (ret["docment"] or ret["anno"] not in (inspect.Parameter.empty, None, "None")):
        rows.append(f"| **Returns** | {fmt_type(ret['anno'])} |  | {_table_cell(ret['docment'] or '')} |")
    return "\n".join(rows)


def render_doc(obj, name: str | None = None, level: int = 3) -> str:
    "The documentation of `obj` as markdown: heading, source link, signature, docstring and table."
    from fastcore.docments import MarkdownRenderer
    from nbdev.doclinks import NbdevLookup
    from nbdev.showdoc import show_doc

    renderer = show_doc(obj, name=name, title_level=level)  # nbdev's BasicMarkdownRenderer
    parts = [f"{'#' * level} {_md_escape(renderer.nm)}"]
    src = NbdevLookup().code(renderer.fn)
    if src:
        try:
            line = inspect.getsourcelines(inspect.unwrap(obj))[1]
        except (OSError, TypeError):
            line = None
        parts.append(f"[source]({re.sub(r'#L.*$', '', src)}{f'#L{line}' if line else ''})")
    # The signature in a code block, then the docstring (what BasicMarkdownRenderer shows under its heading).
    body = MarkdownRenderer._repr_markdown_(renderer)
    if inspect.isclass(obj):
        body = body.replace("```python\ndef ", "```python\nclass ", 1)
    parts.append(body)
    table = docments_table(obj)
    if table:
        parts.append(table)
    # Link names in backticks to their documentation, as nbdev's `add_links` does to show_doc output.
    return NbdevLookup().linkify("\n\n".join(parts))


def default_exp(cells: list[dict]) -> str | None:
    "The module a notebook exports to, from its `#| default_exp` cell."
    for cell in cells:
        if cell["cell_type"] == "code":
            m = re.search(r"^\s*#\|\s*default_exp\s+(\S+)", _source(cell), flags=re.MULTILINE)
            if m:
                return m.group(1)
    return None


def import_namespace(cells: list[dict], module) -> dict:
    """The names a `show_doc` cell may use: `module`'s, and those the notebook's import statements
    bring in. Only the import statements are run, nothing else in the notebook."""
    ns = dict(vars(module))
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        try:
            tree = ast.parse(split_directives(_source(cell))[1])
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "module", "") != "__future__":
                try:
                    exec(compile(ast.Module(body=[node], type_ignores=[]), "<notebook imports>", "exec"), ns)
                except Exception as e:  # the show_doc call then reports the missing name
                    print(f"warning: {ast.unparse(node)!r} failed: {e}", file=sys.stderr)
    return ns


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _last_heading_level(markdown: str, level: int) -> int:
    "The level of the last heading in `markdown` (outside code fences), else `level`."
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and (m := _HEADING.match(line)):
            level = len(m.group(1))
    return level


def _clean_outputs(outputs: list[dict]) -> list[dict]:
    "Outputs that myst-nb renders without warnings: no widget views, no quarto link attributes."
    cleaned = []
    for out in outputs:
        data = out.get("data")
        if data is not None:
            if _WIDGET_MIME in data:
                data.pop(_WIDGET_MIME)
                if not data:
                    continue
            if "text/markdown" in data:
                data["text/markdown"] = strip_link_attributes(_source({"source": data["text/markdown"]}))
        cleaned.append(out)
    return cleaned


@dataclass
class Page:
    "One page of the site: made from `notebook`, written as `<name>.ipynb` in the Sphinx sources."
    notebook: Path
    name: str
    nb: dict = field(default_factory=dict)
    anchors: set = field(default_factory=set)  # heading slugs of the documented symbols


def find_symbol(expr: str, module, cells: list[dict]):
    "The object `expr` names in a show_doc call: in `module`, else among the notebook's imports."
    try:
        return eval(expr, vars(module))
    except NameError:  # e.g. an imported name, on a page that exports nothing
        try:
            return eval(expr, import_namespace(cells, module))
        except Exception as e:
            raise RuntimeError(f"cannot document `{expr}`: not in {module.__name__} or the notebook's imports ({e})") from e


def code_cell(cell: dict, directives: dict[str, str], code: str) -> dict | None:
    "A code cell for myst-nb, its `#|` options turned into cell tags; None if nothing of it shows."
    if "hide" in directives or directives.get("include") == "false":
        return None
    outputs = [] if directives.get("output") == "false" else _clean_outputs(cell.get("outputs", []))
    if not code.strip() and not outputs:
        return None  # e.g. a `#| default_exp` cell
    tags = set(cell.get("metadata", {}).get("tags", []))
    tags.update(tag for (name, value), tag in _CELL_TAGS.items() if directives.get(name) == value)
    if not code.strip():
        tags.add("remove-input")
    metadata = {k: v for k, v in cell.get("metadata", {}).items() if k not in ("language", "tags")}
    if tags:
        metadata["tags"] = sorted(tags)
    return {**cell, "source": code, "outputs": outputs, "metadata": metadata}


def convert_notebook(nb: dict, lib_name: str) -> tuple[dict, set]:
    """Turn a notebook processed by nbdev into one for myst-nb.

    Returns the notebook and the heading slugs of the symbols documented on it."""
    from myst_parser.slugs import github_slugify

    module_name = default_exp(nb["cells"])
    module = importlib.import_module(f"{lib_name}.{module_name}" if module_name else lib_name)
    cells, anchors, auto_docs = [], set(), []
    level = 1  # of the last markdown heading; documentation headings go one below it

    def flush_auto_docs():
        # nbdev inserts each new show_doc cell right after the exporting cell, which lists a
        # cell's definitions last to first; put them back in the order they are defined.
        cells.extend(reversed(auto_docs))
        auto_docs.clear()

    for cell in nb["cells"]:
        auto_doc = bool(cell.pop("has_sd", False))  # nbdev's marker: not a valid notebook field
        source = _source(cell)
        if cell["cell_type"] == "raw":
            continue  # nbdev's front matter, or quarto-only raw content
        if cell["cell_type"] == "markdown":
            flush_auto_docs()
            level = _last_heading_level(source, level)
            cells.append({**cell, "source": strip_link_attributes(source)})
            continue

        directives, code = split_directives(source)
        calls = show_doc_calls(code)
        for expr, keywords in calls:
            obj = find_symbol(expr, module, nb["cells"])
            markdown = render_doc(obj, keywords.get("name"), keywords.get("title_level", min(level + 1, 4)))
            heading = markdown.split("\n", 1)[0].lstrip("#").strip().replace("\\", "")
            anchors.add(github_slugify(heading))
            (auto_docs if auto_doc else cells).append(nbformat.v4.new_markdown_cell(markdown))
        if calls:
            continue
        flush_auto_docs()
        if (shown := code_cell(cell, directives, code)) is not None:
            cells.append(shown)
    flush_auto_docs()

    out = nbformat.v4.new_notebook(cells=[nbformat.from_dict(c) for c in cells])
    out.metadata = nbformat.from_dict(nb.get("metadata", {}))
    out.metadata.setdefault("language_info", NOTEBOOK_LANGUAGE_INFO)
    for i, cell in enumerate(out.cells):
        cell.setdefault("id", f"cell-{i}")  # nbformat 4.5 wants an id on every cell
    nbformat.validate(out)
    return out, anchors


def rewrite_links(markdown: str, pages: dict[str, Page], site_url: str) -> str:
    """Point links at pages of this site: nbdev's `<site_url>/core.html#to_pil`, and `core.html` or
    `00_core.ipynb` written by hand, become `core.ipynb#to_pil`, which Sphinx checks and resolves.
    Links to a page that is not built lose their link and keep their text."""
    from myst_parser.slugs import github_slugify

    by_file = {p.notebook.name: p for p in pages.values()}
    prefix = re.escape(site_url.rstrip("/") + "/") if site_url else ""
    pattern = re.compile(rf"\[([^\]\n]*)\]\((?:{prefix})?([\w.-]+?)\.(html|ipynb)(?:#([^)\s]*))?\)")

    def fix(m):
        text, stem, suffix, anchor = m.groups()
        page = pages.get(stem) if suffix == "html" else by_file.get(f"{stem}.ipynb")
        if page is None:  # not a page of this site: keep nbdev's dead links as text only
            return text if site_url and site_url in m.group(0) else m.group(0)
        slug = github_slugify(anchor) if anchor else ""
        return f"[{text}]({page.name}.ipynb{'#' + slug if slug in page.anchors else ''})"

    return pattern.sub(fix, markdown)


def make_pages(proc: Path, lib_name: str, site_url: str) -> list[Page]:
    "The site's pages from the processed notebooks in `proc`, in site order, with links resolved."
    pages = {}
    for notebook in lesson_notebooks(proc):
        nb, anchors = convert_notebook(json.loads(notebook.read_text(encoding="utf-8")), lib_name)
        page = Page(notebook, page_name(notebook), nb, anchors)
        pages[page.name] = page
    for page in pages.values():
        for cell in page.nb.cells:
            if cell.cell_type == "markdown":
                cell.source = rewrite_links(cell.source, pages, site_url)
    return list(pages.values())


# ---------------------------------------------------------------------------------------------
# Step 3: the Sphinx project

CONF_PY = '''\
# Generated by tools/build_docs.py; it is rewritten on every build.
project = {title!r}
html_title = {title!r}
author = {author!r}
copyright = {copyright!r}
language = "en"

extensions = ["myst_nb"]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_dmath_double_inline = True  # `$$...$$` inside a paragraph is display maths, as in Jupyter
myst_heading_anchors = 4
nb_execution_mode = "off"  # show the outputs stored in the notebooks; never run them
nb_merge_streams = True

html_theme = "furo"
html_static_path = ["_static"]
html_copy_source = False
html_show_sourcelink = False
# A local copy of MathJax 3 (copied from the django-static-mathjax package), so maths renders offline.
mathjax_path = "mathjax/tex-chtml.js"
html_favicon = "_static/favicon.svg"  # without one, every browser asks for /favicon.ico and gets a 404
exclude_patterns = ["_build", "jupyter_execute", "**/.ipynb_checkpoints"]
'''

# A small mark for the browser tab: a low-rank product, A (tall) times B (wide).
FAVICON = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">
<rect x="3" y="3" width="8" height="26" rx="2" fill="#3b6fb6"/><rect x="14" y="3" width="15" height="8" rx="2" fill="#e07b39"/>
</svg>
"""

# The parts of MathJax 3 that the TeX-to-HTML component loads: itself, its fonts, the TeX
# extensions it loads on demand and the menu's accessibility tools.
MATHJAX_FILES = ["tex-chtml.js", "input/tex/extensions", "output/chtml/fonts/woff-v2", "ui", "a11y"]


def mathjax_dir() -> Path:
    "The MathJax 3 `es5` folder shipped by the django-static-mathjax package."
    spec = importlib.util.find_spec("mathjax")
    if spec is not None and spec.submodule_search_locations:
        es5 = Path(list(spec.submodule_search_locations)[0]) / "static" / "mathjax" / "es5"
        if (es5 / "tex-chtml.js").exists():
            return es5
    sys.exit("MathJax not found: the site renders its maths with a local copy of MathJax. "
             "Install it with `pip install django-static-mathjax==3.2.2.1`.")


def copy_mathjax(static: Path) -> None:
    "Copy the MathJax files the site needs into `static/mathjax`."
    es5, dest = mathjax_dir(), static / "mathjax"
    for rel in MATHJAX_FILES:
        src = es5 / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, dirs_exist_ok=True)
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shutil.copy2(es5.parent / "LICENSE", dest / "LICENSE")


def toctree(names: list[str]) -> str:
    "A hidden toctree that puts `names` in the navigation, in that order."
    return "```{toctree}\n:hidden:\n:maxdepth: 1\n\n" + "\n".join(names) + "\n```"


def write_sphinx_sources(pages: list[Page], proc: Path, src: Path, cfg: dict) -> None:
    "Write conf.py, the pages, the files the notebooks refer to, and MathJax into `src`."
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for f in proc.rglob("*"):  # images and other files next to the notebooks
        rel = f.relative_to(proc)
        if f.is_file() and f.suffix not in (".ipynb", ".md", ".py", ".qmd", ".rst", ".yml") \
                and not any(part.startswith(".") for part in rel.parts):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, src / rel)

    lessons = [p.name for p in pages if p.name != "index"]
    index = next((p for p in pages if p.name == "index"), None)
    if index is None:  # no nbs/index.ipynb yet: a plain front page
        text = f"# {cfg['title']}\n\n> {cfg.get('description', '')}\n\n{toctree(lessons)}\n"
        (src / "index.md").write_text(text, encoding="utf-8")
    else:
        index.nb.cells.append(nbformat.v4.new_markdown_cell(toctree(lessons), id="docs-toctree"))
    for page in pages:
        nbformat.write(page.nb, src / f"{page.name}.ipynb")

    (src / "conf.py").write_text(CONF_PY.format(title=cfg["title"], author=cfg.get("author", ""),
                                                copyright=cfg.get("copyright", "")), encoding="utf-8")
    copy_mathjax(src / "_static")
    (src / "_static" / "favicon.svg").write_text(FAVICON, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Step 4: sphinx-build, and the whole build


def run_sphinx(src: Path, html: Path, doctrees: Path) -> None:
    "Build the HTML site from `src` into `html`; every Sphinx warning fails the build."
    if html.exists():
        shutil.rmtree(html)  # start clean, so that pages of removed notebooks go too
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(doctrees), str(src), str(html)]
    result = subprocess.run(cmd)
    if result.returncode:
        sys.exit(f"sphinx-build failed (exit {result.returncode}); see its messages above.")


def publish(html: Path, out: Path) -> None:
    "Copy the built site to `out`, replacing a site built there before."
    if out.exists():
        if any(out.iterdir()) and not (out / ".buildinfo").exists():
            sys.exit(f"{out} is not empty and holds no previous site; not overwriting it.")
        shutil.rmtree(out)
    shutil.copytree(html, out)


def build_site(out: Path, work: Path, root: Path = ROOT) -> Path:
    """Build the documentation site of the project at `root` into `out`.

    `work` holds the processed notebooks, the Sphinx sources and Sphinx's own output: myst-nb
    writes its image files next to Sphinx's output folder, so Sphinx builds inside `work`."""
    cfg = settings(root)
    work.mkdir(parents=True, exist_ok=True)
    proc = process_notebooks(work / "proc", root)
    site_url = cfg.get("doc_host", "").rstrip("/") + cfg.get("doc_baseurl", "")
    pages = make_pages(proc, cfg["lib_name"], site_url)
    write_sphinx_sources(pages, proc, work / "source", cfg)
    run_sphinx(work / "source", work / "html", work / "doctrees")
    publish(work / "html", out)
    return out


# ---------------------------------------------------------------------------------------------
# README.md from nbs/index.ipynb

_ANSI = re.compile(r"\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])")


def _output_text(out: dict) -> str | None:
    "An output as README text: markdown as it is, other text in a fence; None for other outputs."
    if out["output_type"] == "stream":
        return f"```\n{_ANSI.sub('', _source({'source': out['text']})).rstrip()}\n```"
    if out["output_type"] == "error":
        return f"```\n{_ANSI.sub('', chr(10).join(out.get('traceback', []))).rstrip()}\n```"
    data = out.get("data", {})
    if "text/markdown" in data:
        return strip_link_attributes(_source({"source": data["text/markdown"]})).strip()
    if "text/plain" in data:
        return f"```\n{_source({'source': data['text/plain']}).rstrip()}\n```"
    return None


def readme_text(index: Path) -> str:
    """README.md made from the notebook `index`: markdown cells as they are, code cells in
    ```python fences with their text outputs in plain fences; `#|` options are honoured
    (hide, include: false, echo: false, output: false) and left out."""
    nb = json.loads(index.read_text(encoding="utf-8"))
    blocks = [README_HEADER]
    for cell in nb["cells"]:
        source = _source(cell)
        if cell["cell_type"] == "markdown":
            if source.strip():
                blocks.append(source.strip())
            continue
        if cell["cell_type"] != "code":
            continue
        directives, code = split_directives(source)
        if "hide" in directives or directives.get("include") == "false" or "default_exp" in directives:
            continue
        if code.strip() and directives.get("echo") != "false":
            blocks.append(f"```python\n{code.strip()}\n```")
        if directives.get("output") != "false":
            blocks.extend(t for t in map(_output_text, cell.get("outputs", [])) if t)
    return "\n\n".join(blocks) + "\n"


def _index_notebook(root: Path) -> Path:
    index = root / settings(root).get("nbs_path", "nbs") / "index.ipynb"
    if not index.exists():
        sys.exit(f"{index.relative_to(root)} does not exist: README.md is made from it.")
    return index


def write_readme(root: Path = ROOT) -> Path:
    "Write README.md from nbs/index.ipynb."
    readme = root / "README.md"
    readme.write_text(readme_text(_index_notebook(root)), encoding="utf-8")
    return readme


def readme_is_current(root: Path = ROOT) -> bool:
    "Whether README.md is what `write_readme` would write."
    readme = root / "README.md"
    return readme.exists() and readme.read_text(encoding="utf-8") == readme_text(_index_notebook(root))


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "_site", help="folder for the HTML site (default: _site)")
    parser.add_argument("--work", type=Path, default=ROOT / "_docs",
                        help="folder for the generated Sphinx sources and caches (default: _docs)")
    parser.add_argument("--readme", action="store_true", help="write README.md from nbs/index.ipynb and stop")
    parser.add_argument("--check-readme", action="store_true",
                        help="exit non-zero if README.md differs from what --readme would write")
    args = parser.parse_args(argv)

    if args.readme:
        print(f"wrote {write_readme()}")
        return 0
    if args.check_readme:
        if readme_is_current():
            print("README.md is up to date with nbs/index.ipynb")
            return 0
        print("README.md is out of date with nbs/index.ipynb: run `python tools/build_docs.py --readme`",
              file=sys.stderr)
        return 1
    out = build_site(args.out.resolve(), args.work.resolve())
    print(f"site built: {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
