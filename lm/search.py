"""Hyperparameter search over ``lm.train``: ``python -m lm.search``.

    python -m lm.search --config configs/hyperparameter_search.yaml --data data/train.jsonl \\
        --output_dir output/search --search_type optuna --n_trials 100 --timeout 3600 --seed 42

Each trial trains the base config with values drawn from the search space, for the
config's per-trial budget, and reports every evaluation's validation loss to Optuna
(``trial.report`` / ``trial.should_prune``), so a hopeless trial stops mid-training.
The study lives in a storage: by default ``output_dir/study.db`` (SQLite), so a killed
search continues with ``--resume``; ``--storage`` takes any Optuna URL, and every process
or machine that runs the same command with the same ``--storage`` and ``--study_name``
works on the same study. ``--n_workers N`` starts N processes here (spawned: Numba's
thread pool hangs in a forked child), each on cores/N threads: Python threads would be
serialised by the GIL, which is why Optuna's ``n_jobs`` is not used.

``--search_type random`` and ``grid`` use Optuna's RandomSampler / GridSampler, and run
without Optuna too (values drawn by ``lm.search_space``, trials kept in
``output_dir/trials.jsonl``), writing the same results. What a search writes:
``trials.csv``, ``best_config.yaml`` (``lm.train --config`` takes it as it is),
``report.md`` and PNG plots (history, curves, each parameter, importances); each trial's
training output is under ``output_dir/trials/NNNNN/``.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import sys
import time

from .config import ConfigError
from .search_space import SearchConfig, grid_order, load_search_config, random_params
from . import search_storage as st

SEARCH_TYPES = ("optuna", "random", "grid")
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
               "MINIGRAD_THREADS")


class SearchError(Exception):
    pass


class TrialFailed(RuntimeError):
    pass


class LocalPruned(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lm-search", description="Hyperparameter search for lm.train (Optuna).")
    p.add_argument("--config", default="configs/hyperparameter_search.yaml",
                   help="search config: base training config, search space, budget, sampler, pruner")
    p.add_argument("--data", default=None, help="corpus for every trial (overrides the base config's data.corpus)")
    p.add_argument("--output_dir", default="output/search", help="results, trial folders, default storage")
    p.add_argument("--search_type", default="optuna", choices=SEARCH_TYPES,
                   help="optuna: TPE sampler and the config's pruner; random; grid")
    p.add_argument("--n_trials", type=int, default=20, help="trials in the study in all (a resumed or shared "
                                                            "study counts the ones it has)")
    p.add_argument("--timeout", type=float, default=None, help="seconds; no trial starts after it")
    p.add_argument("--seed", type=int, default=42, help="sampler seed and every trial's train.seed")
    p.add_argument("--study_name", default="lm-search", help="name of the study in the storage")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL: sqlite:///f.db, journal:f.journal, postgresql://user:pw@host/db, "
                        "mysql://...; default: sqlite under output_dir. Several machines: the same URL and "
                        "--study_name on each")
    p.add_argument("--n_workers", type=int, default=1, help="worker processes on this machine (cores/N threads each)")
    p.add_argument("--resume", action="store_true", help="continue the study in output_dir's default storage")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of the base training config, e.g. model.n_layer=2 train.batch_size=8")
    return p


# --------------------------------------------------------------------------- set-up
def default_storage(output_dir: str, optuna_ok: bool) -> str:
    if optuna_ok:
        return "sqlite:///" + os.path.abspath(os.path.join(output_dir, "study.db"))
    return os.path.join(output_dir, "trials.jsonl")   # the plain random/grid backend


def check_args(args) -> tuple[SearchConfig, bool, int]:
    """Everything that can be wrong with the command, before any folder or study is made."""
    if args.n_trials <= 0:
        raise SearchError(f"--n_trials must be positive, got {args.n_trials}")
    if args.timeout is not None and args.timeout <= 0:
        raise SearchError(f"--timeout must be positive seconds, got {args.timeout}")
    if args.n_workers <= 0:
        raise SearchError(f"--n_workers must be positive, got {args.n_workers}")
    sc = load_search_config(args.config, args.overrides)
    if args.data is not None:
        sc.base.data.corpus = args.data
    n_trials = args.n_trials
    if args.search_type == "grid":
        size = sc.grid_size()
        if size > n_trials:
            raise SearchError(f"the grid has {size} points ({' x '.join(str(len(v)) for v in sc.grid_space().values())}"
                              f") but --n_trials is {n_trials}; raise --n_trials to {size}, lower "
                              f"sampler.grid_points, or use --search_type random/optuna")
        n_trials = size
    optuna_ok = st.have_optuna()
    if not optuna_ok:
        need = ("--search_type optuna" if args.search_type == "optuna" else
                "--storage" if args.storage else "--n_workers > 1" if args.n_workers > 1 else None)
        if need:
            raise SearchError(f"{need} needs Optuna: pip install 'minigrad-lm[search]' (or pip install optuna); "
                              f"--search_type random and grid run without it, one worker, default storage")
    if args.storage is None:
        url = default_storage(args.output_dir, optuna_ok)
        path = url.removeprefix("sqlite:///")
        if args.resume and not os.path.exists(path):
            raise SearchError(f"--resume: no study at {path}; run without --resume to start one")
        if not args.resume and os.path.exists(path):
            raise SearchError(f"{args.output_dir} already holds a search ({path}); add --resume to continue it, "
                              f"or choose another --output_dir")
    elif args.storage.startswith("sqlite:///") and args.storage.count("/") > 3:
        parent = os.path.dirname(args.storage.removeprefix("sqlite:///"))
        if parent and not os.path.isdir(parent):
            raise SearchError(f"--storage {args.storage}: folder {parent} does not exist")
    return sc, optuna_ok, n_trials


def make_sampler(search_type: str, sc: SearchConfig, seed: int):
    import optuna
    if search_type == "grid":
        return optuna.samplers.GridSampler(sc.grid_space(), seed=seed)
    if search_type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=sc.sampler.get("n_startup_trials", 10),
                                      multivariate=sc.sampler.get("multivariate", False))


def make_pruner(sc: SearchConfig):
    """The config's pruner, for every search type (without Optuna there is none)."""
    import optuna
    kw = {k: v for k, v in sc.pruner.items() if k != "type"}
    kind = sc.pruner["type"]
    if kind == "median":
        return optuna.pruners.MedianPruner(**kw)
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**kw)
    if kind == "hyperband":
        kw.setdefault("max_resource", sc.budget.get("max_iters", sc.base.train.max_iters))
        return optuna.pruners.HyperbandPruner(**kw)
    return optuna.pruners.NopPruner()


def open_study(url: str, name: str, sc: SearchConfig, search_type: str, seed: int, create: bool):
    import warnings
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)   # our bar and one line per failed trial instead
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
    try:
        storage = st.open_storage(url)
    except ImportError as e:
        raise SearchError(str(e)) from None
    except Exception as e:   # a server that does not answer, a wrong password, a bad URL
        raise SearchError(f"cannot open the storage {st.describe(url)}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    kw = dict(study_name=name, storage=storage, sampler=make_sampler(search_type, sc, seed),
              pruner=make_pruner(sc))
    if create:
        study = optuna.create_study(direction=sc.direction, load_if_exists=True, **kw)
        desc = {"search": sc.to_dict(), "search_type": search_type}
        saved = study.user_attrs.get("search")
        if saved is None:
            study.set_user_attr("search", desc)
        elif saved != _jsonable(desc):
            raise SearchError(f"study '{name}' in {st.describe(url)} was made by a different search (config, "
                              f"space or --search_type differ); use another --study_name or the same config")
        return study
    return optuna.load_study(**kw)


def _jsonable(d):
    import json
    return json.loads(json.dumps(d))


def requeue_interrupted(study) -> int:
    """--resume: trials left RUNNING by a killed search are failed, and every interrupted trial's
    values are queued once more, so the search picks up where it stopped."""
    from optuna.trial import TrialState
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    n = 0
    for t in trials:
        if t.state == TrialState.RUNNING:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        elif not (t.state == TrialState.FAIL and "error" not in t.user_attrs):
            continue
        if t.number not in retried and t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            n += 1
    return n


# --------------------------------------------------------------------------- one trial
def run_trial(trial, sc: SearchConfig, output_dir: str, pruned_exc) -> float:
    """Train one configuration; evaluations go to the pruner; returns the objective."""
    from .train import train
    values = {p.name: p.suggest(trial) for p in sc.params}
    cfg = sc.trial_config(values)
    tdir = os.path.join(output_dir, "trials", f"{trial.number:05d}")
    if os.path.isdir(tdir):            # a trial run again after an interruption starts afresh
        shutil.rmtree(tdir)
    os.makedirs(tdir)
    last = {"step": 0}
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")

    def on_step(step, loss):
        last["step"] = step

    def on_eval(step, losses):
        v = losses["val"]
        if not math.isfinite(v):
            raise TrialFailed(f"validation loss became {v} at step {step}")
        if step > 0:
            trial.report(v, step)
            if trial.should_prune():
                raise pruned_exc(f"pruned at step {step}")

    with open(os.path.join(tdir, "train.log"), "w", encoding="utf-8") as logf:
        try:
            summary = train(cfg, tdir, log=lambda msg: print(msg, file=logf), callback=on_step, on_eval=on_eval)
        finally:
            trial.set_user_attr("steps", last["step"])
            ck = os.path.join(tdir, "checkpoint.safetensors")
            if os.path.exists(ck):   # the trial's model/ stays; its optimizer state is not needed
                os.remove(ck)
    value = summary["val_loss"] if sc.metric == "val_loss" else summary["best_val_loss"]
    if value is None or not math.isfinite(value):
        raise TrialFailed(f"objective {sc.metric} is {value}")
    return float(value)


def _error_text(e: BaseException) -> str:
    """The message alone for our own errors (they say what happened), else with the type's name."""
    from .train import TrainingDiverged
    msg = str(e) or type(e).__name__
    return msg if isinstance(e, (TrialFailed, TrainingDiverged, ConfigError)) else f"{type(e).__name__}: {msg}"


def optuna_objective(sc: SearchConfig, output_dir: str, say):
    import optuna

    def objective(trial):
        try:
            return run_trial(trial, sc, output_dir, optuna.TrialPruned)
        except optuna.TrialPruned:
            raise
        except Exception as e:   # recorded with its message; optimize(catch=...) keeps the search going
            trial.set_user_attr("error", _error_text(e))
            say(f"trial {trial.number} failed: {_error_text(e)}")
            raise
    return objective


# --------------------------------------------------------------------------- the loops
def n_counted(study) -> int:
    return sum(st.counts_toward_budget(t) for t in study.get_trials(deepcopy=False))


def optuna_loop(study, sc, output_dir, n_trials, deadline, on_trial, say) -> None:
    """One worker: run trials until the study holds ``n_trials`` or the deadline passes."""
    objective = optuna_objective(sc, output_dir, say)
    while n_counted(study) < n_trials and (deadline is None or time.time() < deadline):
        study.optimize(objective, n_trials=1, catch=(Exception,))
        on_trial()


def local_loop(study: st.LocalStudy, sc, output_dir, search_type, seed, n_trials, deadline, on_trial, say) -> None:
    grid = grid_order(sc, seed) if search_type == "grid" else None
    while study.n_done() < n_trials and (deadline is None or time.time() < deadline):
        number = study.n_done()
        values = grid[number] if grid is not None else random_params(sc, seed, number)
        trial, t0 = st.LocalTrial(number, values), time.time()
        try:
            value = run_trial(trial, sc, output_dir, LocalPruned)
            study.add(trial, "COMPLETE", value, t0)
        except KeyboardInterrupt:
            raise   # not recorded: the same trial runs again on --resume
        except Exception as e:
            study.add(trial, "FAIL", None, t0, _error_text(e))
            say(f"trial {number} failed: {_error_text(e)}")
        on_trial()


def _worker(spec: dict) -> None:
    """A spawned worker process: limit threads, open the shared study, run trials."""
    from minigrad.kernels import threads
    threads.set_blas_threads(spec["threads"])
    sc = load_search_config(spec["config"], spec["overrides"])
    if spec["data"] is not None:
        sc.base.data.corpus = spec["data"]
    try:
        study = open_study(spec["url"], spec["study_name"], sc, spec["search_type"], spec["seed"], create=False)
        optuna_loop(study, sc, spec["output_dir"], spec["n_trials"], spec["deadline"], lambda: None,
                    lambda m: print(m, file=sys.stderr))
    except KeyboardInterrupt:
        pass


def run_workers(spec: dict, n_workers: int, study, n_trials: int, bar) -> None:
    """N spawned processes on one storage; this process only watches the study for the bar."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per = max(1, cores // n_workers)
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    procs = []
    try:
        for k in THREAD_VARS:   # a spawned child reads these when it imports NumPy / Numba / minigrad
            os.environ[k] = str(per)
        for i in range(n_workers):
            p = ctx.Process(target=_worker, args=({**spec, "threads": per, "seed": spec["seed"] + i},),
                            name=f"lm-search-worker-{i}")
            p.start()
            procs.append(p)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        while any(p.is_alive() for p in procs):
            bar(study)
            for p in procs:
                p.join(timeout=2.0 / len(procs))
    except KeyboardInterrupt:
        import signal
        time.sleep(1.0)   # Ctrl-C in a terminal reached the workers too; give them a moment
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        raise
    bar(study)
    bad = [f"worker {i} exited with code {p.exitcode}" for i, p in enumerate(procs) if p.exitcode]
    if bad:
        raise SearchError("; ".join(bad) + " (its message is above)")


# --------------------------------------------------------------------------- main
class _Bar:
    """tqdm over trials, postfix: best value so far and how many were pruned / failed."""

    def __init__(self, total: int, enabled: bool, direction: str):
        self.direction, self.n = direction, 0
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="search", unit="trial", dynamic_ncols=True)

    def update(self, records: list[dict]) -> None:
        done = [r for r in records if r["state"] in ("COMPLETE", "PRUNED", "FAIL")]
        vals = [r["value"] for r in records if r["state"] == "COMPLETE"]
        if self.bar is None:
            return
        self.bar.update(len(done) - self.n)
        self.n = len(done)
        best = (min(vals) if self.direction == "minimize" else max(vals)) if vals else None
        self.bar.set_postfix(best="-" if best is None else f"{best:.4f}",
                             pruned=sum(r["state"] == "PRUNED" for r in records),
                             failed=sum(r["state"] == "FAIL" for r in records))

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def search(args, sc: SearchConfig, optuna_ok: bool, n_trials: int, log=print) -> dict:
    from .search_report import write_results
    url = args.storage or default_storage(args.output_dir, optuna_ok)
    if args.storage is None:
        os.makedirs(args.output_dir, exist_ok=True)   # the default storage lives there
    deadline = time.time() + args.timeout if args.timeout else None
    interrupted = False
    if optuna_ok:
        study = open_study(url, args.study_name, sc, args.search_type, args.seed, create=True)
        os.makedirs(args.output_dir, exist_ok=True)
        if args.resume:
            n = requeue_interrupted(study)
            if n:
                print(f"resume: {n} interrupted trial(s) queued again", file=sys.stderr)
        records = lambda: [st.record_from_frozen(t) for t in study.get_trials(deepcopy=False)]  # noqa: E731
        log(f"study '{args.study_name}' in {st.describe(url)}: {n_counted(study)} of {n_trials} trials there")
    else:
        study = st.LocalStudy(url)
        records = lambda: st.records_from_local(study)  # noqa: E731
        log(f"search without Optuna in {url}: {study.n_done()} of {n_trials} trials there"
            + ("" if sc.pruner["type"] == "none" else "; pruning needs Optuna, so every trial runs its budget"))
    bar = _Bar(n_trials, not args.no_progress, sc.direction)
    bar.update(records())
    try:
        if optuna_ok and args.n_workers > 1:
            spec = {"config": args.config, "overrides": args.overrides, "data": args.data, "url": url,
                    "study_name": args.study_name, "search_type": args.search_type, "seed": args.seed,
                    "output_dir": args.output_dir, "n_trials": n_trials, "deadline": deadline}
            run_workers(spec, args.n_workers, study, n_trials, lambda s: bar.update(records()))
        elif optuna_ok:
            optuna_loop(study, sc, args.output_dir, n_trials, deadline, lambda: bar.update(records()), bar.write)
        else:
            local_loop(study, sc, args.output_dir, args.search_type, args.seed, n_trials, deadline,
                       lambda: bar.update(records()), bar.write)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    recs = records()
    summary = write_results(recs, sc, args.output_dir, search_type=args.search_type, storage=st.describe(url),
                            study=study if optuna_ok else None)
    summary["interrupted"] = interrupted
    if interrupted:
        log(f"interrupted: {summary['n_complete']} complete, {summary['n_pruned']} pruned, {summary['n_failed']}"
            f" failed trial(s) kept in {st.describe(url)}; "
            f"continue with the same command and --resume")
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sc, optuna_ok, n_trials = check_args(args)
        summary = search(args, sc, optuna_ok, n_trials)
    except (ConfigError, SearchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["best"] is None:
        print(f"error: {summary['no_best_reason']}", file=sys.stderr)
        return 1
    b = summary["best"]
    print(f"best: trial {b['number']}, {sc.metric} {b['value']:.4f}; {summary['n_complete']} complete, "
          f"{summary['n_pruned']} pruned, {summary['n_failed']} failed; "
          f"{os.path.join(args.output_dir, 'best_config.yaml')}, report.md")
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
