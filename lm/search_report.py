"""What a search leaves in its output folder, from its trial records (``lm.search_storage``):

- ``trials.csv``: one row per trial: number, state, value, steps run, duration, each parameter, error;
- ``best_config.yaml``: the best trial's full training config, which ``lm.train --config`` takes as it is;
- ``report.md``: counts, pruned fraction, compute used, the best trial, the leaders, importances;
- ``history.png`` (objective per trial and best so far), ``curves.png`` (validation loss against
  step, pruned trials ending early), ``params.png`` (each parameter against the objective),
  ``importances.png`` (Optuna's fANOVA evaluator when there is a study, else rank correlation).
"""
from __future__ import annotations

import csv
import math
import os

import numpy as np
import yaml

from minigrad.io import atomic_write_text

from .search_space import SearchConfig

STATES = ("COMPLETE", "PRUNED", "FAIL")


def _best(records: list[dict], direction: str):
    done = [r for r in records if r["state"] == "COMPLETE" and r["value"] is not None and math.isfinite(r["value"])]
    if not done:
        return None
    return (min if direction == "minimize" else max)(done, key=lambda r: r["value"])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_csv(records: list[dict], sc: SearchConfig, path: str) -> None:
    names = [p.name for p in sc.params]
    rows = [["number", "state", "value", "steps", "duration_s", *names, "error"]]
    for r in sorted(records, key=lambda r: r["number"]):
        rows.append([r["number"], r["state"], "" if r["value"] is None else repr(r["value"]),
                     "" if r.get("steps") is None else r["steps"],
                     "" if r.get("duration_s") is None else f"{r['duration_s']:.2f}",
                     *["" if n not in r["params"] else r["params"][n] for n in names], r.get("error") or ""])
    import io
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_best_config(best: dict, sc: SearchConfig, path: str, search_type: str) -> None:
    cfg = sc.trial_config(best["params"], for_trial=False)
    head = (f"# Best trial {best['number']} of an lm.search ({search_type}): {sc.metric} {best['value']:.4f}\n"
            f"# after {cfg.train.max_iters} steps (the per-trial budget). Train it with\n"
            f"#   python -m lm.train --config {os.path.basename(path)} --output_dir output/best\n"
            f"# (add train.max_iters=N to train it longer).\n"
            f"# Searched: {', '.join(f'{k}={_fmt(v)}' for k, v in best['params'].items())}\n")
    atomic_write_text(path, head + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def importances(records: list[dict], sc: SearchConfig, study=None) -> tuple[dict, str]:
    """Parameter importances (sum 1): Optuna's default evaluator (fANOVA) on a study, else the
    absolute Spearman rank correlation of each parameter with the objective, normalised."""
    done = [r for r in records if r["state"] == "COMPLETE"]
    if study is not None and len(done) >= 2:
        try:
            import optuna
            imp = optuna.importance.get_param_importances(study)
            if imp:
                return dict(imp), "Optuna fANOVA"
        except Exception:   # e.g. a parameter with one value only; the fallback still says something
            pass
    if len(done) < 3:
        return {}, "too few complete trials"
    y = _ranks([r["value"] for r in done])
    out = {}
    for p in sc.params:
        xs = [r["params"][p.name] for r in done]
        if p.type == "categorical":
            xs = [p.choices.index(x) if x in p.choices else 0 for x in xs]
        x = _ranks(xs)
        out[p.name] = 0.0 if x.std() == 0 or y.std() == 0 else abs(float(np.corrcoef(x, y)[0, 1]))
    total = sum(out.values())
    if total > 0:
        out = {k: v / total for k, v in out.items()}
    return dict(sorted(out.items(), key=lambda kv: -kv[1])), "|Spearman rank correlation|"


def _ranks(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    order = v.argsort(kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    return r


# --------------------------------------------------------------------------- plots
def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)


def plot_history(records, sc: SearchConfig, path: str):
    """Objective per trial (pruned trials at their last reported value) and the best so far."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    recs = sorted(records, key=lambda r: r["number"])
    comp = [(r["number"], r["value"]) for r in recs if r["state"] == "COMPLETE"]
    pruned = [(r["number"], r["intermediate"][max(r["intermediate"])]) for r in recs
              if r["state"] == "PRUNED" and r["intermediate"]]
    if comp:
        ax.plot(*zip(*comp), "o", color="C0", label="complete", gid="complete")
        best, xs, ys = None, [], []
        for n, v in comp:
            best = v if best is None else (min(best, v) if sc.direction == "minimize" else max(best, v))
            xs.append(n)
            ys.append(best)
        ax.step(xs, ys, where="post", color="C3", label="best so far", gid="best")
    if pruned:
        ax.plot(*zip(*pruned), "x", color="0.5", label="pruned (last report)", gid="pruned")
    ax.set_xlabel("trial")
    ax.set_ylabel(sc.metric)
    ax.set_title("optimisation history")
    ax.grid(alpha=0.3)
    if comp or pruned:
        ax.legend()
    _save(fig, path)
    return fig


def plot_curves(records, sc: SearchConfig, path: str):
    """Validation loss against step for every trial; pruned ones stop early."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for r in sorted(records, key=lambda r: r["number"]):
        iv = r.get("intermediate") or {}
        if not iv:
            continue
        steps = sorted(iv)
        style = {"COMPLETE": dict(color="C0", alpha=0.8, lw=1.2), "PRUNED": dict(color="0.6", ls="--", lw=1)}
        ax.plot(steps, [iv[s] for s in steps], **style.get(r["state"], dict(color="C3", lw=1)),
                gid=f"trial-{r['number']}-{r['state']}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("learning curves (dashed: pruned)")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return fig


def plot_params(records, sc: SearchConfig, path: str):
    """Each parameter against the objective, complete trials; the best one in red."""
    from matplotlib.figure import Figure
    n = len(sc.params)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.2 * cols, 2.8 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    done = [r for r in records if r["state"] == "COMPLETE"]
    best = _best(records, sc.direction)
    for ax, p in zip(axes, sc.params):
        xs = [r["params"][p.name] for r in done if p.name in r["params"]]
        ys = [r["value"] for r in done if p.name in r["params"]]
        if p.type == "categorical":
            labels = [str(c) for c in p.choices]
            xs = [labels.index(str(x)) for x in xs]
            ax.set_xticks(range(len(labels)), labels)
        ax.plot(xs, ys, "o", color="C0", alpha=0.7, gid=p.name)
        if best is not None and p.name in best["params"]:
            bx = best["params"][p.name]
            bx = [str(c) for c in p.choices].index(str(bx)) if p.type == "categorical" else bx
            ax.plot([bx], [best["value"]], "o", color="C3", ms=9, gid=f"{p.name}-best")
        if p.log:
            ax.set_xscale("log")
        ax.set_xlabel(p.name)
        ax.set_ylabel(sc.metric)
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    _save(fig, path)
    return fig


def plot_importances(imp: dict, method: str, path: str):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 0.5 + 0.45 * max(1, len(imp))))
    ax = fig.subplots()
    names = list(imp)[::-1]
    ax.barh(names, [imp[k] for k in names], color="C2", gid="importances")
    ax.set_xlabel("importance (sums to 1)")
    ax.set_title(f"parameter importances ({method})")
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)
    return fig


# --------------------------------------------------------------------------- everything
def write_results(records: list[dict], sc: SearchConfig, output_dir: str, search_type: str = "optuna",
                  storage: str = "", study=None, baseline: list[tuple[str, str]] | None = None,
                  log=print) -> dict:
    """Write every result file; returns a summary (counts, compute, best trial or why there is none)."""
    # a trial stopped by Ctrl-C or a killed worker is no result: it runs again on --resume
    real = [r for r in records if r["state"] in STATES and not (r["state"] == "FAIL" and r.get("error") == "interrupted")]
    counts = {s: sum(r["state"] == s for r in real) for s in STATES}
    finished = len(real)
    budget = sc.budget.get("max_iters", sc.base.train.max_iters)
    steps_run = sum(r.get("steps") or 0 for r in real)
    best = _best(records, sc.direction)
    summary = {"n_trials": len(records), "n_finished": finished, "n_interrupted": sum(
               r["state"] == "FAIL" and r.get("error") == "interrupted" for r in records), "n_complete": counts["COMPLETE"],
               "n_pruned": counts["PRUNED"], "n_failed": counts["FAIL"],
               "pruned_fraction": counts["PRUNED"] / finished if finished else 0.0,
               "steps_run": steps_run, "steps_no_pruning": finished * budget,
               "compute_fraction": steps_run / (finished * budget) if finished else 0.0,
               "best": best, "no_best_reason": None}
    write_csv(records, sc, os.path.join(output_dir, "trials.csv"))
    if best is None:
        errs = [r["error"] for r in records if r["state"] == "FAIL" and r.get("error")]
        summary["no_best_reason"] = (
            f"no trial completed ({counts['PRUNED']} pruned, {counts['FAIL']} failed"
            + (f"; first error: {errs[0]}" if errs else "") + "), so there is no best configuration. "
            "Loosen the pruner (pruner.n_warmup_steps, n_startup_trials, or pruner.type: none), "
            "narrow the search space, or look at trials.csv and the trials' train.log")
    else:
        write_best_config(best, sc, os.path.join(output_dir, "best_config.yaml"), search_type)
    imp, method = importances(records, sc, study)
    summary["importances"], summary["importance_method"] = imp, method
    for name, fn in (("history.png", lambda p: plot_history(records, sc, p)),
                     ("curves.png", lambda p: plot_curves(records, sc, p)),
                     ("params.png", lambda p: plot_params(records, sc, p)),
                     ("importances.png", lambda p: plot_importances(imp, method, p) if imp else None)):
        try:
            fn(os.path.join(output_dir, name))
        except Exception as e:   # a plot must never lose a finished search
            log(f"warning: could not draw {name}: {e}")
    atomic_write_text(os.path.join(output_dir, "report.md"), report_md(records, sc, summary, search_type,
                                                                        storage, baseline))
    return summary


def report_md(records, sc: SearchConfig, s: dict, search_type: str, storage: str, baseline) -> str:
    lines = [f"# lm.search report", "",
             f"- search: {search_type}, objective {sc.metric} ({sc.direction}), storage `{storage}`",
             f"- trials: {s['n_finished']} finished: {s['n_complete']} complete, {s['n_pruned']} pruned "
             f"({100 * s['pruned_fraction']:.0f}%), {s['n_failed']} failed"
             + (f" ({s['n_interrupted']} more interrupted)" if s.get("n_interrupted") else ""),
             f"- compute: {s['steps_run']:,} training steps run of {s['steps_no_pruning']:,} that the same trials "
             f"would run without pruning ({100 * s['compute_fraction']:.0f}%)", ""]
    best = s["best"]
    if best is None:
        lines += [f"**No best configuration:** {s['no_best_reason']}", ""]
    else:
        lines += [f"## Best trial: {best['number']}, {sc.metric} {best['value']:.4f}", "",
                  "| parameter | base | best |", "|---|---|---|"]
        for p in sc.params:
            section, key = p.name.split(".", 1)
            lines.append(f"| {p.name} | {_fmt(getattr(getattr(sc.base, section), key))} | "
                         f"{_fmt(best['params'].get(p.name))} |")
        lines += ["", "`best_config.yaml` holds its full training config.", ""]
        top = sorted((r for r in records if r["state"] == "COMPLETE"), key=lambda r: r["value"],
                     reverse=sc.direction == "maximize")[:5]
        lines += ["## Leaders", "", "| trial | " + " | ".join(p.name for p in sc.params) + f" | {sc.metric} |",
                  "|---" * (len(sc.params) + 2) + "|"]
        for r in top:
            lines.append(f"| {r['number']} | " + " | ".join(_fmt(r["params"].get(p.name)) for p in sc.params)
                         + f" | {r['value']:.4f} |")
        lines.append("")
    if s.get("importances"):
        lines += [f"## Importances ({s['importance_method']})", "",
                  " · ".join(f"{k} {v:.2f}" for k, v in s["importances"].items()), ""]
    if baseline:
        lines += ["## Against the base config", "", "| | value |", "|---|---|"]
        lines += [f"| {a} | {b} |" for a, b in baseline] + [""]
    lines.append("Plots: history.png, curves.png, params.png, importances.png")
    return "\n".join(lines) + "\n"
