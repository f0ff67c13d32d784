"""`--html PATH`: one self-contained page per report (rank, intruders, compare, trajectory, extract).

Two checks. The first always runs: the page parsed with Python's HTML parser holds the command's
tables (as many rows as the report has entries), PNG figures embedded as data URIs, the versions
and the command line, and refers to nothing outside itself (no script, no link, no remote or local
URL). The second opens each page in a real headless browser (Chromium, Debian's ``chromium``
package; ``.ci/run`` installs it), reads back from the rendered DOM how many tables, rows and
decoded images there are, and takes a screenshot that must not be blank.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser

import pytest

from conftest import invoke

import deltakit
from deltakit.demo import write_demo_pair

LAYER0 = "*layers.0.self_attn.[qv]*"


class PageParser(HTMLParser):
    """Tables (rows of cells), images' src, every URL-bearing attribute, and the tags seen."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self.text: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        self.urls += [value for key, value in attrs.items() if key in ("src", "href", "action", "srcset") and value]

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Every command's page on layer 0 of the demo pair, and what each report holds."""
    from click.testing import CliRunner

    root = tmp_path_factory.mktemp("html")
    base, ft = write_demo_pair(root / "demo")
    runner = CliRunner()
    adapter = root / "adapter"
    commands = {
        "extract": ["extract", base, ft, "-o", adapter, "--rank", "4"],
        "rank": ["rank", base, ft],
        "intruders": ["intruders", base, ft],
        "compare": ["compare", base, ft, adapter, "-k", "4"],
        "trajectory": ["trajectory", base, adapter, ft],
    }
    found = {}
    for name, args in commands.items():
        page = root / f"{name}.html"
        result = invoke(runner, *args, "--include", LAYER0, "--html", page, "--json", root / f"{name}.json", "-q",
                        "--device", "cpu")
        assert result.exit_code == 0, result.output
        found[name] = (page, json.loads((root / f"{name}.json").read_text()), [str(a) for a in args])
    return found


def test_each_page_is_self_contained_with_its_tables_figures_versions_and_command(pages):
    for name, (page, report, args) in pages.items():
        text = page.read_text()
        parsed = PageParser()
        parsed.feed(text)
        assert text.startswith("<!DOCTYPE html>"), name
        assert not parsed.tags & {"script", "link", "iframe", "object", "embed"}, (name, parsed.tags)
        assert all(url.startswith("data:image/png;base64,") for url in parsed.urls), (name, parsed.urls)
        assert not re.search(r"url\(|@import|https?://", text.split("<body>")[0]), name  # the inline style sheet
        assert parsed.images, name
        for src in parsed.images:
            width, height = png_size(base64.b64decode(src.split(",", 1)[1]))
            assert width > 200 and height > 100, (name, width, height)
        words = re.sub(r"\s+", " ", " ".join(parsed.text))
        assert f"deltakit {deltakit.__version__}" in words and "torch " in words and "Python " in words, name
        assert "command: deltakit " + name in words and args[1] in words, name
        first = parsed.tables[0]
        if name in ("rank", "intruders", "extract"):  # one row per matrix, after the header
            assert len(first) == 1 + len(report["matrices"]), name
            assert [row[0] for row in first[1:]] == [m["name"] for m in report["matrices"]], name
        assert all(len(row) == len(table[0]) for table in parsed.tables for row in table), name


def test_rank_page_cells_are_the_report_values(pages):
    page, report, _ = pages["rank"]
    parsed = PageParser()
    parsed.feed(page.read_text())
    header, *rows = parsed.tables[0]
    column = header.index("rank")
    assert [int(row[column]) for row in rows] == [m["rank"] for m in report["matrices"]]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

PROBE = """<script>
window.addEventListener('load', function () {
  var images = Array.from(document.images);
  document.title = JSON.stringify({tables: document.querySelectorAll('table').length,
    rows: document.querySelectorAll('tr').length, images: images.length,
    decoded: images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    width: document.body.scrollWidth});
});
</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-extensions", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium; .ci/run installs it)")
def test_pages_render_in_a_headless_browser(pages, tmp_path):
    import matplotlib.image

    for name, (page, report, _) in pages.items():
        probe = tmp_path / f"{name}-probe.html"  # the page plus a script that reports what the browser rendered
        probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
        done = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
        assert done.returncode == 0, done.stderr[-2000:]
        title = re.search(r"<title>(.*?)</title>", done.stdout, re.S)
        seen = json.loads(title.group(1).replace("&quot;", '"'))
        parsed = PageParser()
        parsed.feed(page.read_text())
        assert seen["tables"] == len(parsed.tables) > 0, (name, seen)
        assert seen["rows"] == sum(len(t) for t in parsed.tables), (name, seen)
        assert seen["images"] == seen["decoded"] == len(parsed.images) > 0, (name, seen)
    for name in ("rank", "compare"):  # a screenshot of two of them: seconds each
        page = pages[name][0]
        shot = tmp_path / f"{name}.png"
        done = _chromium(f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri())
        assert shot.is_file(), done.stderr[-2000:]
        pixels = matplotlib.image.imread(str(shot))
        assert pixels.shape[0] == 1600 and pixels.shape[1] == 1280
        assert pixels[..., :3].std() > 0.05, name  # not a blank page: text, rules and a figure on white
