"""One table over runs: the settings that differ between them and their scores.

    compare(["runs/a", "runs/b", "runs/base"], data_stem="test") -> Table
    Table.markdown() / Table.csv()

Each path is a run directory (config.json; its evaluations in RUN/eval/<stem>/, its
base model's in RUN/base/eval/<stem>/) or a base-model directory written by
`medalign-distill eval --student ... --out DIR` (base.json, DIR/eval/<stem>/).
Columns: the run, the model (trained / base), the data (when several), the config
fields whose values differ between the runs (teacher, layer, alpha, beta, lora_r,
...; bookkeeping fields such as out or log_every never), the final training losses
from metrics.jsonl, the headline metrics of each evaluation (distill.evaluate.headline),
and, when any evaluation skipped broken samples (`eval --on-error skip`), how many:
scores over different sample sets are not comparable, so the table says so.
Scores are shown x100 (accuracy and recall in %, BLEU etc. as papers print them).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from .evaluate import headline

# Fields that say how a run was bookkept, not what was trained.
IGNORED_FIELDS = ("out", "resume", "num_workers", "log_every", "save_every", "report_to")
# closed_acc_medalign and open_recall are the paper's VQA columns (MedAlign's run_eval.py rules).
METRIC_COLUMNS = ("closed_acc_medalign", "open_recall", "closed_acc", "closed_acc_llava_med", "vqa_overall",
                  "grounding", "grounding_chance",
                  "BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "METEOR", "CIDEr")
LOSS_COLUMNS = ("steps", "loss", "ntp", "vis", "att")


class CompareError(ValueError):
    pass


@dataclass
class Row:
    run: str
    model: str                               # "trained" | "base"
    config: dict | None                      # the run's config.json (None for a base directory)
    data: str | None = None                  # eval stem, None when not evaluated
    metrics: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    skipped: int | None = None               # samples the evaluation skipped


@dataclass
class Table:
    columns: list[str]
    rows: list[list]                         # raw values: str, float (fractions/losses) or None

    def _cell(self, column: str, value, digits: int) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            if column in METRIC_COLUMNS:
                return f"{100 * value:.{digits}f}"
            return f"{value:.{digits + 2}g}"
        if isinstance(value, (list, tuple)):
            return ",".join(map(str, value))
        return str(value)

    def markdown(self) -> str:
        cells = [[self._cell(c, v, 2) or "—" for c, v in zip(self.columns, row)] for row in self.rows]
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines) + "\n\nScores x100. loss/ntp/vis/att: the last training step's losses.\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        for row in self.rows:
            w.writerow([self._cell(c, v, 4) for c, v in zip(self.columns, row)])
        return buf.getvalue()


def last_metrics_row(run: Path) -> dict:
    """The last complete row of RUN/metrics.jsonl, {} when there is none."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return {}
    last = None
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                last = json.loads(line)
            except json.JSONDecodeError:
                continue  # a half-written last line of a running job
    return last or {}


def final_losses(run: Path) -> dict:
    last = last_metrics_row(run)
    if not last:
        return {}
    return {"steps": last.get("step"), **{k: last.get(k) for k in ("loss", "ntp", "vis", "att")}}


def _skipped(metrics: dict) -> int | None:
    return metrics.get("data", {}).get("skipped")


def evaluations(root: Path, data_stem: str | None = None) -> list[tuple[str, dict]]:
    """(stem, metrics.json) of each evaluation in ROOT/eval/<stem>/ (only data_stem's when given), by stem."""
    found = []
    for m in sorted((root / "eval").glob("*/metrics.json")):
        stem = m.parent.name
        if data_stem is None or stem == data_stem:
            found.append((stem, json.loads(m.read_text())))
    return found


def collect(paths, data_stem: str | None = None) -> list[Row]:
    rows: list[Row] = []
    for p in map(Path, paths):
        if (p / "config.json").is_file():
            config = json.loads((p / "config.json").read_text())
            losses = final_losses(p)
            evals = evaluations(p, data_stem)
            for stem, m in evals:
                rows.append(Row(str(p), "trained", config, stem, headline(m), losses, _skipped(m)))
            if not evals:
                rows.append(Row(str(p), "trained", config, None, {}, losses))
            for stem, m in evaluations(p / "base", data_stem):
                rows.append(Row(f"{p} (base)", "base", None, stem, headline(m), {}, _skipped(m)))
        elif (p / "base.json").is_file():
            for stem, m in evaluations(p, data_stem):
                rows.append(Row(str(p), "base", None, stem, headline(m), {}, _skipped(m)))
        # anything else (a stray file, a folder of pictures) is not a row
    if not rows:
        raise CompareError("no run directories (config.json) or base evaluations (base.json) among "
                           + ", ".join(map(str, paths)))
    return rows


def differing_fields(configs: list[dict]) -> list[str]:
    keys: list[str] = []
    for c in configs:
        keys += [k for k in c if k not in keys and k not in IGNORED_FIELDS]
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def compare(paths, data_stem: str | None = None) -> Table:
    rows = collect(paths, data_stem)
    seen, unique = set(), []
    for r in rows:  # one config per run, however many evaluations it has
        if r.config is not None and r.run not in seen:
            seen.add(r.run)
            unique.append(r.config)
    fields = differing_fields(unique) if len(unique) > 1 else []
    show_data = len({r.data for r in rows if r.data is not None}) > 1
    losses = [c for c in LOSS_COLUMNS if any(r.losses.get(c) is not None for r in rows)]
    metric_cols = [c for c in METRIC_COLUMNS if any(r.metrics.get(c) is not None for r in rows)]
    show_skipped = any(r.skipped for r in rows)
    columns = ["run", "model"] + (["data"] if show_data else []) + fields + losses + metric_cols + \
        (["skipped"] if show_skipped else [])
    out = []
    for r in rows:
        model = r.model if r.data is not None or r.model == "base" else "trained (not evaluated)"
        values = [r.run, model] + ([r.data] if show_data else [])
        values += [r.config.get(k) if r.config is not None else None for k in fields]
        values += [r.losses.get(c) for c in losses]
        values += [r.metrics.get(c) for c in metric_cols]
        values += [r.skipped] if show_skipped else []
        out.append(values)
    return Table(columns, out)
