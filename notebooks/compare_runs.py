"""Training runs for notebooks/04_compare.ipynb: several fine-tunes of one base, and saved checkpoints.

all-MiniLM-L6-v2 is fine-tuned with notebook 02's contrastive recipe (``lora_learns_less``:
data, encoder, InfoNCE loss, batch order) on one of two tasks:

* ``code``: docstring -> code retrieval over the Python standard library;
* ``prose``: man-page sentence -> next sentence (a different task on different text);

either fully (every weight) or as a PEFT LoRA of rank r on the attention and FFN matrices.
A full run can save ``checkpoint-<step>`` folders on the way, as a Trainer's ``output/`` does.

Example::

    run = train_run("full", "code", data, cfg, paths.model, out / "full_code", save_at=(25, 50))
    run.final      # out/full_code/checkpoint-50
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

import lora_learns_less as lll


@dataclass(frozen=True)
class Run:
    """Where one training run went: ``final`` is the model folder (or the adapter folder for LoRA)."""

    label: str
    final: Path
    checkpoints: list[Path]
    seconds: float
    losses: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "final": str(self.final), "checkpoints": [str(c) for c in self.checkpoints],
                "seconds": self.seconds, "first_loss": self.losses[0], "last_loss": self.losses[-1]}


def task_pairs(task: str, data: dict[str, Any]) -> list[tuple[str, str]]:
    """(query, positive) training pairs of a task: code = (docstring, code), prose = (sentence, next sentence)."""
    if task == "code":
        return [(p["doc"], p["code"]) for p in data["train"]]
    if task == "prose":
        return [(a, b) for a, b in data["prose"]["pairs"]]
    raise ValueError(f"task must be 'code' or 'prose', got {task!r}")


def train_run(
    mode: str, task: str, data: dict[str, Any], cfg: lll.ExperimentConfig, base: Path, out: Path,
    rank: int | None = None, seed: int | None = None, save_at: Sequence[int] = (),
) -> Run:
    """Fine-tune ``base`` (``mode`` "full" or "lora" at ``rank``, alpha = 2·rank) for ``cfg.steps`` steps.

    Full runs are saved as ``out/checkpoint-<step>`` at each step of ``save_at`` and at the
    end; a LoRA run saves its adapter to ``out``. ``seed`` (default ``cfg.seed``) sets the
    initialisation of LoRA's A, dropout and the batch order.
    """
    seed = cfg.seed if seed is None else seed
    device = cfg.resolved_device()
    lll.seed_everything(seed)
    model, tokenizer = lll.load_encoder(base, device)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=cfg.lora_dropout,
                                                 target_modules=lll.LORA_TARGET_REGEX, bias="none"))
    elif mode != "full":
        raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
    pairs = task_pairs(task, data)
    max_positive = cfg.max_code_tokens if task == "code" else cfg.max_prose_tokens
    max_query = cfg.max_doc_tokens if task == "code" else cfg.max_prose_tokens
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lora_lr if mode == "lora" else cfg.full_lr,
                                  weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (cfg.steps - step) / max(1, cfg.steps - warmup))))
    batches = lll.batch_order(len(pairs), cfg.steps, cfg.batch_size, seed)
    out.mkdir(parents=True, exist_ok=True)
    saves = sorted({s for s in save_at if 0 < s < cfg.steps} | {cfg.steps}) if mode == "full" else []
    checkpoints, losses = [], []
    model.train()
    started = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        chosen = [pairs[i] for i in batches[step - 1]]
        queries = lll.tokenize(tokenizer, [q for q, _ in chosen], max_query, device)
        positives = lll.tokenize(tokenizer, [p for _, p in chosen], max_positive, device)
        loss = lll.info_nce_loss(lll.embed(model, queries), lll.embed(model, positives), cfg.scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step in saves:
            folder = out / f"checkpoint-{step}"
            model.save_pretrained(folder)
            checkpoints.append(folder)
    if mode == "lora":
        model.save_pretrained(out)
    seconds = round(time.perf_counter() - started, 1)
    label = f"{mode}{rank if mode == 'lora' else ''} {task}" + (f" seed {seed}" if seed != cfg.seed else "")
    return Run(label, checkpoints[-1] if checkpoints else out, checkpoints, seconds, losses)


def small_config(cfg: lll.ExperimentConfig, steps: int) -> lll.ExperimentConfig:
    """``cfg`` with ``steps`` steps (kept when in fast mode, which has its own)."""
    return cfg if cfg.fast else dataclasses.replace(cfg, steps=steps)
