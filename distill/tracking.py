"""Live tracking of a run (--report-to tensorboard,wandb): every row of metrics.jsonl, as
training writes it, goes to the chosen trackers as scalars "train/<key>" at its step
(the losses, learning rate, gradient norm, tokens/samples/images per second, step time,
peak memory, and with fp16 the loss scale and skipped steps). metrics.jsonl stays the
record; trackers are views of it, so only rank 0 reports.

- tensorboard: event files in RUN/tensorboard (`tensorboard --logdir runs/`). A resumed
  run hides the events of the steps it redoes (SummaryWriter's purge_step), so each step
  shows once, as in metrics.jsonl.
- wandb: offline by default, the run kept in RUN/wandb (`wandb sync RUN/wandb/offline-run-*`
  uploads it later); set WANDB_MODE=online (or any WANDB_MODE) to choose yourself.
  WANDB_PROJECT names the project [medalign]; a resumed run continues the same wandb run.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from .extras import require

TRACKERS = ("tensorboard", "wandb")
_WANDB_ID = "wandb_id.txt"


def check_available(names) -> None:
    """Fail before the (slow) student load when a tracker's package is missing."""
    for name in names:
        require(name, f"--report-to {name}")


def _scalars(record: dict) -> dict[str, float]:
    return {f"train/{k}": float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard:
    def __init__(self, out: Path, start_step: int):
        require("tensorboard", "--report-to tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        # events at steps >= purge_step, left by the interrupted run, are hidden
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # live: readable while the run goes on

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out: Path, config: dict):
        wandb = require("wandb", "--report-to wandb")
        id_file = out / _WANDB_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        settings = {} if os.environ.get("WANDB_MODE") else {"mode": "offline"}  # the user's choice wins
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "medalign"), name=out.name, id=run_id,
                              resume="allow", dir=str(out), config=config, **settings)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """The run's trackers; with none, every call does nothing."""

    def __init__(self, names=(), out: Path | None = None, config: dict | None = None, start_step: int = 0):
        self.backends = []
        for name in names:
            if name == "tensorboard":
                self.backends.append(_TensorBoard(Path(out), start_step))
            elif name == "wandb":
                self.backends.append(_Wandb(Path(out), config or {}))
            else:
                raise ValueError(f"unknown tracker {name!r}; choose from none, {', '.join(TRACKERS)}")

    def log(self, record: dict) -> None:
        """One metrics.jsonl row (its "step" is the x axis)."""
        if self.backends:
            scalars = _scalars(record)
            for b in self.backends:
                b.log(int(record["step"]), scalars)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []
