"""Live tracking (--report-to): what a run writes for TensorBoard is read back with
TensorBoard's own reader; wandb gets the same scalars, offline unless the user said otherwise."""

import json
import shutil
import sys
import types

import pytest

from distill.config import RunConfig
from tests import test_train
from tests.test_train import metrics, run

data = test_train.data  # the module-scoped fixture of images and cache, shared by name

LOGGED = ("loss", "ntp", "vis", "att", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "images_per_s",
          "step_time_s", "peak_memory_mb")


def read_tensorboard(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_every_metric_of_each_step(data):
    out = data["tmp"] / "tb"
    r = run(data, out, "--max-steps", 6, "--save-every", 3, "--report-to", "tensorboard")
    assert r.exit_code == 0, r.output
    rows = metrics(out)
    assert all(r["images_per_s"] == pytest.approx(r["samples_per_s"]) for r in rows)  # one image per sample
    scalars = read_tensorboard(out / "tensorboard")
    assert set(scalars) == {f"train/{k}" for k in LOGGED}
    for key in LOGGED:
        assert [s for s, _ in scalars[f"train/{key}"]] == [r["step"] for r in rows]
        assert [v for _, v in scalars[f"train/{key}"]] == pytest.approx([r[key] for r in rows], rel=1e-6), key

    # A crash after step 4 (checkpoint at 3) and a resume: each step is there once.
    crashed = data["tmp"] / "tb-crashed"
    shutil.copytree(out, crashed)
    for name in ("adapter", "alignment"):
        shutil.rmtree(crashed / name)
    (crashed / "metrics.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in rows[:4]))
    cfg = json.loads((crashed / "config.json").read_text())
    (crashed / "config.json").write_text(json.dumps({**cfg, "out": str(crashed)}))
    r = run(data, crashed, "--max-steps", 6, "--save-every", 3, "--report-to", "tensorboard", "--resume")
    assert r.exit_code == 0, r.output
    resumed = read_tensorboard(crashed / "tensorboard")
    assert [s for s, _ in resumed["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in resumed["train/loss"]] == pytest.approx([r["loss"] for r in metrics(crashed)], rel=1e-6)


class FakeWandb(types.ModuleType):
    """Records what the run hands wandb (the package is not installed by the test extra)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, values, step):
                fake.logged.append((step, values))

            def finish(self):
                fake.finished += 1
        return Run()


@pytest.mark.parametrize("env,mode", [({}, "offline"), ({"WANDB_MODE": "online"}, None)])
def test_wandb_offline_unless_configured(data, tmp_path, monkeypatch, env, mode):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "wb"
    r = run(data, out, "--max-steps", 3, "--report-to", "tensorboard,wandb")
    assert r.exit_code == 0, r.output
    (init,) = fake.inits
    assert init.get("mode") == mode and init["dir"] == str(out) and init["resume"] == "allow"
    assert init["config"]["report_to"] == ["tensorboard", "wandb"]
    assert (out / "wandb_id.txt").read_text().strip() == init["id"]  # a resumed run continues it
    rows = metrics(out)
    assert [s for s, _ in fake.logged] == [1, 2, 3] and fake.finished == 1
    for (_, values), row in zip(fake.logged, rows):
        assert values == {f"train/{k}": pytest.approx(row[k]) for k in LOGGED}
    assert (out / "tensorboard").is_dir()  # several trackers at once


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_missing_tracker_package_is_one_line(data, tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import tracker` now fails
    r = run(data, tmp_path / "missing", "--max-steps", 1, "--report-to", tracker)
    assert r.exit_code == 1 and "Traceback" not in r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"Error: --report-to {tracker} needs the {tracker} package")
    assert f'pip install "medalign[{tracker}]"' in last
    assert not (tmp_path / "missing" / "config.json").exists()  # refused before the student load


@pytest.mark.parametrize("given,expected", [
    ("none", ()), ("tensorboard", ("tensorboard",)), ("tensorboard, wandb", ("tensorboard", "wandb")),
    (["wandb"], ("wandb",)), ((), ()),
])
def test_report_to_parsing(given, expected):
    c = RunConfig(cache="c", teacher="t", student="tiny", data="d", image_root="i", out="o", report_to=given)
    assert c.report_to == expected
    assert RunConfig.from_dict(json.loads(json.dumps(c.to_dict()))).report_to == expected  # config.json round trip
