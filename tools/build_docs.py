#!/usr/bin/env python
"""Build the sd_lora documentation site with Sphinx, myst-nb and furo (no quarto), and README.md.

    python tools/build_docs.py [--out _site]    # build the HTML site
    python tools/build_docs.py --readme         # write README.md (and its images) from nbs/index.ipynb
    python tools/build_docs.py --check-readme   # fail if README.md or its images are out of date

Each notebook is processed in memory by nbdev's own processors (`FilterDefaults`, less what settings.ini's
`skip_procs` names; see `SiteFilter`) and written as a page into a build folder; `sphinx-build -W` builds the
site with the settings in docs/conf.py. Nothing is executed: the pages show the outputs stored in the notebooks.
"""
from __future__ import annotations

import argparse, ast, base64, functools, importlib, inspect, itertools, os, re, shutil, subprocess, sys, tempfile
from configparser import ConfigParser
from inspect import Parameter, formatannotation, isclass
from pathlib import Path

import nbformat
from execnb.nbio import nb2str, read_nb
from fastcore.basics import AttrDict
from fastcore.docments import DocmentTbl, MarkdownRenderer
from myst_parser.slugs import github_slugify
from nbdev.config import get_config
from nbdev.doclinks import NbdevLookup
from nbdev.process import Processor
from nbdev.processors import FilterDefaults, exec_show_docs
from nbdev.showdoc import show_doc

ROOT = Path(__file__).resolve().parent.parent
README_HEADER = "<!-- Generated from nbs/index.ipynb by `python tools/build_docs.py --readme`; do not edit. -->"
README_IMAGES = "docs/images"  # where README.md's images go, beside it
IMAGE_MIMES = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/svg+xml": "svg"}
_DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")
_LINK_ATTRS = re.compile(r"(\]\([^)\s]*\))\{[^}\n]*\}")  # quarto's `[text](url){target="_blank"}`
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")

def settings(root: Path = ROOT) -> dict:
    "The `[DEFAULT]` section of the project's settings.ini, with `%(...)s` references resolved."
    (cfg := ConfigParser()).read(root / "settings.ini")
    return dict(cfg["DEFAULT"])

def page_name(notebook: Path) -> str:
    "nbdev's name for a notebook's page: the file name, lower-cased, less any `00_` lesson number."
    return re.sub(r"^\d+[a-zA-Z0-9]*_", "", notebook.stem.lower())

def lesson_notebooks(nbs: Path) -> list[Path]:
    "The notebooks of `nbs` in site order: index first, then the lessons by file name."
    return sorted(sorted(p for p in nbs.glob("*.ipynb") if not p.name.startswith((".", "_"))), key=lambda p: p.stem != "index")

def split_directives(source: str) -> tuple[dict[str, str], str]:
    "Split the leading `#| name: value` lines off a cell's source: `({name: value}, rest)`."
    lines = source.splitlines()
    directives = {}
    while lines and (m := _DIRECTIVE.match(lines[0])):
        directives[m.group(1).lower()] = m.group(2).strip().strip("'\"").lower()
        lines.pop(0)
    return directives, "\n".join(lines).strip("\n")

def default_exp(cells: list[dict]) -> str | None:
    "The module a notebook exports to, from its `#| default_exp` cell."
    for cell in cells:
        m = re.search(r"^\s*#\|\s*default_exp\s+(\S+)", "".join(cell["source"]), flags=re.MULTILINE)
        if cell["cell_type"] == "code" and m:
            return m.group(1)
    return None

def headings(markdown: str):
    "The `(level, text)` of each heading in `markdown`, outside code fences."
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and (m := _HEADING.match(line)):
            yield len(m.group(1)), m.group(2)

# --- Notebooks to pages, with nbdev's processors ---

lookup = functools.cache(NbdevLookup)  # nbdev's index of the symbols that nbdev projects document

def doc_markdown(obj, name: str | None = None, level: int = 3) -> str:
    "`show_doc(obj)` as markdown: heading, source link, signature and docstring (nbdev's), parameter table (fastcore's)."
    renderer = show_doc(obj, name=name, title_level=level)  # nbdev's BasicMarkdownRenderer
    src = lookup().code(renderer.fn)  # nbdev finds no line number for a qualified name: `...#LNone`
    src = src and src.split("#L")[0] + f"#L{inspect.getsourcelines(inspect.unwrap(obj))[1]}"
    # fastcore's part of it, the signature (docments as comments) and docstring; nbdev's adds quarto-only markup
    body = MarkdownRenderer._repr_markdown_(renderer)
    body = body.replace("```python\ndef ", "```python\nclass ", 1) if isclass(obj) else body
    table = DocmentTbl(obj)  # fastcore's table; its types and defaults as code, and nothing that breaks a row
    cell = lambda text: text.replace("|", r"\|").replace("\n", " ")  # noqa: E731
    fmt = {"anno": lambda a: f"`{cell(a if isinstance(a, str) else formatannotation(a))}`",
           "default": lambda d: f"`{cell(getattr(d, '__name__', None) or repr(d))}`", "docment": cell}
    for p in table.dm.values():
        p.update({k: f(p[k]) for k, f in fmt.items() if p.get(k, Parameter.empty) is not Parameter.empty})
    heading = "#" * level + " " + re.sub(r"([_*])", r"\\\1", renderer.nm)  # no emphasis in a name
    return "\n\n".join(p for p in [heading, f"[source]({src})" if src else "", body, table._repr_markdown_()] if p)

class ShowDocs(Processor):
    """Stands in for nbdev's `exec_show_docs`, which runs every cell that imports something (some of these train
    models): the `show_doc` cells' output is rendered from the package's module instead, its headings one level
    below the last heading, and the cells nbdev inserts for a cell's definitions are put in definition order."""
    def begin(self):
        exp = next((c.directives_["default_exp"][0] for c in self.nb.cells if "default_exp" in c.directives_), None)
        self.ns = vars(importlib.import_module(get_config().lib_name + (f".{exp}" if exp else "")))
        groups = [list(g)[::-1] if sd else list(g) for sd, g in itertools.groupby(self.nb.cells, lambda c: c.get("has_sd"))]
        self.nb.cells, self.level = [c for g in groups for c in g], 1

    def cell(self, cell):
        if cell.cell_type == "markdown":
            self.level = ([lvl for lvl, _ in headings(cell.source)] or [self.level])[-1]
        calls = [n.value for n in (cell.parsed_() or []) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
                 and getattr(n.value.func, "id", None) == "show_doc" and n.value.args]
        docs = []
        for call in calls:
            kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("name", "title_level")}
            obj = eval(ast.unparse(call.args[0]), self.ns)
            docs.append(doc_markdown(obj, kw.get("name"), kw.get("title_level", min(self.level + 1, 4))))
        if docs:
            md = "\n\n".join(docs).splitlines(keepends=True)
            cell.outputs = [AttrDict(output_type="display_data", metadata={}, data=AttrDict({"text/markdown": md}))]

def _imports_only(cell) -> bool:
    "Whether a code cell only sets up: imports, and calls such as `quiet()` or `scratch = tempfile.mkdtemp()`."
    body, imports = cell.parsed_() or [], (ast.Import, ast.ImportFrom)
    return any(isinstance(n, imports) for n in body) and all(
        isinstance(n, imports) or isinstance(n, (ast.Expr, ast.Assign)) and isinstance(n.value, ast.Call) for n in body)

def to_myst(cell):
    """The last processor: quarto's cell options as myst-nb's cell tags, `show_doc` output (`output: asis`) as
    markdown, import cells collapsed, raw cells (quarto's) and widget views dropped."""
    cell.pop("has_sd", None)
    opt, code = split_directives(cell.source)  # the quarto options, which nbdev leaves in the source
    if cell.cell_type == "code" and opt.get("output") == "asis":
        md = "".join("".join(o.get("data", {}).get("text/markdown", [])) for o in cell.outputs)
        cell.update(cell_type="markdown", source=md)
        cell.pop("outputs"), cell.pop("execution_count", None)
    if cell.cell_type == "raw" or opt.get("include") == "false":
        del cell["source"]
    elif cell.cell_type == "markdown":
        cell.source = _LINK_ATTRS.sub(r"\1", cell.source)
    elif cell.cell_type == "code":
        cell.source = code
        for o in cell.outputs:
            o.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
        cell.outputs = [o for o in cell.outputs if o.get("data", True)]
        tags = set(cell.metadata.get("tags", [])) | {tag for tag, on in [
            ("remove-input", opt.get("echo") == "false" or not code.strip()), ("remove-output", opt.get("output") == "false"),
            ("hide-input", not cell.outputs and _imports_only(cell))] if on}  # import cells: collapsed
        if not cell.source.strip() and not cell.outputs:
            del cell["source"]  # e.g. a `#| default_exp` cell
        elif tags:
            cell.metadata["tags"] = sorted(tags)

class SiteFilter(FilterDefaults):
    "nbdev's docs processors for a Sphinx site: quarto's front matter (`FrontmatterProc`) left out, `ShowDocs` for `exec_show_docs`."
    def base_procs(self):
        procs = [ShowDocs if p is exec_show_docs else p for p in super().base_procs() if p.__name__ != "FrontmatterProc"]
        return procs + [to_myst]

def rewrite_links(markdown: str, pages: dict, site_url: str) -> str:
    """Point links at pages of this site: nbdev's `<site_url>/core.html#to_pil`, and `core.html` or `00_core.ipynb`
    written by hand, become `core.ipynb#to_pil`. nbdev's links to pages that are not built keep only their text."""
    by_file = {p["notebook"].name: p for p in pages.values()}
    prefix = re.escape(site_url.rstrip("/") + "/")
    pattern = re.compile(rf"\[([^\]\n]*)\]\((?:{prefix})?([\w.-]+?)\.(html|ipynb)(?:#([^)\s]*))?\)")
    def fix(m):
        text, stem, suffix, anchor = m.groups()
        page = pages.get(stem) if suffix == "html" else by_file.get(f"{stem}.ipynb")
        if page is None:
            return text if site_url in m.group(0) else m.group(0)
        slug = github_slugify(anchor) if anchor else ""
        return f"[{text}]({page['name']}.ipynb{'#' + slug if slug in page['anchors'] else ''})"
    return pattern.sub(fix, markdown)

def make_pages(nbs: Path, site_url: str) -> dict:
    "The processed notebooks of `nbs`, in site order, with their links between pages resolved."
    pages = {}
    for notebook in lesson_notebooks(nbs):
        nb = read_nb(notebook)
        SiteFilter()(nb)
        nb.update(nbformat=4, nbformat_minor=5)  # 4.5: cells have ids
        nb = nbformat.reads(nb2str(nb), as_version=4)
        nb.metadata.setdefault("language_info", {"name": "python", "pygments_lexer": "ipython3"})
        md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        anchors = {github_slugify(re.sub(r"[`*\\]", "", text)) for _, text in headings(md)}
        pages[page_name(notebook)] = dict(notebook=notebook, name=page_name(notebook), nb=nb, anchors=anchors)
    for cell in (c for page in pages.values() for c in page["nb"].cells):  # markdown, and markdown outputs
        for holder, key in [(cell, "source")] * (cell.cell_type == "markdown") + [
                (o["data"], "text/markdown") for o in cell.get("outputs", []) if "text/markdown" in o.get("data", {})]:
            holder[key] = rewrite_links("".join(holder[key]), pages, site_url)
    return pages

def build_site(out: Path, work: Path, root: Path = ROOT) -> Path:
    """Build the site of the project at `root` into `out`; `work` holds the pages (and the files beside the notebooks),
    Sphinx's caches and Sphinx's output."""
    cfg = settings(root)
    os.chdir(root)  # nbdev reads settings.ini from the working directory
    nbs, src = root / cfg.get("nbs_path", "nbs"), work / "source"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(nbs, src, ignore=shutil.ignore_patterns(".*", "_*", "*.ipynb", "*.md", "*.py", "*.qmd", "*.yml"))
    pages = make_pages(nbs, cfg.get("doc_host", "").rstrip("/") + cfg.get("doc_baseurl", ""))
    lessons = [name for name in pages if name != "index"]
    toctree = "```{toctree}\n:hidden:\n:maxdepth: 1\n\n" + "\n".join(lessons) + "\n```"
    if "index" in pages:
        pages["index"]["nb"].cells.append(nbformat.v4.new_markdown_cell(toctree, id="docs-toctree"))
    else:
        (src / "index.md").write_text(f"# {cfg['title']}\n\n> {cfg.get('description', '')}\n\n{toctree}\n", encoding="utf-8")
    for page in pages.values():
        nbformat.validate(page["nb"])
        nbformat.write(page["nb"], src / f"{page['name']}.ipynb")
    html = work / "html"  # myst-nb writes images beside Sphinx's output folder: keep it in `work`
    shutil.rmtree(html, ignore_errors=True)
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-c", str(root / "docs"),
           "-d", str(work / "doctrees"), str(src), str(html)]
    if (rc := subprocess.run(cmd).returncode):
        sys.exit(f"sphinx-build failed (exit {rc}); see its messages above.")
    if out.exists():
        if any(out.iterdir()) and not (out / ".buildinfo").exists():
            sys.exit(f"{out} is not empty and holds no previous site; not overwriting it.")
        shutil.rmtree(out)
    shutil.copytree(html, out)
    return out

# --- README.md from nbs/index.ipynb ---

def _text(src) -> str:
    return re.sub(r"\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])", "", "".join(src)).rstrip()

def readme_files(root: Path = ROOT) -> dict[Path, bytes]:
    """README.md made from nbs/index.ipynb, and its images: markdown cells as they are, code cells in ```python
    fences, text outputs in plain fences and image outputs as PNG (or other) files in docs/images; `#|` options are
    honoured (hide, include: false, echo: false, output: false) and left out."""
    index = root / settings(root).get("nbs_path", "nbs") / "index.ipynb"
    if not index.exists():
        sys.exit(f"{index} does not exist: README.md is made from it.")
    blocks, files = [README_HEADER], {}
    for cell in nbformat.reads(index.read_text(encoding="utf-8"), as_version=4).cells:
        directives, code = split_directives(cell.source)
        if cell.cell_type == "markdown" and cell.source.strip():
            blocks.append(cell.source.strip())
        if cell.cell_type != "code" or {"hide", "default_exp"} & directives.keys() or directives.get("include") == "false":
            continue
        if code.strip() and directives.get("echo") != "false":
            blocks.append(f"```python\n{code.strip()}\n```")
        for out in cell.outputs if directives.get("output") != "false" else []:
            data = out.get("data", {})
            if mime := next((m for m in IMAGE_MIMES if m in data), None):
                rel = f"{README_IMAGES}/index-{len(files) + 1}.{IMAGE_MIMES[mime]}"
                files[root / rel] = data[mime].encode() if mime.endswith("xml") else base64.b64decode(data[mime])
                blocks.append(f"![Figure {len(files)}]({rel})")
            elif out.output_type in ("stream", "error"):
                blocks.append(f"```\n{_text(out.get('text') or chr(10).join(out.get('traceback', [])))}\n```")
            elif "text/markdown" in data:
                blocks.append(_LINK_ATTRS.sub(r"\1", "".join(data["text/markdown"])).strip())
            elif "text/plain" in data:
                blocks.append(f"```\n{_text(data['text/plain'])}\n```")
    return {root / "README.md": ("\n\n".join(blocks) + "\n").encode(), **files}

def _stale_images(root: Path, files: dict) -> list[Path]:
    return [p for p in (root / README_IMAGES).glob("index-*") if p not in files]

def write_readme(root: Path = ROOT) -> Path:
    "Write README.md and its images from nbs/index.ipynb, removing images it no longer shows."
    files = readme_files(root)
    for path in _stale_images(root, files):
        path.unlink()
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root / "README.md"

def readme_is_current(root: Path = ROOT) -> bool:
    "Whether README.md and its images are what `write_readme` would write."
    files = readme_files(root)
    return not _stale_images(root, files) and all(p.is_file() and p.read_bytes() == d for p, d in files.items())

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "_site", help="folder for the HTML site (default: _site)")
    parser.add_argument("--work", type=Path, help="folder for the pages and Sphinx's caches (default: a temporary one)")
    parser.add_argument("--readme", action="store_true", help="write README.md from nbs/index.ipynb and stop")
    parser.add_argument("--check-readme", action="store_true", help="exit 1 if README.md differs from what --readme writes")
    args = parser.parse_args(argv)
    if args.readme:
        print(f"wrote {write_readme()}")
    elif args.check_readme:
        if not readme_is_current():
            sys.exit("README.md is out of date with nbs/index.ipynb: run `python tools/build_docs.py --readme`")
        print("README.md is up to date with nbs/index.ipynb")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = build_site(args.out.resolve(), (args.work or Path(tmp)).resolve())
        print(f"site built: {out / 'index.html'}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
