"""`--html PATH`: one self-contained page per report (rank, intruders, compare, trajectory, extract, and extract
with calibration tokens).

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
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import invoke, save, tiny_llama

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


def _calibrated_pair(root: Path) -> tuple[Path, Path, Path]:
    """A tiny Llama base, a dense fine-tune of it and 4 × 16 calibration token ids: what `extract
    --calibration` runs the fine-tune on (transformers)."""
    base_model = tiny_llama()
    save(base_model, root / "llama-base")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in base_model.named_parameters():
            if parameter.ndim == 2 and "embed" not in name and "lm_head" not in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    save(base_model, root / "llama-ft")
    ids = torch.randint(0, base_model.config.vocab_size, (4, 16), generator=generator)
    save_file({"input_ids": ids}, str(root / "calib.safetensors"))
    return root / "llama-base", root / "llama-ft", root / "calib.safetensors"


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Every command's page on layer 0 of the demo pair (extract also with calibration tokens, on a tiny
    Llama), and what each report holds: label -> (page, JSON report, command line)."""
    from click.testing import CliRunner

    root = tmp_path_factory.mktemp("html")
    base, ft = write_demo_pair(root / "demo")
    llama_base, llama_ft, calibration = _calibrated_pair(root)
    runner = CliRunner()
    adapter = root / "adapter"
    commands = {
        "extract": ["extract", base, ft, "-o", adapter, "--rank", "4"],
        "extract --calibration": ["extract", llama_base, llama_ft, "-o", root / "calibrated", "--rank", "2",
                                  "--calibration", calibration],
        "rank": ["rank", base, ft],
        "intruders": ["intruders", base, ft],
        "compare": ["compare", base, ft, adapter, "-k", "4"],
        "trajectory": ["trajectory", base, adapter, ft],
    }
    found = {}
    for label, args in commands.items():
        stem = label.replace(" --", "-")
        page = root / f"{stem}.html"
        result = invoke(runner, *args, "--include", LAYER0, "--html", page, "--json", root / f"{stem}.json", "-q",
                        "--device", "cpu")
        assert result.exit_code == 0, result.output
        found[label] = (page, json.loads((root / f"{stem}.json").read_text()), [str(a) for a in args])
    return found


def test_each_page_is_self_contained_with_its_tables_figures_versions_and_command(pages):
    for label, (page, report, args) in pages.items():
        name = args[0]
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


def test_extract_page_with_calibration_shows_each_output_error_and_the_fidelity(pages):
    """The calibrated extract page: the output-error column holds each matrix's value from the JSON report, and
    the fidelity line (KL of base + adapter beside the base's) is on the page."""
    page, report, _ = pages["extract --calibration"]
    parsed = PageParser()
    parsed.feed(page.read_text())
    header, *rows = parsed.tables[0]
    assert header[-1] == "output err." and len(rows) == len(report["matrices"]) == 2  # q and v of layer 0
    assert [row[-1] for row in rows] == [f"{m['output_error']:.4f}" for m in report["matrices"]]
    assert all(0.0 < m["output_error"] < 1.0 for m in report["matrices"])
    words = re.sub(r"\s+", " ", " ".join(parsed.text))
    fidelity = report["fidelity"]
    assert (f"fidelity on {fidelity['tokens']:,} calibration tokens: KL(ft ‖ base + adapter) {fidelity['kl']:.4g} "
            f"(KL(ft ‖ base) {fidelity['kl_base']:.4g})") in words
    plain = PageParser()
    plain.feed(pages["extract"][0].read_text())
    assert "output err." not in plain.tables[0][0] and "fidelity on" not in " ".join(plain.text)


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
        probe = tmp_path / f"{name.replace(' --', '-')}-probe.html"  # the page plus a script that reports what the browser rendered
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
        assert all(cell in done.stdout for cell in parsed.tables[0][0]), (name, parsed.tables[0][0])  # the headers
    rendered = _chromium("--dump-dom", pages["extract --calibration"][0].as_uri()).stdout
    assert "output err." in rendered and "KL(ft ‖ base + adapter)" in rendered
    for name in ("rank", "compare", "extract --calibration"):  # screenshots of three of them: seconds each
        page = pages[name][0]
        shot = tmp_path / f"{name.replace(' --', '-')}.png"
        done = _chromium(f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri())
        assert shot.is_file(), done.stderr[-2000:]
        pixels = matplotlib.image.imread(str(shot))
        assert pixels.shape[0] == 1600 and pixels.shape[1] == 1280
        assert pixels[..., :3].std() > 0.05, name  # not a blank page: text, rules and a figure on white
