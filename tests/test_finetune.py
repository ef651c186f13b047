"""Fine-tuning through lm.train: train.init_from, the lora section, adapter folders, --merge, --resume."""
import json
import os

import numpy as np
import pytest

import minigrad as mg
from lm import generate as gen
from lm import train as lt
from lm.loader import ModelDirError, detect_kind, load_model
from minigrad.io import load_file
from minigrad.nn.lora import LoRALinear, has_lora

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
        "train.batch_size=4", "train.eval_iters=2", "train.warmup_iters=2", "train.progress=false",
        "train.sample_tokens=0", "train.log_interval=5"]
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]


def write_corpus(path, words, n=300, seed=0):
    rng = np.random.default_rng(seed)
    path.write_text("\n".join(" ".join(rng.choice(words, size=7)) + "." for _ in range(n)))
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny pretrained model folder, and a second text (same characters, other word statistics)."""
    d = tmp_path_factory.mktemp("ft")
    pre = write_corpus(d / "pre.txt", WORDS)
    new = write_corpus(d / "new.txt", ["home", "far", "away", "dog"], seed=1)
    out = d / "base"
    assert lt.main(["--data", pre, "--output_dir", str(out), "--max_iters", "30", "--seed", "1", *TINY,
                    f"data.cache_dir={d}/cache"]) == 0
    return {"dir": str(out / "model"), "new": new, "cache": f"data.cache_dir={d}/cache", "root": d}


def ft_args(base, out, *extra, iters=20):
    return ["--data", base["new"], "--output_dir", str(out), "--max_iters", str(iters), "--seed", "2",
            *TINY, base["cache"], f"train.init_from={base['dir']}", *extra]


def logits(model, seed=0):
    x = np.random.default_rng(seed).integers(0, model.config.vocab_size, (2, 16))
    with mg.no_grad():
        return model.eval()(x, x)[0].numpy()


def test_lora_run_writes_adapter_and_base_reference_then_generates(base, tmp_path, capsys):
    out = tmp_path / "lora"
    assert lt.main(ft_args(base, out, "lora.r=4", "lora.alpha=8", "train.eval_interval=10",
                           "train.log_memory=true")) == 0
    log = capsys.readouterr().out
    assert "trainable params:" in log and "|| all params:" in log
    md = out / "model"
    assert sorted(os.listdir(md)) == ["adapter.safetensors", "config.json", "tokenizer.json"]
    conf = json.loads((md / "config.json").read_text())
    assert conf["lora"]["r"] == 4 and conf["base"]["path"] == os.path.abspath(base["dir"])
    assert len(conf["base"]["sha256"]) == 64
    # the adapter file holds A and B only, far smaller than the model
    arrays = load_file(str(md / "adapter.safetensors"))
    assert arrays and all(".lora_" in k for k in arrays)
    assert os.path.getsize(md / "adapter.safetensors") < 0.5 * os.path.getsize(os.path.join(base["dir"], "model.safetensors"))
    # loader: base + adapter; the adapter learnt something, the base weights are untouched
    assert detect_kind(str(md)) == "lora"
    model, _ = load_model(str(md))
    assert has_lora(model)
    base_model, _ = load_model(base["dir"])
    assert not np.allclose(logits(model), logits(base_model))
    for n, p in base_model.named_parameters():
        m = dict(model.named_parameters())
        key = n if n in m else n.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert np.array_equal(m[key].data, p.data), n
    # memory accounting split trainable / frozen in the metrics
    rec = [json.loads(line) for line in open(out / "metrics.jsonl") if '"mem_' in line][-1]
    assert rec["mem_gradients_frozen"] == 0 and rec["mem_optimizer_frozen"] == 0
    assert rec["mem_parameters_frozen"] > 5 * rec["mem_parameters_trainable"] > 0
    assert rec["mem_optimizer_trainable"] == 2 * rec["mem_parameters_trainable"]
    # and generation opens the adapter folder
    assert gen.main(["--model_dir", str(md), "--prompt", "the", "--max_new_tokens", "8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_merge_flag_writes_a_stand_alone_model_equal_to_base_plus_adapter(base, tmp_path):
    a, b = tmp_path / "adapter", tmp_path / "merged"
    common = ["lora.r=4", "lora.targets=[c_attn, attn.c_proj]", "train.eval_interval=10"]
    assert lt.main(ft_args(base, a, *common)) == 0
    assert lt.main(ft_args(base, b, *common, "--merge")) == 0
    assert "model.safetensors" in os.listdir(b / "model") and "adapter.safetensors" not in os.listdir(b / "model")
    assert detect_kind(str(b / "model")) == "minigrad"
    merged, _ = load_model(str(b / "model"))
    adapted, _ = load_model(str(a / "model"))
    assert not has_lora(merged)
    la, lm_ = logits(adapted), logits(merged)
    assert np.abs(la - lm_).max() / np.abs(la).max() < 1e-5


def test_full_fine_tuning_from_a_model(base, tmp_path):
    out = tmp_path / "full"
    args = ft_args(base, out, "train.eval_interval=10", "train.learning_rate=3e-3")
    args.remove(f"train.init_from={base['dir']}")
    args = ["--init_from", base["dir"], *args]   # the flag form
    assert lt.main(args) == 0
    model, _ = load_model(str(out / "model"))
    base_model, _ = load_model(base["dir"])
    assert not has_lora(model)
    changed = [n for (n, p), (_, q) in zip(model.named_parameters(), base_model.named_parameters())
               if not np.array_equal(p.data, q.data)]
    assert len(changed) == len(list(base_model.parameters()))   # every weight trained
    start = json.loads(open(out / "metrics.jsonl").readline())
    assert start["kind"] == "eval" and start["val_loss"] < 3.0   # started from the trained model, not ln(V)


def test_resume_of_an_adapter_run_is_bitwise_the_uninterrupted_run(base, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["lora.r=4", "lora.dropout=0.1", "train.eval_interval=10"]
    assert lt.main(ft_args(base, full, *common, iters=30)) == 0

    def crash(step, loss):
        if step == 25:
            raise KeyboardInterrupt
    args = lt.build_parser().parse_args(ft_args(base, part, *common, iters=30))
    with pytest.raises(KeyboardInterrupt):
        lt.train(lt.resolve_config(args), str(part), callback=crash)
    ck = load_file(str(part / "checkpoint.safetensors"))
    assert all(".lora_" in k for k in ck if k.startswith("model."))   # the frozen base is not copied
    assert lt.main(ft_args(base, part, *common, "--resume", iters=30)) == 0
    a = load_file(str(full / "checkpoint.safetensors"))
    b = load_file(str(part / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def error_of(capsys, argv, main=lt.main):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1
    return err


def test_bad_input_is_one_clear_error(base, tmp_path, capsys):
    out = tmp_path / "x"
    assert "lora.r must be a positive integer" in error_of(capsys, ft_args(base, out, "lora.r=0"))
    assert "lora.r must be a positive integer" in error_of(capsys, ft_args(base, out, "lora.r=-1"))
    err = error_of(capsys, ft_args(base, out, "lora.r=4", "lora.targets=[q_proj]"))
    assert "'q_proj' matches no module" in err and "c_attn" in err
    assert "needs train.init_from" in error_of(capsys, ["--output_dir", str(out), *TINY, "lora.r=4"])
    assert "is not a folder" in error_of(capsys, ft_args(base, out, "train.init_from=/nonexistent/m"))
    # new text with characters the base has no token for
    odd = tmp_path / "odd.txt"
    odd.write_text("the cat sat on the mat$ with a ~ zebra!\n" * 50)
    err = error_of(capsys, ["--data", str(odd), *ft_args(base, out)[2:]])
    assert "'$'" in err and "'~'" in err and "'z'" in err and "remove them" in err
    assert not out.exists()   # every one of these is found before the output folder is made


def test_resume_takes_the_model_section_from_the_base_not_the_user(base, tmp_path, capsys):
    """A config whose model values the base overrides resumes with the same command; the
    lora settings and train.init_from are the checkpoint's (a different one is refused)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  n_layer: 4\n  n_embd: 64\n")
    out = tmp_path / "run"
    args = ["--config", str(cfg), *(a for a in ft_args(base, out, "lora.r=2", "train.eval_interval=5", iters=5)
                                    if not a.startswith("model."))]
    assert lt.main(args) == 0
    args[args.index("--max_iters") + 1] = "10"
    assert lt.main(args + ["--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 10
    assert "lora.r=3 (the checkpoint has 2)" in error_of(capsys, args + ["--resume", "lora.r=3"])
    other = [a if a != f"train.init_from={base['dir']}" else f"train.init_from={out / 'model'}" for a in args]
    assert "train.init_from=" in error_of(capsys, other + ["--resume"])


def test_adapter_on_a_changed_or_wrong_base_is_a_clear_error(base, tmp_path, capsys):
    import shutil
    out = tmp_path / "lora"
    assert lt.main(ft_args(base, out, "lora.r=4")) == 0
    md = out / "model"
    # a copy of the base that is then changed: the hash no longer matches
    copy = tmp_path / "base_copy"
    shutil.copytree(base["dir"], copy)
    conf = json.loads((md / "config.json").read_text())
    conf["base"]["path"] = str(copy)
    (md / "config.json").write_text(json.dumps(conf))
    load_model(str(md))   # an identical copy is fine
    w = load_file(str(copy / "model.safetensors"))
    w["transformer.h.0.mlp.c_fc.weight"] = w["transformer.h.0.mlp.c_fc.weight"] + 1e-3
    mg.io.save_file(w, str(copy / "model.safetensors"), {"format": "minigrad-gpt"})
    with pytest.raises(ModelDirError, match="has changed since the adapter was trained"):
        load_model(str(md))
    err = error_of(capsys, ["--model_dir", str(md), "--prompt", "the", "--max_new_tokens", "3"], gen.main)
    assert "has changed" in err
    # a wider base under the same adapter: shapes do not fit
    wide = tmp_path / "wide"
    assert lt.main(["--data", base["new"], "--output_dir", str(wide), "--max_iters", "2", *TINY,
                    "model.n_embd=48", base["cache"]]) == 0
    conf["base"] = {"path": str(wide / "model"), "sha256": __import__("lm.finetune", fromlist=["x"]).weights_sha256(
        str(wide / "model"))}
    (md / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ModelDirError, match="different base model"):
        load_model(str(md))
    # a base that is gone
    conf["base"] = {"path": str(tmp_path / "gone"), "sha256": "0" * 64}
    (md / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ModelDirError, match="not there any more"):
        load_model(str(md))


def test_resume_refuses_a_changed_base(base, tmp_path, capsys):
    import shutil
    copy = tmp_path / "b"
    shutil.copytree(base["dir"], copy)
    out = tmp_path / "run"
    args = ["--data", base["new"], "--output_dir", str(out), "--max_iters", "10", "--seed", "2", *TINY,
            base["cache"], f"train.init_from={copy}", "lora.r=2", "train.eval_interval=5"]
    assert lt.main(args) == 0
    w = load_file(str(copy / "model.safetensors"))
    w["transformer.wte.weight"] = w["transformer.wte.weight"] * 1.01
    mg.io.save_file(w, str(copy / "model.safetensors"))
    args[5] = "20"
    assert "has changed since this run started" in error_of(capsys, args + ["--resume"])


@pytest.fixture(scope="module")
def base64(base):
    """A 64-wide base: NF4 packs blocks of 64 weights along each row."""
    out = base["root"] / "base64"
    assert lt.main(["--data", str(base["root"] / "pre.txt"), "--output_dir", str(out), "--max_iters", "30",
                    "--seed", "1", *TINY, "model.n_embd=64", base["cache"]]) == 0
    return {**base, "dir": str(out / "model")}


def test_qlora_run_merge_and_compress_merge_lora(base64, tmp_path, capsys):
    from lm import compress
    from minigrad.nn.quantized import QuantLinear
    a, b = tmp_path / "qlora", tmp_path / "qlora-merged"
    common = ["lora.r=4", "lora.quantize_base=nf4", "train.eval_interval=10", "train.log_memory=true"]
    assert lt.main(ft_args(base64, a, *common)) == 0
    conf = json.loads((a / "model" / "config.json").read_text())
    assert conf["lora"]["quantize_base"] == "nf4"
    adapted, _ = load_model(str(a / "model"))
    wrapped = [m for _, m in adapted.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(isinstance(m.base_layer, QuantLinear) for m in wrapped)
    rec = [json.loads(line) for line in open(a / "metrics.jsonl") if '"mem_' in line][-1]
    full_bytes = 4 * sum(p.size for p in load_model(base64["dir"])[0].parameters())
    assert rec["mem_parameters_frozen"] < 0.35 * full_bytes      # the base is packed (4-bit codes + scales)
    assert rec["mem_optimizer_frozen"] == 0 and rec["mem_gradients_frozen"] == 0
    assert gen.main(["--model_dir", str(a / "model"), "--prompt", "the", "--max_new_tokens", "5"]) == 0
    # --merge: a float model equal to (dequantized base + adapter)
    assert lt.main(ft_args(base64, b, *common, "--merge")) == 0
    merged, _ = load_model(str(b / "model"))
    assert detect_kind(str(b / "model")) == "minigrad" and not has_lora(merged)
    la, lb = logits(adapted), logits(merged)
    assert np.abs(la - lb).max() / np.abs(la).max() < 1e-5
    # lm.compress --merge_lora does the same from the adapter folder
    c = tmp_path / "compressed"
    assert compress.main(["--model_dir", str(a / "model"), "--output_dir", str(c), "--merge_lora",
                          "--no_report"]) == 0
    assert detect_kind(str(c)) == "minigrad"
    lc = logits(load_model(str(c))[0])
    assert np.abs(la - lc).max() / np.abs(la).max() < 1e-5
    capsys.readouterr()
    err = error_of(capsys, ["--model_dir", base64["dir"], "--output_dir", str(tmp_path / "n"), "--merge_lora"],
                   compress.main)
    assert "not a LoRA adapter run" in err


def test_lora_on_a_base_quantized_by_lm_compress(base64, tmp_path):
    """init_from an lm.compress q4_0 folder: adapters sit on its QuantLinears; --merge dequantizes."""
    from lm import compress
    q = tmp_path / "q4"
    assert compress.main(["--model_dir", base64["dir"], "--output_dir", str(q), "--quantize", "q4_0",
                          "--no_report", "--no_progress"]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["lora.r=2", "train.eval_interval=10"]
    args = ft_args(base64, a, *common, iters=10)
    args[args.index(f"train.init_from={base64['dir']}")] = f"train.init_from={q}"
    assert lt.main(args) == 0
    args_b = [x if x != str(a) else str(b) for x in args] + ["--merge"]
    assert lt.main(args_b) == 0
    la, lb = logits(load_model(str(a / "model"))[0]), logits(load_model(str(b / "model"))[0])
    assert np.abs(la - lb).max() / np.abs(la).max() < 1e-5
