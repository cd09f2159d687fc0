"""examples/grounding/: the fast version of the grounding experiment runs end to end
(dataset -> teacher CLIP -> build_cache -> train x 4 configs -> eval -> measurements) and
its outputs are there and sane."""

import importlib.util
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HERE = REPO / "examples" / "grounding"


def _load(name):
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(f"grounding_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_mask_on_grid_is_area_exact():
    import numpy as np

    from distill.grounding import attention_in_mask
    D = _load("data")
    mask = np.zeros((112, 112), dtype=bool)
    mask[:56, :56] = True
    for grid in (6, 7):
        frac = D.mask_on_grid(mask, grid)
        assert frac.shape == (grid * grid,)
        assert abs(frac.mean() - 0.25) < 1e-6
    assert attention_in_mask(np.ones(49), D.mask_on_grid(mask, 7)) == 0.25


def test_fast_run_end_to_end(tmp_path):
    run = _load("run")
    results = run.main(["--fast", "--out", str(tmp_path / "out"), "--threads", "1"])
    out = tmp_path / "out"
    for name in ("results.json", "table.md", "attention.png", "teacher.pt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["configs"]) == {"baseline", "alpha", "beta", "alpha+beta"}
    table = (out / "table.md").read_text()
    for name in ("baseline (0, 0)", "alpha (1, 0)", "beta (0, 1)", "alpha+beta (1, 1)"):
        assert f"| {name} |" in table
    for runs in saved["configs"].values():
        assert len(runs) == 1
        for key in ("closed_acc", "open_recall", "grounding", "grounding_chance", "sim_mse", "final_ntp"):
            assert math.isfinite(runs[0][key]), key
        assert 0.0 <= runs[0]["grounding"] <= 1.0 and 0.0 <= runs[0]["closed_acc"] <= 1.0
        assert runs[0]["sim_mse"] >= 0.0
    # the teacher, trained briefly, already puts clearly more attention on the lesion than chance
    tg = saved["teacher_grounding"]
    assert tg["n_images"] > 0 and tg["inside"] > 1.5 * tg["chance"], tg
    # the losses were on exactly where they should be
    runs = saved["configs"]
    assert runs["baseline"][0]["final_vis"] is None and runs["baseline"][0]["final_att"] is None
    assert runs["alpha"][0]["final_vis"] is not None and runs["beta"][0]["final_att"] is not None
    assert results["settings"]["seeds"] == 1
