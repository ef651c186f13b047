"""lm.search: config validation, samplers with and without Optuna, pruning, resume, workers,
storages (SQLite under several processes, journal, a real PostgreSQL), failed trials, results."""
from __future__ import annotations

import csv
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import yaml

from lm import search as ls
from lm import search_report as sr
from lm import search_storage as st
from lm.search_space import load_search_config, random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BASE = {"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16},
             "data": {"tokenizer": "char"},
             "train": {"batch_size": 4, "eval_iters": 2, "log_interval": 1000, "seed": 0}}
SPACE = {"train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
         "train.warmup_iters": {"type": "int", "low": 0, "high": 4, "step": 2},
         "train.beta2": {"type": "categorical", "choices": [0.95, 0.99]}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    p.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
    return str(p)


def write_cfg(path, space=None, budget=None, pruner=None, sampler=None, base=None):
    d = {"base": base or TINY_BASE, "search_space": space or SPACE,
         "budget": budget or {"max_iters": 6, "eval_interval": 3},
         "pruner": pruner or {"type": "none"}, "sampler": sampler or {"n_startup_trials": 2}}
    with open(path, "w") as f:
        yaml.safe_dump(d, f)
    return str(path)


def read_csv(out):
    with open(os.path.join(out, "trials.csv")) as f:
        return list(csv.DictReader(f))


def run_main(args, capsys):
    rc = ls.main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("space, expect", [
    ({"train.learnin_rate": {"type": "float", "low": 1e-4, "high": 1e-2}},
     ["unknown parameter 'train.learnin_rate'", "train.learning_rate", "model.n_layer"]),
    ({"train.learning_rate": {"type": "float", "low": 1e-2, "high": 1e-4}}, ["low (0.01) > high (0.0001)"]),
    ({"train.learning_rate": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, ["log: true needs low > 0"]),
    ({"train.beta2": {"type": "categorical", "choices": []}}, ["'choices' must be a non-empty list"]),
    ({"train.learning_rate": {"type": "uniform", "low": 0, "high": 1}}, ["'type' must be one of float, int, categorical"]),
    ({"train.warmup_iters": {"type": "float", "low": 0, "high": 10}}, ["integer setting; use type: int"]),
    ({"train.warmup_iters": {"type": "int", "low": 0, "high": 10, "stepp": 2}}, ["unknown setting(s) stepp"]),
])
def test_search_space_errors(tmp_path, capsys, space, expect):
    out = tmp_path / "out"
    rc, _, err = run_main(["--config", write_cfg(tmp_path / "s.yaml", space=space), "--output_dir", str(out)], capsys)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for e in expect:
        assert e in err, err
    assert not out.exists()   # validated before any folder is made


def test_other_config_errors(tmp_path, capsys):
    cfg = write_cfg(tmp_path / "s.yaml", pruner={"type": "median", "min_resource": 3})
    rc, _, err = run_main(["--config", cfg, "--output_dir", str(tmp_path / "o")], capsys)
    assert rc == 2 and "pruner.min_resource" in err and "n_warmup_steps" in err
    cfg = write_cfg(tmp_path / "s.yaml", space={**SPACE, "train.weight_decay": {"type": "float", "low": 0, "high": 0.2}},
                    sampler={"grid_points": 3})
    rc, _, err = run_main(["--config", cfg, "--output_dir", str(tmp_path / "o"), "--search_type", "grid",
                           "--n_trials", "10"], capsys)
    # 3 learning rates x 3 warmups x 2 beta2 x 3 weight decays = 54 points
    assert rc == 2 and "the grid has 54 points" in err and "--n_trials is 10" in err
    rc, _, err = run_main(["--config", str(tmp_path / "missing.yaml")], capsys)
    assert rc == 2 and "search config not found" in err
    rc, _, err = run_main(["--config", cfg, "--output_dir", str(tmp_path / "o"), "--resume"], capsys)
    assert rc == 2 and "--resume: no study" in err
    rc, _, err = run_main(["--config", cfg, "--output_dir", str(tmp_path / "o"), "model.n_layr=2"], capsys)
    assert rc == 2 and "unknown key 'model.n_layr'" in err


def test_base_by_path_and_overrides(tmp_path):
    with open(tmp_path / "train.yaml", "w") as f:
        yaml.safe_dump(TINY_BASE, f)
    d = {"base": "train.yaml", "search_space": SPACE}
    with open(tmp_path / "s.yaml", "w") as f:
        yaml.safe_dump(d, f)
    sc = load_search_config(str(tmp_path / "s.yaml"), ["model.n_layer=3"])
    assert sc.base.model.n_embd == 32 and sc.base.model.n_layer == 3
    cfg = sc.trial_config({"train.learning_rate": 5e-3, "train.warmup_iters": 2, "train.beta2": 0.95})
    assert cfg.train.learning_rate == 5e-3 and cfg.train.progress is False
    sc = load_search_config(os.path.join(ROOT, "configs", "hyperparameter_search.yaml"))
    assert len(sc.params) == 7 and sc.pruner["type"] == "median"


# --------------------------------------------------------------------------- without Optuna
@pytest.fixture
def no_optuna(monkeypatch):
    for name in list(sys.modules):
        if name == "optuna" or name.startswith("optuna."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "optuna", None)   # import optuna -> ImportError
    assert not st.have_optuna()


def test_random_and_grid_without_optuna(tmp_path, capsys, corpus, no_optuna):
    cfg = write_cfg(tmp_path / "s.yaml", budget={"max_iters": 3, "eval_interval": 3})
    common = ["--config", cfg, "--data", corpus, "--no_progress"]
    rc, _, err = run_main(common + ["--output_dir", str(tmp_path / "x"), "--search_type", "optuna"], capsys)
    assert rc == 2 and "needs Optuna" in err
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_main(common + ["--output_dir", a, "--search_type", "random", "--n_trials", "3", "--seed", "7"],
                    capsys)[0] == 0
    # the same search killed after 2 trials and resumed draws the same values
    assert run_main(common + ["--output_dir", b, "--search_type", "random", "--n_trials", "2", "--seed", "7"],
                    capsys)[0] == 0
    assert run_main(common + ["--output_dir", b, "--search_type", "random", "--n_trials", "3", "--seed", "7",
                              "--resume"], capsys)[0] == 0
    ra, rb = read_csv(a), read_csv(b)
    keys = [p for p in ra[0] if p.startswith(("train.", "model."))]
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]
    assert [r["value"] for r in ra] == [r["value"] for r in rb]   # same seed, same training
    assert all(r["state"] == "COMPLETE" for r in ra) and len(ra) == 3
    sc = load_search_config(cfg)
    assert random_params(sc, 7, 0) != random_params(sc, 8, 0)
    for f in ("best_config.yaml", "report.md", "history.png", "params.png", "curves.png"):
        assert os.path.isfile(os.path.join(a, f)), f
    # grid: every point exactly once, in the same order for the same seed
    g1, g2 = str(tmp_path / "g1"), str(tmp_path / "g2")
    space = {"train.warmup_iters": {"type": "int", "low": 0, "high": 2, "step": 2},
             "train.beta2": {"type": "categorical", "choices": [0.95, 0.99]}}
    gcfg = write_cfg(tmp_path / "g.yaml", space=space, budget={"max_iters": 2, "eval_interval": 2})
    for g in (g1, g2):
        assert run_main(["--config", gcfg, "--data", corpus, "--no_progress", "--output_dir", g,
                         "--search_type", "grid", "--n_trials", "4", "--seed", "3"], capsys)[0] == 0
    pts = [(r["train.warmup_iters"], r["train.beta2"]) for r in read_csv(g1)]
    assert sorted(pts) == sorted([("0", "0.95"), ("0", "0.99"), ("2", "0.95"), ("2", "0.99")])
    assert pts == [(r["train.warmup_iters"], r["train.beta2"]) for r in read_csv(g2)]


# --------------------------------------------------------------------------- Optuna
def test_optuna_search_and_best_config_trains(tmp_path, capsys, corpus):
    pytest.importorskip("optuna", reason="the optuna backend needs the search extra")
    out = str(tmp_path / "out")
    cfg = write_cfg(tmp_path / "s.yaml", pruner={"type": "median", "n_startup_trials": 1})
    rc, o, err = run_main(["--config", cfg, "--data", corpus, "--output_dir", out, "--n_trials", "3",
                           "--seed", "1"], capsys)
    assert rc == 0, err
    rows = read_csv(out)
    assert len(rows) == 3 and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    assert "search: " in err and "best=" in err   # the tqdm bar shows the best value
    assert "best: trial" in o
    best = os.path.join(out, "best_config.yaml")
    import lm.train as lt
    assert lt.main(["--config", best, "--output_dir", str(tmp_path / "t"), "--max_iters", "2", "--no_progress",
                    "train.sample_tokens=0"]) == 0
    with open(best) as f:
        b = yaml.safe_load(f)
    vals = {r["number"]: float(r["value"]) for r in rows if r["state"] == "COMPLETE"}
    bn = min(vals, key=vals.get)
    assert b["train"]["learning_rate"] == pytest.approx(float(rows[int(bn)]["train.learning_rate"]))
    assert b["train"]["max_iters"] == 6 and b["train"]["progress"] is True
    # the same folder again without --resume: refused, nothing run
    rc, _, err = run_main(["--config", cfg, "--data", corpus, "--output_dir", out, "--n_trials", "3"], capsys)
    assert rc == 2 and "add --resume" in err


def _tiny_sc(tmp_path, pruner):
    return load_search_config(write_cfg(tmp_path / "p.yaml", space={
        "train.learning_rate": {"type": "categorical", "choices": [1e-2, 1e-7]}},
        budget={"max_iters": 12, "eval_interval": 2}, pruner=pruner))


def test_pruned_trial_stops_before_its_budget(tmp_path, corpus):
    optuna = pytest.importorskip("optuna", reason="pruners are Optuna's")
    sc = _tiny_sc(tmp_path, {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    sc.base.data.corpus = corpus
    study = optuna.create_study(pruner=ls.make_pruner(sc), sampler=optuna.samplers.RandomSampler(0))
    study.enqueue_trial({"train.learning_rate": 1e-2})
    study.enqueue_trial({"train.learning_rate": 1e-7})   # learns nothing: worse than the median at once
    ls.optuna_loop(study, sc, str(tmp_path / "o"), 2, None, lambda: None, print)
    good, bad = study.trials
    assert good.state.name == "COMPLETE" and max(good.intermediate_values) == 12
    assert bad.state.name == "PRUNED"
    assert bad.user_attrs["steps"] < 12 and max(bad.intermediate_values) < 12
    # its training really stopped there: the metrics log ends at the pruned step
    with open(os.path.join(tmp_path, "o", "trials", "00001", "metrics.jsonl")) as f:
        last = [ln for ln in f if ln.strip()][-1]
    assert f'"step": {bad.user_attrs["steps"]}' in last


def test_nan_trial_fails_and_the_search_goes_on(tmp_path, capsys, corpus):
    pytest.importorskip("optuna", reason="grid search on Optuna")
    space = {"train.learning_rate": {"type": "categorical", "choices": [1e30, 3e-3]}}
    cfg = write_cfg(tmp_path / "s.yaml", space=space)
    out = str(tmp_path / "o")
    rc, _, err = run_main(["--config", cfg, "--data", corpus, "--output_dir", out, "--search_type", "grid",
                           "--n_trials", "2", "--no_progress"], capsys)
    assert rc == 0
    rows = {float(r["train.learning_rate"]): r for r in read_csv(out)}
    assert rows[1e30]["state"] == "FAIL" and "loss became" in rows[1e30]["error"]
    assert rows[3e-3]["state"] == "COMPLETE"
    assert "failed: loss became" in err and "Traceback" not in err


def test_all_failed_or_pruned_is_a_clear_message(tmp_path, capsys, corpus, no_optuna):
    cfg = write_cfg(tmp_path / "s.yaml", space={"train.learning_rate": {"type": "categorical", "choices": [1e30]}})
    rc, _, err = run_main(["--config", cfg, "--data", corpus, "--output_dir", str(tmp_path / "o"),
                           "--search_type", "grid", "--n_trials", "1", "--no_progress"], capsys)
    assert rc == 1 and "Traceback" not in err
    assert "error: no trial completed (0 pruned, 1 failed; first error: loss became" in err
    sc = load_search_config(cfg)
    recs = [{"number": i, "state": "PRUNED", "value": None, "params": {"train.learning_rate": 1e-3},
             "steps": 2, "intermediate": {2: 3.0}} for i in range(3)]
    os.makedirs(tmp_path / "p")
    s = sr.write_results(recs, sc, str(tmp_path / "p"), log=lambda m: None)
    assert s["best"] is None and "no trial completed (3 pruned, 0 failed)" in s["no_best_reason"]
    assert not os.path.exists(tmp_path / "p" / "best_config.yaml")
    assert "No best configuration" in open(tmp_path / "p" / "report.md").read()


def test_ctrl_c_keeps_finished_trials_and_resume_reruns_the_interrupted_one(tmp_path, capsys, corpus, monkeypatch):
    pytest.importorskip("optuna", reason="the optuna backend")
    import lm.train as lt
    real, calls = lt.train, []

    def train(cfg, out, **kw):
        calls.append(cfg.train.learning_rate)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, out, **kw)

    monkeypatch.setattr(lt, "train", train)
    cfg = write_cfg(tmp_path / "s.yaml")
    out = str(tmp_path / "o")
    args = ["--config", cfg, "--data", corpus, "--output_dir", out, "--n_trials", "3", "--no_progress"]
    rc, o, _ = run_main(args, capsys)
    assert rc == 130 and "interrupted: 1 complete, 0 pruned, 0 failed trial(s) kept" in o
    rows = read_csv(out)
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL"] and rows[1]["error"] == "interrupted"
    rc, o, err = run_main(args + ["--resume"], capsys)
    assert rc == 0 and "resume: 1 interrupted trial(s) queued again" in err
    rows2 = read_csv(out)
    assert rows2[0] == rows[0]                                   # the finished trial is untouched
    assert calls[2] == calls[1]                                  # the interrupted one ran again, same values
    assert sum(r["state"] == "COMPLETE" for r in rows2) == 3


def _wait_for(pred, timeout):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_resume_after_kill_loses_no_completed_trial(tmp_path, corpus):
    optuna = pytest.importorskip("optuna", reason="the optuna backend")
    out = str(tmp_path / "o")
    cfg = write_cfg(tmp_path / "s.yaml", budget={"max_iters": 60, "eval_interval": 20})
    cmd = [sys.executable, "-m", "lm.search", "--config", cfg, "--data", corpus, "--output_dir", out,
           "--n_trials", "4", "--no_progress", "--seed", "5"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = os.path.join(out, "study.db")

    def trials():
        if not os.path.exists(db):
            return []
        try:
            return optuna.load_study(study_name="lm-search", storage=st.open_storage("sqlite:///" + db)).trials
        except Exception:
            return []
    def one_done_one_running():   # a running trial that has drawn its values (a new one has none yet)
        ts = trials()
        return any(t.state.name == "COMPLETE" for t in ts) and any(t.state.name == "RUNNING" and t.params
                                                                   for t in ts)
    try:
        assert _wait_for(one_done_one_running, 300)
    finally:
        proc.kill()   # SIGKILL: no chance to clean up
        proc.wait()
    before = {t.number: (t.params, t.value) for t in trials() if t.state.name == "COMPLETE"}
    running = [t.params for t in trials() if t.state.name == "RUNNING" and t.params]
    assert before and running
    r = subprocess.run(cmd + ["--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    after = trials()
    for n, (params, value) in before.items():
        assert after[n].state.name == "COMPLETE" and (after[n].params, after[n].value) == (params, value)
    complete = [t for t in after if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    assert running[0] in [t.params for t in complete]   # the killed trial's values ran again


# --------------------------------------------------------------------------- workers and storages
@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_workers_share_one_study(tmp_path, capsys, corpus, storage):
    optuna = pytest.importorskip("optuna", reason="workers share an Optuna storage")
    out = str(tmp_path / "o")
    url = None if storage == "sqlite" else "journal:" + str(tmp_path / "study.journal")
    cfg = write_cfg(tmp_path / "s.yaml", budget={"max_iters": 20, "eval_interval": 10})
    args = ["--config", cfg, "--data", corpus, "--output_dir", out, "--n_trials", "6", "--n_workers", "2",
            "--no_progress"] + (["--storage", url] if url else [])
    rc, _, err = run_main(args, capsys)
    assert rc == 0, err
    assert "database is locked" not in err
    study = optuna.load_study(study_name="lm-search",
                              storage=st.open_storage(url or "sqlite:///" + os.path.join(out, "study.db")))
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 6
    assert len({t.user_attrs["worker"] for t in done}) == 2   # both processes ran trials
    assert len(read_csv(out)) == 6


def _hammer(url: str, n: int) -> None:
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name="hammer", storage=st.open_storage(url))
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=n)


def test_sqlite_under_four_processes_is_not_locked(tmp_path):
    optuna = pytest.importorskip("optuna", reason="the SQLite storage is Optuna's")
    import multiprocessing as mp
    url = "sqlite:///" + str(tmp_path / "h.db")
    optuna.create_study(study_name="hammer", storage=st.open_storage(url))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(url, 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    study = optuna.load_study(study_name="hammer", storage=st.open_storage(url))
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 100


# --------------------------------------------------------------------------- PostgreSQL
def _pg_bin(name):
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(os.listdir("/usr/lib/postgresql"), reverse=True) if os.path.isdir("/usr/lib/postgresql") else []:
        p = os.path.join("/usr/lib/postgresql", d, "bin", name)
        if os.path.exists(p):
            return p
    return None


@pytest.fixture
def postgres(tmp_path_factory):
    """A throwaway PostgreSQL cluster on 127.0.0.1 (as a non-root user when we are root)."""
    pytest.importorskip("optuna", reason="the PostgreSQL storage is Optuna's")
    try:
        st.with_driver("postgresql://x")
    except ImportError as e:
        pytest.skip(str(e))
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    import pathlib
    import tempfile
    base = pathlib.Path(tempfile.mkdtemp(prefix="lm-pg-"))   # not under pytest's root-only folder
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    pre = []
    if os.geteuid() == 0:   # initdb refuses to run as root
        import pwd
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None:
            pytest.skip("running as root and no postgres/nobody user to run the server as")
        pw = pwd.getpwnam(user)
        for p in (base, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(base, 0o755)
        pre = ["runuser", "-u", user, "--"] if shutil.which("runuser") else None
        if pre is None:
            pytest.skip("running as root without runuser to start the server as another user")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run(pre + [initdb, "-D", str(data), "-A", "trust", "-U", "lmtest", "--no-sync"],
                       capture_output=True, text=True, cwd=base)
    if r.returncode:
        pytest.skip(f"initdb failed: {r.stderr.strip()[-300:]}")
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    r = subprocess.run(pre + [pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "-t", "60",
                              "start"], capture_output=True, text=True, cwd=base)
    if r.returncode:
        pytest.skip(f"the PostgreSQL server did not start: {r.stderr.strip()[-300:]}")
    try:
        yield f"postgresql://lmtest@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(pre + [pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, cwd=base)
        shutil.rmtree(base, ignore_errors=True)


def _has_user(name):
    import pwd
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_postgresql_storage(tmp_path, capsys, corpus, postgres):
    import optuna
    rc, _, err = run_main(["--config", write_cfg(tmp_path / "s.yaml"), "--output_dir", str(tmp_path / "x"),
                           "--storage", postgres.rsplit(":", 1)[0] + ":1/postgres"], capsys)
    assert rc == 2 and err.startswith("error: cannot open the storage postgresql://lmtest@127.0.0.1:1/postgres")
    cfg = write_cfg(tmp_path / "s.yaml", budget={"max_iters": 4, "eval_interval": 2})
    args = ["--config", cfg, "--data", corpus, "--storage", postgres, "--study_name", "pg", "--no_progress"]
    rc, o, err = run_main(args + ["--output_dir", str(tmp_path / "m1"), "--n_trials", "2"], capsys)
    assert rc == 0, err
    assert "postgresql://lmtest" in o
    # a second machine: the same storage and study name, another folder; it joins the study
    rc, o, err = run_main(args + ["--output_dir", str(tmp_path / "m2"), "--n_trials", "3"], capsys)
    assert rc == 0, err
    study = optuna.load_study(study_name="pg", storage=st.open_storage(postgres))
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3
    assert len(read_csv(str(tmp_path / "m2"))) == 3


# --------------------------------------------------------------------------- results
def test_plots_draw_the_records(tmp_path):
    sc = load_search_config(write_cfg(tmp_path / "s.yaml"))
    recs = [{"number": 0, "state": "COMPLETE", "value": 2.0, "params": {"train.learning_rate": 1e-3,
             "train.warmup_iters": 0, "train.beta2": 0.95}, "steps": 6, "intermediate": {3: 2.5, 6: 2.0}},
            {"number": 1, "state": "PRUNED", "value": None, "params": {"train.learning_rate": 2e-3,
             "train.warmup_iters": 2, "train.beta2": 0.99}, "steps": 3, "intermediate": {3: 2.9}},
            {"number": 2, "state": "COMPLETE", "value": 1.8, "params": {"train.learning_rate": 5e-3,
             "train.warmup_iters": 4, "train.beta2": 0.99}, "steps": 6, "intermediate": {3: 2.2, 6: 1.8}},
            {"number": 3, "state": "COMPLETE", "value": 1.5, "params": {"train.learning_rate": 8e-3,
             "train.warmup_iters": 2, "train.beta2": 0.95}, "steps": 6, "intermediate": {3: 2.3, 6: 1.5}}]
    later = {"number": 4, "state": "COMPLETE", "value": 1.9, "params": recs[0]["params"], "steps": 6,
             "intermediate": {3: 2.4, 6: 1.9}}   # worse than the best so far: the best line stays
    fig = sr.plot_history(recs + [later], sc, str(tmp_path / "h.png"))
    lines = {ln.get_gid(): ln for ln in fig.axes[0].lines}
    assert list(lines["complete"].get_ydata()) == [2.0, 1.8, 1.5, 1.9]
    assert list(lines["best"].get_ydata()) == [2.0, 1.8, 1.5, 1.5]
    assert list(lines["pruned"].get_xdata()) == [1] and list(lines["pruned"].get_ydata()) == [2.9]
    fig = sr.plot_curves(recs, sc, str(tmp_path / "c.png"))
    pruned = [ln for ln in fig.axes[0].lines if ln.get_gid().endswith("PRUNED")]
    assert len(pruned) == 1 and list(pruned[0].get_xdata()) == [3]
    fig = sr.plot_params(recs, sc, str(tmp_path / "p.png"))
    lr = next(ln for ax in fig.axes for ln in ax.lines if ln.get_gid() == "train.learning_rate")
    assert list(lr.get_xdata()) == [1e-3, 5e-3, 8e-3]
    imp, method = sr.importances(recs, sc)
    assert method.startswith("|Spearman") and math.isclose(sum(imp.values()), 1.0)
    assert imp["train.learning_rate"] == max(imp.values())   # lr rank-correlates best with the value here
    fig = sr.plot_importances(imp, method, str(tmp_path / "i.png"))
    bars = {p.get_y(): p.get_width() for p in fig.axes[0].patches}
    assert sorted(bars.values()) == sorted(imp.values())
    s = sr.write_results(recs, sc, str(tmp_path), log=lambda m: None)
    assert s["n_pruned"] == 1 and s["steps_run"] == 21 and s["steps_no_pruning"] == 24
    assert s["best"]["number"] == 3
    assert "| 3 | 0.95 | 0.008 | 2 | 1.5000 |" in open(tmp_path / "report.md").read()


def test_storage_urls(monkeypatch):
    assert st.describe("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert st.describe("postgresql://u@h/db") == "postgresql://u@h/db"
    assert st.journal_path("journal:/a/s.journal") == "/a/s.journal" and st.journal_path("x/s.log") == "x/s.log"
    assert st.journal_path("sqlite:///x.db") is None
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: object() if m == "psycopg2" else
                        (None if m in ("psycopg", "pg8000", "MySQLdb", "pymysql", "mysql.connector") else real(m, *a)))
    assert st.with_driver("postgresql://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert st.with_driver("postgresql+pg8000://u@h/db") == "postgresql+pg8000://u@h/db"   # named: kept
    with pytest.raises(ImportError, match="pip install pymysql"):
        st.with_driver("mysql://u@h/db")
