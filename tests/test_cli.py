"""The command-line tools as a new user meets them: one error line (exit 2, no traceback) for every
mistake, nothing created by a failed run, the output-folder and resume rules, caches that fail soft."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from lm import cli
from lm import generate as gen
from lm import train as lt
from lm.data import CacheWarning, prepare_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
        "train.batch_size=4", "train.eval_iters=2", "train.warmup_iters=2", "--no_progress",
        "train.sample_tokens=0", "train.log_interval=5", "train.eval_interval=5"]


@pytest.fixture()
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"]
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(" ".join(rng.choice(words, size=8)) + "." for _ in range(300)))
    return str(p)


def targs(corpus, out, *extra, iters=10):
    return ["--data", corpus, "--output_dir", str(out), "--max_iters", str(iters), *TINY,
            f"data.cache_dir={os.path.dirname(corpus)}/cache", *extra]


def one_error(capsys, rc, *words):
    """rc is 2, stderr is one `error:` line naming every word (case-insensitive), no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "--debug" in lines[0]
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small finished run shared by the read-only tests."""
    d = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat"]
    c = d / "c.txt"
    c.write_text("\n".join(" ".join(rng.choice(words, size=8)) for _ in range(300)))
    out = d / "out"
    assert lt.main(targs(str(c), out, iters=10)) == 0
    return str(c), out


# --------------------------------------------------------------------------- lm.train: bad values
@pytest.mark.parametrize("extra, words", [
    (["train.learning_rate=-1"], ["train.learning_rate", "-1"]),
    (["train.beta1=1.5"], ["train.beta1", "1.5"]),
    (["train.grad_clip=-1"], ["train.grad_clip", "-1"]),
    (["train.log_interval=0"], ["train.log_interval", "0"]),
    (["model.n_embd=0"], ["model.n_embd", "0"]),
    (["--max_iters", "-5"], ["train.max_iters", "-5"]),
    (["data.tokenizer=bpe", "data.vocab_size=100"], ["data.vocab_size", "256", "100"]),
    (["train.weight_decay=-0.1"], ["train.weight_decay"]),
    (["--device", "gpu"], ["device", "gpu"]),
    (["model.block_size=100000"], ["block_size", "tokens"]),
    (["--seed", "-1"], ["train.seed", "-1"]),
])
def test_train_bad_values_one_error_and_no_folder(tmp_path, corpus, capsys, extra, words):
    out = tmp_path / "out"
    one_error(capsys, lt.main(targs(corpus, out, *extra)), *words)
    assert not out.exists()


def test_train_corpus_shorter_than_block(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("abcdefgh" * 3)
    out = tmp_path / "out"
    one_error(capsys, lt.main(targs(str(short), out)), "block_size", "tokens")
    assert not out.exists()


def test_train_cuda_without_gpu(tmp_path, corpus, capsys):
    import minigrad
    if minigrad.cuda_available():
        pytest.skip("a GPU is usable here")
    out = tmp_path / "out"
    one_error(capsys, lt.main(targs(corpus, out, "--device", "cuda")), "cuda", "not usable")
    assert not out.exists()


def test_train_output_dir_problems(tmp_path, corpus, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    one_error(capsys, lt.main(targs(corpus, f)), "is a file")
    one_error(capsys, lt.main(targs(corpus, f / "sub")), "which is a file")
    d = tmp_path / "d"
    d.mkdir()
    (d / "model").write_text("x")
    one_error(capsys, lt.main(targs(corpus, d)), "model", "is a file")


def test_train_output_dir_not_writable(tmp_path, corpus, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    real = os.access
    monkeypatch.setattr(lt.os, "access", lambda p, m: False if os.fspath(p) == str(parent) else real(p, m))
    one_error(capsys, lt.main(targs(corpus, parent / "out")), "permission", str(parent))
    assert not (parent / "out").exists()


def test_debug_flag_and_env_show_the_traceback(tmp_path, corpus, monkeypatch):
    with pytest.raises(Exception, match="learning_rate"):
        lt.main(targs(corpus, tmp_path / "o", "train.learning_rate=-1", "--debug"))
    monkeypatch.setenv("LM_DEBUG", "1")
    with pytest.raises(Exception, match="top_p"):
        gen.main(["--model_dir", str(tmp_path), "--top_p", "2"])


def test_unexpected_error_is_one_line(capsys):
    def boom():
        raise TypeError("something inside broke")
    assert cli.run_tool(boom) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TypeError: something inside broke" in err and "--debug" in err


def test_overrides_anywhere_among_flags(tmp_path, corpus):
    out = tmp_path / "o"
    argv = ["--output_dir", str(out), "model.n_layer=1", "--no_progress", "train.max_iters=3", "--data", corpus,
            *[a for a in TINY if a not in ("model.n_layer=2", "--no_progress")],
            f"data.cache_dir={tmp_path}/cache"]
    assert lt.main(argv) == 0
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["model"]["n_layer"] == 1
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


# --------------------------------------------------------------------------- lm.train: folders and resume
def test_existing_run_needs_resume_or_overwrite(tmp_path, corpus, capsys):
    out = tmp_path / "o"
    assert lt.main(targs(corpus, out, iters=5)) == 0
    before = (out / "checkpoint.safetensors").read_bytes()
    one_error(capsys, lt.main(targs(corpus, out, iters=5)), "--resume", "--overwrite")
    assert (out / "checkpoint.safetensors").read_bytes() == before
    (out / "memory.png").write_bytes(b"old")          # a file of the old run
    (out / "notes.txt").write_text("mine")            # not ours: kept
    assert lt.main(targs(corpus, out, "--overwrite", "--seed", "7", iters=5)) == 0
    assert (out / "checkpoint.safetensors").read_bytes() != before
    assert not (out / "memory.png").exists() and (out / "notes.txt").read_text() == "mine"
    one_error(capsys, lt.main(targs(corpus, out, "--overwrite", "--resume")), "--resume", "--overwrite")


@pytest.mark.parametrize("how", ["truncated", "empty", "random"])
def test_resume_from_a_broken_checkpoint(trained, tmp_path, capsys, how):
    corpus, src = trained
    out = tmp_path / "o"
    out.mkdir()
    good = (src / "checkpoint.safetensors").read_bytes()
    data = {"truncated": good[: len(good) // 2], "empty": b"",
            "random": np.random.default_rng(0).bytes(100_000)}[how]
    (out / "checkpoint.safetensors").write_bytes(data)
    one_error(capsys, lt.main(["--output_dir", str(out), "--resume", "--no_progress"]),
              "checkpoint.safetensors", "--overwrite")


def test_resume_refuses_changed_model_and_data(trained, tmp_path, capsys):
    corpus, src = trained
    other = tmp_path / "other.txt"
    other.write_text("a different corpus " * 200)
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes((src / "checkpoint.safetensors").read_bytes())
    line = one_error(capsys, lt.main(["--output_dir", str(out), "--resume", "--data", str(other),
                                      "model.n_layer=3", "--max_iters", "12"]),
                     "--data", "other.txt", "model.n_layer=3", "(the checkpoint has 2)")
    assert "train.max_iters" not in line


def test_resume_without_repeating_the_settings_takes_the_checkpoints(trained, tmp_path, capsys):
    corpus, src = trained
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes((src / "checkpoint.safetensors").read_bytes())
    (out / "metrics.jsonl").write_text((src / "metrics.jsonl").read_text())
    rc = lt.main(["--output_dir", str(out), "--resume", "--max_iters", "12", "--no_progress",
                  "train.sample_tokens=0", "train.eval_iters=2", "train.batch_size=4", "train.eval_interval=5",
                  f"data.cache_dir={tmp_path}/cache"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "model.n_layer=2" in printed and "data.corpus=" in printed   # said what it took
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


def test_stale_tmp_files_removed_at_next_start(trained, tmp_path):
    corpus, src = trained
    out = tmp_path / "o"
    (out / "model").mkdir(parents=True)
    (out / "checkpoint.safetensors").write_bytes((src / "checkpoint.safetensors").read_bytes())
    stale = [out / ".checkpoint.safetensors.k2j4h5ab.tmp", out / "model" / ".model.safetensors.x9y8z7w6.tmp",
             out / ".metrics.jsonl.ab12cd34.tmp", out / "loss.png.tmp.png"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    mine = out / ".notes.txt.abcd1234.tmp"   # not a temporary file of ours: kept
    mine.write_text("x")
    assert lt.main(["--output_dir", str(out), "--resume", "--no_progress", "train.sample_tokens=0",
                    "--max_iters", "10", "train.eval_iters=2", f"data.cache_dir={tmp_path}/cache"]) == 0
    assert not any(p.exists() for p in stale) and mine.exists()


def test_interrupted_run_metrics_cut_back_and_wall_time_summed(tmp_path, corpus, capsys):
    out = tmp_path / "o"
    args = lt.parse_args(targs(corpus, out, iters=20))

    def crash(step, loss):   # dies after step 13; the last save was at step 10
        if step == 13:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt) as e:
        lt.train(lt.resolve_config(args), str(out), callback=crash)
    assert e.value.saved_step == 10 and e.value.step == 13
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    wall_killed = max(r["wall_s"] for r in lines)
    assert max(r["step"] for r in lines) == 12   # the line of step 13 is written after the callback
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 14, "lo')           # a line cut short by the kill
    assert lt.main(targs(corpus, out, "--resume", iters=20)) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    evals = [r["step"] for r in lines if r.get("kind") == "eval"]
    assert steps == list(range(1, 21)), steps             # each step once, in order
    assert evals == [0, 5, 10, 15, 20], evals
    summary = json.loads((out / "summary.json").read_text())
    assert summary["wall_s"] >= wall_killed + summary["wall_s_this_part"] - 1e-6
    assert summary["wall_s_this_part"] < summary["wall_s"]


def test_ctrl_c_names_the_last_save_and_the_resume_command(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "o"
    real = lt.save_checkpoint
    calls = []

    def save_then_interrupt(path, model, opt, step, *a, **k):
        if step == 10:   # Ctrl-C after step 10, before its save: the last save is step 5's
            raise KeyboardInterrupt
        real(path, model, opt, step, *a, **k)
        calls.append(step)
    monkeypatch.setattr(lt, "save_checkpoint", save_then_interrupt)
    argv = targs(corpus, out, iters=20)
    assert lt.main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "last save is at step 5" in err and calls == [0, 5]
    assert "python -m lm.train" in err and "--resume" in err and str(out) in err
    monkeypatch.setattr(lt, "save_checkpoint", real)
    cmd = err.split("Continue with: ")[1].strip()
    import shlex
    assert lt.main(shlex.split(cmd)[3:]) == 0     # the printed command continues the run
    assert json.loads((out / "summary.json").read_text())["steps"] == 20


def test_failed_run_leaves_no_folder(tmp_path, corpus, monkeypatch, capsys):
    out = tmp_path / "o"

    def broken(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(lt, "save_model_dir", broken)
    one_error(capsys, lt.main(targs(corpus, out)), "no space")
    assert not out.exists()


def test_progress_rate_excludes_compile_and_evaluation():
    import io
    import time
    p = lt.Progress(10, 0, file=io.StringIO(), mininterval=0)
    t = time.perf_counter()
    time.sleep(0.3)                             # a slow evaluation / first step
    p.exclude(time.perf_counter() - t)
    for _ in range(5):
        p.update(1)
    assert p.bar.format_dict["elapsed"] < 0.2
    rate = p.bar.format_dict["rate"]
    assert rate is None or rate > 20
    p.close()


def test_train_progress_bar_smoke(tmp_path, corpus, capsys):
    argv = [a for a in targs(corpus, tmp_path / "o", iters=6) if a != "--no_progress"]
    assert lt.main(argv) == 0
    assert "train" in capsys.readouterr().err


# --------------------------------------------------------------------------- lm.generate
@pytest.mark.parametrize("extra, words", [
    (["--repetition_penalty", "0"], ["repetition_penalty", "0"]),
    (["--repetition_penalty", "-1"], ["repetition_penalty", "-1"]),
    (["--top_k", "-5"], ["top_k", "-5"]),
    (["--strategy", "greedy", "--top_p", "1.5"], ["top_p", "1.5"]),
    (["--strategy", "greedy", "--temperature", "-1"], ["temperature", "-1"]),
    (["--strategy", "beam", "--temperature", "0"], ["temperature"]),
    (["--num_beams", "0"], ["num_beams"]),
    (["--max_new_tokens", "-1"], ["max_new_tokens"]),
    (["--device", "gpu"], ["device", "gpu"]),
    (["--prompt", "QZ"], ["'Q'", "--skip_unknown"]),
])
def test_generate_bad_values(trained, capsys, extra, words):
    _, out = trained
    one_error(capsys, gen.main(["--model_dir", str(out / "model"), "--max_new_tokens", "3", *extra]), *words)


def test_generate_skip_unknown(trained, capsys):
    _, out = trained
    assert gen.main(["--model_dir", str(out / "model"), "--prompt", "thQe", "--skip_unknown",
                     "--max_new_tokens", "3", "--strategy", "greedy"]) == 0
    assert capsys.readouterr().out.startswith("the")


def test_generate_bad_model_folders(trained, tmp_path, capsys):
    _, out = trained
    m = tmp_path / "m"
    m.mkdir()
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        (m / f).write_bytes((out / "model" / f).read_bytes())
    conf = json.loads((m / "config.json").read_text())
    conf["model"]["n_layer"] = 3
    (m / "config.json").write_text(json.dumps(conf))
    one_error(capsys, gen.main(["--model_dir", str(m)]), "model.safetensors", "config.json", "missing keys")
    conf["model"]["n_layer"] = "two"
    (m / "config.json").write_text(json.dumps(conf))
    one_error(capsys, gen.main(["--model_dir", str(m)]), "config.json", "n_layer", "two")
    (m / "config.json").write_text("{not json")
    one_error(capsys, gen.main(["--model_dir", str(m)]), str(m / "config.json"), "not valid JSON")


# --------------------------------------------------------------------------- caches fail soft
def test_unwritable_token_cache_warns_once(tmp_path, corpus):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        data = prepare_data(corpus, cache_dir=blocker / "cache")
    ours = [x for x in w if issubclass(x.category, CacheWarning)]
    assert len(ours) == 1 and "data.cache_dir" in str(ours[0].message)
    assert len(data.train) > 0 and data.cache_path is None


def test_unwritable_numba_cache_dir_does_not_break_import(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(blocker / "numba"), XDG_CACHE_HOME=str(tmp_path / "xdg"),
               PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-W", "default", "-c",
                        "import os, minigrad.kernels._numba as n; print(n.HAVE_NUMBA, os.environ['NUMBA_CACHE_DIR'])"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == str(tmp_path / "xdg" / "minigrad" / "numba")
    assert r.stderr.count("NUMBA_CACHE_DIR") == 1 and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- messages, extras, README
def test_data_messages():
    from lm.data import CorpusError, load_corpus
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "noext")
        open(p, "w").write("x")
        with pytest.raises(CorpusError) as e:
            load_corpus(p)
        assert "(no extension)" in str(e.value) and "'(no extension)'" not in str(e.value)
        q = os.path.join(d, "a.jsonl")
        open(q, "w").write('{"text": "abc\n')
        with pytest.raises(CorpusError) as e:
            load_corpus(q)
        assert "at at" not in str(e.value) and "column" in str(e.value)


def test_setup_extras_point_to_something():
    import configparser
    c = configparser.ConfigParser()
    c.read(os.path.join(ROOT, "setup.cfg"))
    extras = c["options.extras_require"]
    # the search extra installs Optuna for lm.search: both exist, and the tool imports (Optuna lazily)
    assert "search" in extras and "optuna" in extras["search"]
    assert os.path.isfile(os.path.join(ROOT, "lm", "search.py"))
    import importlib
    search = importlib.import_module("lm.search")
    assert callable(search.main)
    scripts = dict(ln.split("=", 1) for ln in c["options.entry_points"]["console_scripts"].strip().splitlines())
    scripts = {k.strip(): v.strip() for k, v in scripts.items()}
    assert scripts["lm-search"] == "lm.search:main"


def test_matmul_rate_command(capsys):
    from minigrad import speed
    assert speed.main(["--n", "64", "--repeats", "2"]) == 0
    assert "GFLOP/s" in capsys.readouterr().out
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "python -m minigrad.speed" in readme


def test_unwritable_cache_is_one_warning_line_from_the_command(tmp_path, corpus):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = [a if not a.startswith("data.cache_dir=") else f"data.cache_dir={blocker}/cache"
            for a in targs(corpus, tmp_path / "o", iters=2)]
    r = subprocess.run([sys.executable, "-m", "lm.train", *argv], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if "cache" in ln]
    assert len(warn) == 1 and warn[0].startswith("warning: could not write the token cache"), r.stderr
    assert "Traceback" not in r.stderr


def test_unwritable_home_trains_with_warnings(tmp_path, corpus):
    """HOME in a place nobody can write (here: under a file), no cache variables set: training works."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    env = {k: v for k, v in os.environ.items() if k not in ("LM_DATA_DIR", "XDG_CACHE_HOME", "NUMBA_CACHE_DIR")}
    env.update(HOME=str(blocker / "home"), PYTHONPATH=ROOT, MPLCONFIGDIR=str(tmp_path / "mpl"))
    argv = [a for a in targs(corpus, tmp_path / "o", iters=2) if not a.startswith("data.cache_dir=")]
    r = subprocess.run([sys.executable, "-m", "lm.train", *argv], capture_output=True, text=True, timeout=300,
                       env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("warning: could not write the token cache") == 1
    assert (tmp_path / "o" / "model" / "model.safetensors").is_file()


def test_export_and_knn_go_through_run_tool(tmp_path, capsys, monkeypatch):
    from lm import export, knn
    missing = str(tmp_path / "no-model")
    one_error(capsys, export.main(["--format", "hf", "--model_dir", missing, "--out", str(tmp_path / "hf")]),
              "no-model")
    one_error(capsys, export.main(["--format", "hf", "--outtype", "q8_0", "--model_dir", missing,
                                   "--out", str(tmp_path / "hf")]), "--outtype")
    one_error(capsys, knn.main(["tune", "--model_dir", missing, "--memory", str(tmp_path / "no-store")]),
              "no-store")

    def broken(*a, **k):
        raise TypeError("something inside broke")
    monkeypatch.setattr(export, "export", broken)
    one_error(capsys, export.main(["--format", "hf", "--model_dir", missing, "--out", str(tmp_path / "hf")]),
              "TypeError")
    with pytest.raises(TypeError):
        export.main(["--format", "hf", "--model_dir", missing, "--out", str(tmp_path / "hf"), "--debug"])
