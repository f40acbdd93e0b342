"The documentation site and README that tools/build_docs.py makes from the notebooks."
import importlib
import importlib.util
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("build_docs", ROOT / "tools" / "build_docs.py")
build_docs = sys.modules["build_docs"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_docs)

NOTEBOOKS = build_docs.lesson_notebooks(ROOT / "nbs")
IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif", "image/svg+xml")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "The site, built once for this module by the tool's command line into a temporary folder."
    tmp = tmp_path_factory.mktemp("docs")
    out = tmp / "_site"
    (tmp / "started").touch()  # when the build began
    subprocess.run([sys.executable, str(ROOT / "tools" / "build_docs.py"), "--out", str(out), "--work", str(tmp / "work")],
                   check=True, cwd=tmp)
    return out


def page(site, notebook) -> BeautifulSoup:
    return BeautifulSoup((site / f"{build_docs.page_name(notebook)}.html").read_text(encoding="utf-8"), "html.parser")


def heading_text(h) -> str:
    return h.get_text().rstrip("¶").strip()


def shown_image_outputs(notebook: Path) -> int:
    "How many outputs of `notebook`'s shown cells hold an image."
    n = 0
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] != "code":
            continue
        directives, _ = build_docs.split_directives("".join(cell["source"]))
        if "hide" in directives or directives.get("include") == "false" or directives.get("output") == "false":
            continue
        n += sum(any(m in out.get("data", {}) for m in IMAGE_MIMES) for out in cell.get("outputs", []))
    return n


def exported_symbols(notebook: Path) -> list[str]:
    "The functions and classes that `notebook` exports (those nbdev documents with show_doc)."
    module_name = build_docs.default_exp(json.loads(notebook.read_text(encoding="utf-8"))["cells"])
    if module_name is None:
        return []
    module = importlib.import_module(f"sd_lora.{module_name}")
    return [name for name in getattr(module, "__all__", [])
            if (inspect.isfunction(obj := getattr(module, name)) or inspect.isclass(obj))
            and obj.__module__ == module.__name__]


def test_one_page_per_notebook(site):
    assert NOTEBOOKS[0].name == "index.ipynb"
    for nb in NOTEBOOKS:
        assert (site / f"{build_docs.page_name(nb)}.html").exists(), nb.name
    assert (site / "index.html").exists()


def test_navigation_lists_lessons_in_order(site):
    expected = [f"{build_docs.page_name(nb)}.html" for nb in NOTEBOOKS if nb.stem != "index"]
    index = page(site, NOTEBOOKS[0])
    assert [a["href"] for a in index.select(".sidebar-tree a.reference")] == expected
    assert index.title.get_text().endswith("sd_lora")


def test_images_are_shown_and_exist(site):
    for nb in NOTEBOOKS:
        imgs = page(site, nb).select("article img")
        assert len(imgs) >= shown_image_outputs(nb), nb.name
        for img in imgs:
            assert (site / img["src"]).is_file(), (nb.name, img["src"])


def test_every_exported_symbol_is_documented(site):
    documented = 0
    for nb in NOTEBOOKS:
        sections = {heading_text(h): h.parent for h in page(site, nb).select(
            "article section > h2, article section > h3, article section > h4")}
        for name in exported_symbols(nb):
            assert name in sections, f"{name} is not documented on the page of {nb.name}"
            assert sections[name].select_one("div.highlight pre"), f"no signature for {name}"
            documented += 1
    assert documented > 20


def test_show_doc_signature_and_parameter_table(site):
    pages = {build_docs.page_name(nb): nb for nb in NOTEBOOKS}
    noisify = page(site, pages["diffusion"]).find("section", id="noisify")
    assert heading_text(noisify.find("h3")) == "noisify"
    assert "def noisify(" in noisify.select_one("div.highlight pre").get_text()
    rows = [[td.get_text(" ", strip=True) for td in tr.find_all("td")] for tr in noisify.select("table tbody tr")]
    assert rows[0][:2] == ["x0", "torch.Tensor"] and "clean latents" in rows[0][-1]  # fastcore's DocmentTbl
    assert "target=" not in str(noisify) and "{" not in noisify.find("a").get_text()

    train_config = page(site, pages["config"]).find("section", id="trainconfig")
    assert "class TrainConfig(" in train_config.select_one("div.highlight pre").get_text()
    params = [tr.find("td").get_text(strip=True) for tr in train_config.select("table tbody tr")]
    assert {"pretrained_model_name_or_path", "learning_rate", "rank"} <= set(params)


def test_maths_render_offline(site):
    diffusion = page(site, next(nb for nb in NOTEBOOKS if nb.stem.endswith("_diffusion")))
    assert diffusion.select("article div.math") and diffusion.select("article span.math")
    scripts = [s["src"] for s in diffusion.find_all("script", src=True)]
    mathjax = [s for s in scripts if "mathjax" in s.lower()]
    assert mathjax and not any("://" in s for s in mathjax), scripts
    assert (site / mathjax[0].split("?")[0]).is_file()
    assert (site / "_static/mathjax/output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff").is_file()


def test_internal_links_resolve(site):
    ids = {f.name: {t["id"] for t in BeautifulSoup(f.read_text(encoding="utf-8"), "html.parser").find_all(id=True)}
           for f in site.glob("*.html")}
    for f in site.glob("*.html"):
        for a in BeautifulSoup(f.read_text(encoding="utf-8"), "html.parser").select("article a[href]"):
            href = a["href"]
            assert "sd-lora.github.io" not in href, (f.name, href)
            if "://" in href or href.startswith("mailto:"):
                continue
            target, _, fragment = href.partition("#")
            target = target or f.name
            assert target in ids and (not fragment or fragment in ids[target]), (f.name, href)


def test_nbdev_writes_nothing_into_nbs(site):
    for name in ("_quarto.yml", "nbdev.yml", "sidebar.yml"):
        assert not (ROOT / "nbs" / name).exists()
    proc = ROOT / "_proc"  # the notebooks are processed in memory: no _proc/ (or none newer than this build)
    assert not proc.exists() or proc.stat().st_mtime < (site.parent / "started").stat().st_mtime


def test_pages_open_with_prose(site):
    "After the title and its description, a page goes on with prose: import cells are collapsed, not shown."
    for nb in NOTEBOOKS:
        h1 = page(site, nb).select_one("article h1")
        blocks = [el for el in h1.find_next_siblings() if el.name != "blockquote"]
        first = next(el for el in blocks if "tag_hide-input" not in el.get("class", []))
        assert first.name in ("p", "section", "ul", "ol") and "cell" not in first.get("class", []), (nb.name, str(first)[:300])
        for cell in page(site, nb).select("article div.cell.tag_hide-input"):
            assert cell.select_one("details.above-input"), (nb.name, "import cell not collapsible")


def test_readme_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "build_docs.py"), "--check-readme"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _code(source, outputs=()):
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": list(outputs), "source": source}


def test_readme_from_index(tmp_path):
    (tmp_path / "nbs").mkdir()
    shutil.copy(ROOT / "settings.ini", tmp_path / "settings.ini")
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": "# demo\n\n> A test project."},
        _code("#| hide\nimport secret"),
        _code("#| echo: false\nprint('only output')", [{"output_type": "stream", "name": "stdout", "text": "only output\n"}]),
        _code("1 + 1", [{"output_type": "execute_result", "execution_count": 1, "metadata": {},
                         "data": {"text/plain": "2", "image/png": "iVBORw0KGgo="}}]),
        _code("#| output: false\nx = 3\nx", [{"output_type": "execute_result", "execution_count": 2, "metadata": {},
                                              "data": {"text/plain": "3"}}]),
    ]
    nb = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "nbs" / "index.ipynb").write_text(json.dumps(nb))
    assert not build_docs.readme_is_current(tmp_path)
    build_docs.write_readme(tmp_path)
    assert build_docs.readme_is_current(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text == (build_docs.README_HEADER + "\n\n# demo\n\n> A test project.\n\n```\nonly output\n```\n\n"
                    "```python\n1 + 1\n```\n\n![Figure 1](docs/images/index-1.png)\n\n```python\nx = 3\nx\n```\n")
    image = tmp_path / "docs/images/index-1.png"
    assert image.read_bytes() == b"\x89PNG\r\n\x1a\n"  # the output's PNG, beside the README that shows it
    (tmp_path / "README.md").write_text(text + "edited by hand\n")
    assert not build_docs.readme_is_current(tmp_path)
    build_docs.write_readme(tmp_path)
    image.write_bytes(b"an older figure")  # a stale image
    assert not build_docs.readme_is_current(tmp_path)
    build_docs.write_readme(tmp_path)
    (tmp_path / "docs/images/index-2.png").write_bytes(b"a figure the notebook no longer shows")
    assert not build_docs.readme_is_current(tmp_path)
    build_docs.write_readme(tmp_path)
    assert build_docs.readme_is_current(tmp_path) and not (tmp_path / "docs/images/index-2.png").exists()


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
SCREENSHOT = ROOT / "test-output" / "site-index.png"


@pytest.fixture(scope="module")
def served(site):
    "The built site over HTTP on a free localhost port, as a reader's browser gets it."
    import functools, http.server, threading
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    "Debian's headless Chromium with a fresh profile, driven by Playwright."
    if not CHROMIUM.exists():
        import os
        if os.environ.get("SD_LORA_REQUIRE_BROWSER"): pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); CI sets SD_LORA_REQUIRE_BROWSER and installs it")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")), headless=True,
                                                    executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield ctx
        ctx.close()


def visit(ctx, url: str) -> dict:
    "Open `url`; what a reader would see go wrong there, and the page's links, images and navigation."
    page, problems = ctx.new_page(), []
    page.set_viewport_size({"width": 1400, "height": 900})  # a laptop's browser window
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"script error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
    response = page.goto(url, wait_until="load")
    if response is None or response.status != 200: problems.append(f"page did not load: {response and response.status}")
    page.wait_for_load_state("networkidle")
    info = page.evaluate("""() => ({
        broken_images: [...document.querySelectorAll('article img')].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
        images: document.querySelectorAll('article img').length,
        links: [...document.querySelectorAll('a[href]')].map(a => a.href),
        ids: [...document.querySelectorAll('[id]')].map(e => e.id),
        nav: [...document.querySelectorAll('.sidebar-tree a.reference')].map(a => a.getAttribute('href')),
        maths: document.querySelectorAll('mjx-container').length,
        cut_off: [...document.querySelectorAll('article pre')].filter(p => p.scrollWidth > p.clientWidth + 1).length,
        code_columns: (() => {  // how many characters of code fit on a line of a code cell
            const pre = document.querySelector('article div.cell:not(.tag_hide-input) div.highlight pre');
            if (!pre) return null;
            const probe = document.createElement('span'), style = getComputedStyle(pre);
            probe.textContent = 'x'.repeat(100);
            probe.style.whiteSpace = 'pre'; probe.style.position = 'absolute';
            pre.appendChild(probe);
            const per_char = probe.getBoundingClientRect().width / 100;
            probe.remove();
            return (pre.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight)) / per_char;
        })(),
    })""")
    info["problems"] = problems
    return info, page


def test_site_in_a_real_browser(site, served, browser_context):
    pages = {f"{build_docs.page_name(nb)}.html": nb for nb in NOTEBOOKS}
    seen, links = {}, []
    for name in ["index.html"] + [n for n in pages if n != "index.html"]:
        info, page = visit(browser_context, f"{served}/{name}")
        if name == "index.html":
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert info["nav"] == [n for n in pages if n != "index.html"], info["nav"]  # lessons in order
        page.close()
        assert not info["problems"], (name, info["problems"])
        assert not info["broken_images"], (name, info["broken_images"])
        assert info["images"] >= shown_image_outputs(pages[name]), name
        assert not info["cut_off"], (name, f"{info['cut_off']} code blocks cut off at 1400 px")
        assert info["code_columns"] is None or info["code_columns"] >= 120, (name, info["code_columns"])
        seen[name] = set(info["ids"])
        links += [(name, href) for href in info["links"] if href.startswith(served)]
    for name, href in links:  # every internal link reaches a page that exists, and the anchor on it
        target, _, fragment = href.removeprefix(served + "/").partition("#")
        target = target or name
        if target.endswith(".html"):
            assert target in seen or (site / target).is_file(), (name, href)
            if fragment and target in seen: assert fragment in seen[target], (name, href)
        else:
            assert (site / target.split("?")[0]).exists(), (name, href)
    assert SCREENSHOT.stat().st_size > 10_000


def test_maths_typeset_in_the_browser(served, browser_context):
    name = next(f"{build_docs.page_name(nb)}.html" for nb in NOTEBOOKS if nb.stem.endswith("_diffusion"))
    info, page = visit(browser_context, f"{served}/{name}")
    page.wait_for_selector("article mjx-container", timeout=30_000)  # MathJax, served from the site, typeset it
    assert page.locator("article mjx-container").count() >= 3
    page.close()
    assert not info["problems"], info["problems"]


def test_every_parameter_of_every_exported_function_has_a_docment():
    "The site's parameter tables come from docments comments: none may be blank."
    from fastcore.docments import docments
    missing = []
    for nb in NOTEBOOKS:
        for name in exported_symbols(nb):
            obj = getattr(importlib.import_module(f"sd_lora.{build_docs.default_exp(json.loads(nb.read_text())['cells'])}"), name)
            if not inspect.getdoc(obj): missing.append(f"{name}: no docstring")
            for param, info in docments(obj, full=True, args_kwargs=True).items():
                if param not in ("self", "return", "args", "kwargs") and not info.get("docment"):
                    missing.append(f"{nb.stem}: {name}({param})")
    assert not missing, "\n".join(missing)
