"""What a run leaves behind: results.json, the exported model, a compressed sparse export, a model card.

Every write is atomic (temporary file or directory, then rename), so an interrupted run never
leaves a half-written artefact under its final name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedspallm.compressed import save_compressed as write_compressed
from fedspallm.environment import describe_environment
from fedspallm.models import find_decoder_blocks, get_weight, prunable_modules, strip_quantization


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False, encoding="utf-8") as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def prunable_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every prunable projection's weight as [out, in], keyed by module name, in block order."""
    return {name: get_weight(layer) for name, layer in prunable_modules(model).items()}


def zero_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every prunable matrix's (zeros, elements)."""
    return {name: (int((weight == 0).sum()), weight.numel()) for name, weight in prunable_matrices(model).items()}


def sparsity_report(model: nn.Module, target: float, counts: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """Achieved sparsity: overall (over prunable matrices) and per matrix, counting every zero.

    ``counts`` (from :func:`zero_counts`, possibly of another process's model) replaces counting ``model``.

    ``blocks`` puts it against every parameter of the decoder blocks (norms, biases, routers and
    matrices out of scope included): ``in_scope`` is the fraction of them in the prunable matrices,
    ``zeros_in_scope`` the fraction that are zeros of those matrices. A mixture-of-experts model whose
    experts were left out shows a small ``in_scope``."""
    counts = zero_counts(model) if counts is None else counts
    zeros = sum(z for z, _ in counts.values())
    total = sum(n for _, n in counts.values())
    block_total = sum(p.numel() for p in find_decoder_blocks(model).parameters())
    return {"target": target, "overall": zeros / total if total else 0.0,
            "per_matrix": {name: z / n for name, (z, n) in counts.items()},
            "blocks": {"in_scope": total / block_total if block_total else 0.0,
                       "zeros_in_scope": zeros / block_total if block_total else 0.0}}


def dense_zero_count(model: nn.Module) -> int:
    return sum(int((w == 0).sum()) for w in prunable_matrices(model).values())


def model_bytes(model: nn.Module) -> int:
    """Bytes of a dense full-model upload (every parameter once; tied weights once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def export_hf(model: nn.Module, tokenizer: Any, target: Path, card: str | None = None) -> Path:
    """save_pretrained (safetensors) + tokenizer + model card, into ``target`` atomically."""
    strip_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def model_card(title: str, tags: list[str], facts: list[str], sections: dict[str, list[str]], config_yaml: str) -> str:
    """The README.md of an exported model, for every recipe: front matter, title, facts as a list, each
    section's lines under its heading, and the run's config."""
    lines = ["---", "library_name: transformers", f"tags: [{', '.join(tags)}]", "---", f"# {title}", "",
             *(f"- {fact}" for fact in facts)]
    for heading, body in sections.items():
        lines += ["", f"## {heading}", "", *body]
    lines += ["", "## Config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def write_run(run_dir: Path, results: dict[str, Any], *, environment_source: Any, config_yaml: str, started: float,
              model: nn.Module | None = None, tokenizer: Any = None, card: str | None = None,
              save_model: bool = False, save_compressed: bool = False) -> None:
    """Rank 0, once, at the end of ``prune``, ``validate`` and ``fit``: the model's exports when asked (``model``
    None: the run has no model to export), then ``results.json`` with the run's environment and wall time, and
    ``config.yaml``. Each file is written atomically, results.json after the exports it names."""
    if model is not None:
        results["model_dir"] = str(export_hf(model, tokenizer, run_dir / "model", card)) if save_model else None
        if save_compressed:
            results["compressed_path"] = str(write_compressed(model, run_dir / "model_compressed.safetensors"))
    results["wall_time_s"] = time.perf_counter() - started
    results["environment"] = describe_environment(environment_source)
    atomic_write_json(run_dir / "results.json", results)
    if config_yaml:
        atomic_write_text(run_dir / "config.yaml", config_yaml)


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
