"""benchmarks/stacking.py: the budget arithmetic that decides each grown run's horizon, and its input errors."""
import sys

import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmarks import stacking  # noqa: E402


def test_horizon_is_the_most_steps_that_fit_the_budget():
    c2, c4 = 0.07, 0.14
    budget = 0.8 * 2000 * c4                       # 224 s
    h = stacking.horizon(1000, budget, c2, c4)
    assert h % 10 == 0
    job = stacking.grown_job(4e-3, 1000, h, 1337)
    assert stacking.cost_at({"job": job}, h, c2, c4) <= budget + 1e-9
    assert stacking.cost_at({"job": job}, h + 10, c2, c4) > budget
    assert h == 1000 + 1100                         # (224 - 70) / 0.14 = 1100 four-layer steps
    # (224 - 1010 * 0.07) / 0.14 = 1095 four-layer steps fit: rounded down to 1090, a multiple of 10
    assert stacking.horizon(1010, budget, c2, c4) == 1010 + 1090
    # later growth: more cheap steps, so a longer horizon
    assert stacking.horizon(1400, budget, c2, c4) > h
    # growth that eats the whole budget leaves no 4-layer step
    assert stacking.horizon(3200, budget, c2, c4) == 0


def test_cost_of_a_baseline_and_of_a_grown_run():
    base = {"job": stacking.baseline_job(2e-3, 2000, 1)}
    grown = {"job": stacking.grown_job(2e-3, 500, 1800, 1)}
    assert stacking.cost_at(base, 2000, 0.05, 0.1) == pytest.approx(200.0)
    assert stacking.cost_at(grown, 400, 0.05, 0.1) == pytest.approx(20.0)
    assert stacking.cost_at(grown, 1800, 0.05, 0.1) == pytest.approx(25.0 + 130.0)


def test_jobs_carry_their_schedule_and_growth():
    j = stacking.grown_job(4e-3, 1400, 2280, 7)
    assert j["horizon"] == 2280 and j["grow_at"] == 1400      # train_run's max_iters and lr_decay_iters
    assert "progressive.grow=[{at: 1400, n_layer: 4}]" in j["over"] and "model.n_layer=2" in j["over"]
    assert "progressive.grow_init=identity" in j["over"] and "train.seed=7" in j["over"]
    assert j["name"] == "grown-g1400-h2280-lr0.004-s7"


def test_first_evaluation_at_or_below_the_target():
    run = {"curve": [(0, 0.0, 4.2), (100, 1.0, 2.0), (200, 2.0, 1.7), (300, 3.0, 1.69)]}
    assert stacking.first_at_or_below(run, 1.7) == 200
    assert stacking.first_at_or_below(run, 1.5) is None
    assert stacking.first_at_or_below({"curve": [(0, 0.0, 1.0)]}, 1.5) is None   # step 0 never counts


@pytest.mark.parametrize("argv, msg", [
    (["--lrs", "x"], "comma-separated"),
    (["--lrs=-1e-3"], "positive"),
    (["--steps", "250"], "multiple of 100"),
    (["--grow_at", "1.0"], "--grow_at"),
    (["--budget", "0"], "--budget"),
    (["--jobs", "0"], "--jobs"),
    (["--data", "/nonexistent/tiny.txt"], "does not exist"),
])
def test_bad_input_is_one_error_line(argv, msg, capsys, tmp_path):
    assert stacking.main(argv + ["--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and msg in err[0]
