"""Knowledge distillation (lm.distill): the loss, its gradient, the frozen teacher, the config
checks, and lm.train / lm.compress runs with a teacher."""
import json
import os

import numpy as np
import pytest
from helpers import tiny_model_folder

import minigrad as mg
from lm import compress as lc
from lm import train as lt
from lm.config import Config, ConfigError, DistillConfig, apply_overrides, validate
from lm.distill import KINDS, Divergence, Teacher, distill_loss, divergence, load_teacher, make_step_loss
from lm.loader import load_model
from lm.model import GPT
from minigrad.gradcheck import gradcheck, numerical_grad


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _logits(shape, seed, scale=2.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


def _grad(s, t, kind, T):
    x = mg.Tensor(s.copy(), requires_grad=True)
    loss = divergence(x, t, kind, T)
    loss.backward()
    return loss.item(), x.grad.numpy()


# --------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_zero_loss_and_gradient_when_student_equals_teacher(kind, T):
    s = _logits((2, 5, 11), 0)
    loss, g = _grad(s, s.copy(), kind, T)
    assert abs(loss) < 1e-12
    assert np.abs(g).max() < 1e-12


@pytest.mark.parametrize("T", [1.0, 0.5, 4.0])
def test_forward_kl_gradient_is_T_times_q_minus_p_over_N(T):
    B, S, V = 2, 3, 7
    s, t = _logits((B, S, V), 1), _logits((B, S, V), 2)
    _, g = _grad(s, t, "forward_kl", T)
    N = B * S
    expected = T * (_softmax(s / T) - _softmax(t / T)) / N
    np.testing.assert_allclose(g, expected, rtol=1e-12, atol=1e-15)
    sv = s.copy()
    num = numerical_grad(lambda: divergence(mg.Tensor(sv), t, "forward_kl", T).item(), sv)
    np.testing.assert_allclose(num, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_gradients_match_numerical(kind, T):
    s, t = _logits((2, 3, 6), 3), _logits((2, 3, 6), 4)
    assert gradcheck(lambda x: divergence(x, t, kind, T), [s], name=kind)


def test_values_are_the_divergences_summed_over_the_vocabulary_averaged_over_positions():
    s, t = _logits((4, 9), 5), _logits((4, 9), 6)
    T = 2.0
    p, q = _softmax(t / T), _softmax(s / T)
    m = (p + q) / 2
    kl = lambda a, b: (a * np.log(a / b)).sum(-1).mean()  # noqa: E731
    for kind, d in (("forward_kl", kl(p, q)), ("reverse_kl", kl(q, p)), ("jsd", 0.5 * kl(p, m) + 0.5 * kl(q, m))):
        assert divergence(mg.Tensor(s), t, kind, T).item() == pytest.approx(T * T * d, rel=1e-12)


def test_against_pytorch_kl_div_batchmean():
    torch = pytest.importorskip("torch", reason="PyTorch is the second oracle when installed")
    F = torch.nn.functional
    s, t = _logits((3, 4, 10), 7), _logits((3, 4, 10), 8)
    for T in (1.0, 2.0):
        ts = torch.tensor(s, requires_grad=True)
        ls = F.log_softmax(ts.reshape(-1, 10) / T, -1)
        lt = F.log_softmax(torch.tensor(t).reshape(-1, 10) / T, -1)
        refs = {"forward_kl": F.kl_div(ls, lt, reduction="batchmean", log_target=True),
                "reverse_kl": F.kl_div(lt, ls, reduction="batchmean", log_target=True)}
        lm = torch.logsumexp(torch.stack([ls, lt]), 0) - np.log(2.0)
        refs["jsd"] = 0.5 * F.kl_div(lm, lt, reduction="batchmean", log_target=True) + \
            0.5 * F.kl_div(lm, ls, reduction="batchmean", log_target=True)
        for kind, ref in refs.items():
            ref = ref * T * T
            (gt,) = torch.autograd.grad(ref, ts, retain_graph=True)
            loss, g = _grad(s, t, kind, T)
            assert loss == pytest.approx(ref.item(), rel=1e-12, abs=1e-15), kind
            np.testing.assert_allclose(g, gt.numpy(), rtol=1e-10, atol=1e-14, err_msg=kind)


def test_alpha_mixes_cross_entropy_and_the_soft_term():
    s, t = _logits((2, 3, 5), 9), _logits((2, 3, 5), 10)
    y = np.random.default_rng(0).integers(0, 5, (2, 3))
    for alpha in (0.0, 0.3, 1.0):
        x = mg.Tensor(s.copy(), requires_grad=True)
        ce = mg.functional.cross_entropy(x, y)
        loss, kd = distill_loss(x, t, ce, "forward_kl", 2.0, alpha)
        assert loss.item() == pytest.approx(alpha * ce.item() + (1 - alpha) * kd.item(), rel=1e-12)
        loss.backward()
        g_ce = (_softmax(s) - np.eye(5)[y]) / 6
        g_kd = 2.0 * (_softmax(s / 2.0) - _softmax(t / 2.0)) / 6
        np.testing.assert_allclose(x.grad.numpy(), alpha * g_ce + (1 - alpha) * g_kd, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_does_not_scale_with_sequence_length(kind):
    s, t = _logits((2, 4, 8), 11), _logits((2, 4, 8), 12)
    short = divergence(mg.Tensor(s), t, kind, 2.0).item()
    long = divergence(mg.Tensor(np.tile(s, (1, 8, 1))), np.tile(t, (1, 8, 1)), kind, 2.0).item()   # T x 8
    wide = divergence(mg.Tensor(np.tile(s, (5, 1, 1))), np.tile(t, (5, 1, 1)), kind, 2.0).item()   # B x 5
    assert long == pytest.approx(short, rel=1e-12)
    assert wide == pytest.approx(short, rel=1e-12)


def test_bad_kind_temperature_and_shapes():
    with pytest.raises(ValueError, match="kind"):
        Divergence("kl")
    with pytest.raises(ValueError, match="temperature"):
        Divergence("forward_kl", 0.0)
    with pytest.raises(ValueError, match="shape"):
        divergence(mg.Tensor(np.zeros((2, 3))), np.zeros((2, 4)))


def test_float32_student_float64_teacher_logits():
    s, t = _logits((3, 6), 13).astype(np.float32), _logits((3, 6), 14)
    x = mg.Tensor(s, requires_grad=True)
    loss = divergence(x, t, "reverse_kl", 1.5)
    loss.backward()
    assert loss.dtype == np.float32 and x.grad.dtype == np.float32


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("override, field", [
    ("distill.kind=kl", "distill.kind"), ("distill.temperature=0", "distill.temperature"),
    ("distill.temperature=-1", "distill.temperature"), ("distill.alpha=1.5", "distill.alpha"),
    ("distill.alpha=-0.1", "distill.alpha"), ("distill.teacher=/no/such/folder", "distill.teacher"),
    ("distill.teacher_device=tpu", "distill.teacher_device"),
])
def test_config_checks_name_the_field_and_value(override, field):
    cfg = apply_overrides(Config(), [override])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as e:
        validate(cfg)
    assert override.split("=", 1)[1] in str(e.value)


def test_config_defaults_mean_no_distillation():
    cfg = Config()
    validate(cfg)
    assert cfg.distill.teacher == "" and make_step_loss(cfg.distill, None) is lt.plain_loss


# --------------------------------------------------------------------------- the teacher
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    tiny_model_folder(root)       # root/model: a 2 x 64 char GPT, block 32; root/corpus.txt
    return root


def _student(root, **over):
    tok = load_model(str(root / "model"))[1]
    cfg = apply_overrides(Config(), ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
                                     f"model.vocab_size={tok.vocab_size}"])
    return GPT(cfg.model), tok


def test_teacher_gets_no_gradients_and_no_optimizer_state(root):
    student, tok = _student(root)
    teacher = load_teacher(DistillConfig(teacher=str(root / "model")), tok, 16, tok.vocab_size, log=lambda *a: None)
    before = {k: v.copy() for k, v in teacher.model.state_dict().items()}
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    opt = student.configure_optimizer(1e-2, 0.1, (0.9, 0.99))
    step_loss = make_step_loss(DistillConfig(alpha=0.0), teacher)
    rng = np.random.default_rng(0)
    x = rng.integers(0, tok.vocab_size, (3, 16))
    for _ in range(2):
        loss, terms = step_loss(student, x, np.roll(x, -1, 1))
        assert set(terms) == {"ce", "kd"} and loss.item() == pytest.approx(terms["kd"], rel=1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in teacher.model.parameters())
    assert all(p.grad is not None for p in student.parameters())
    state = opt.state_dict()["state"]
    assert len(state) == len(list(student.parameters()))    # one entry per student parameter, none for the teacher
    after = teacher.model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_teacher_runs_in_eval_mode_even_when_handed_a_training_model(root):
    model, tok = _student(root)
    model.config.dropout = 0.5
    from minigrad.nn.layers import Dropout
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = 0.5
    model.train()
    teacher = Teacher(model)
    assert not model.training
    x = np.random.default_rng(1).integers(0, tok.vocab_size, (2, 16))
    np.testing.assert_array_equal(teacher.logits(x, x), teacher.logits(x, x))   # no dropout: deterministic


def test_teacher_with_another_vocabulary_or_shorter_context_is_refused(root):
    from lm.tokenizer import build_tokenizer
    _, tok = _student(root)
    other = build_tokenizer("char", "xyz abc")
    with pytest.raises(ConfigError, match="another tokenizer"):
        load_teacher(DistillConfig(teacher=str(root / "model")), other, 16, other.vocab_size, log=lambda *a: None)
    with pytest.raises(ConfigError, match="output logits"):
        load_teacher(DistillConfig(teacher=str(root / "model")), tok, 16, tok.vocab_size + 3, log=lambda *a: None)
    with pytest.raises(ConfigError, match="context"):
        load_teacher(DistillConfig(teacher=str(root / "model")), tok, 64, tok.vocab_size, log=lambda *a: None)
    with pytest.raises(ConfigError, match="not a folder"):
        load_teacher(DistillConfig(teacher=str(root / "nope")), tok, 16, tok.vocab_size, log=lambda *a: None)


# --------------------------------------------------------------------------- end to end
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.batch_size=4",
        "train.eval_interval=6", "train.eval_iters=2", "train.sample_tokens=0", "train.warmup_iters=2",
        "--no_progress"]


def test_train_with_a_teacher_writes_the_terms(root, tmp_path):
    out = tmp_path / "student"
    rc = lt.main(["--data", str(root / "corpus.txt"), "--output_dir", str(out), "--max_iters", "12", *TINY,
                  f"distill.teacher={root / 'model'}", "distill.alpha=0.25", "distill.temperature=2"])
    assert rc == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in rows if r.get("kind") != "eval"]
    assert len(steps) == 12
    for r in steps:
        assert r["loss"] == pytest.approx(0.25 * r["ce"] + 0.75 * r["kd"], rel=1e-5)
        assert r["kd"] > 0
    assert all("kd" not in r for r in rows if r.get("kind") == "eval")   # evaluation: the student's CE only
    plain = tmp_path / "plain"
    assert lt.main(["--data", str(root / "corpus.txt"), "--output_dir", str(plain), "--max_iters", "2", *TINY]) == 0
    assert all("kd" not in json.loads(line) for line in open(plain / "metrics.jsonl"))


@pytest.mark.parametrize("extra, message", [
    (["distill.teacher={root}/missing"], "distill.teacher="),
    (["distill.teacher={root}/model", "data.tokenizer=bpe", "data.vocab_size=260"], "another tokenizer"),
    (["distill.teacher={root}/model", "distill.kind=cosine"], "distill.kind"),
    (["distill.teacher={root}/model", "distill.temperature=0"], "distill.temperature"),
    (["distill.teacher={root}/model", "distill.alpha=2"], "distill.alpha"),
])
def test_bad_distillation_input_is_one_error_line_and_no_folder(root, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    rc = lt.main(["--data", str(root / "corpus.txt"), "--output_dir", str(out), "--max_iters", "2", *TINY,
                  *[e.format(root=root) for e in extra]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not os.path.exists(out)


# --------------------------------------------------------------------------- pruning recovery
FAST = ["--eval_batches", "2", "--batch_size", "4", "--decode_tokens", "8", "--repeats", "1", "--no_progress"]


def test_recovery_fine_tune_distils_from_the_dense_model(root, tmp_path, monkeypatch):
    from lm import recover
    seen = []
    real = recover.distill_loss

    def spy(logits, teacher_logits, ce, kind, T, alpha):
        seen.append((kind, T, alpha, teacher_logits.shape))
        return real(logits, teacher_logits, ce, kind, T, alpha)

    monkeypatch.setattr(recover, "distill_loss", spy)
    base = ["--model_dir", str(root / "model"), "--data", str(root / "corpus.txt"), "--prune", "magnitude",
            "--sparsity", "0.5", "--finetune_iters", "3", *FAST]
    assert lc.main([*base, "--output_dir", str(tmp_path / "kd"), "--finetune_distill", "reverse_kl",
                    "--finetune_temperature", "2", "--finetune_alpha", "0.3"]) == 0
    assert len(seen) == 3 and seen[0][:3] == ("reverse_kl", 2.0, 0.3)
    rep = json.load(open(tmp_path / "kd" / "compress_report.json"))
    step = [s for s in rep["steps"] if s["name"].startswith("finetune")][0]
    assert "reverse_kl" in step["loss"] and str(root / "model") in step["loss"]
    seen.clear()
    assert lc.main([*base, "--output_dir", str(tmp_path / "ce"), "--finetune_distill", "none"]) == 0
    assert seen == []


def test_recovery_teacher_errors(root, tmp_path, capsys):
    base = ["--model_dir", str(root / "model"), "--data", str(root / "corpus.txt"), "--prune", "magnitude",
            "--sparsity", "0.5", "--finetune_iters", "2", *FAST]
    for flags, msg in ((["--finetune_teacher", str(tmp_path / "none")], "--finetune_teacher"),
                       (["--finetune_alpha", "1.5"], "--finetune_alpha"),
                       (["--finetune_temperature", "0"], "--finetune_temperature")):
        out = tmp_path / "out"
        assert lc.main([*base, "--output_dir", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err
        assert not os.path.exists(out)


def test_resume_keeps_distilling_without_the_teacher_given_again(root, tmp_path):
    out = tmp_path / "student"
    common = ["--data", str(root / "corpus.txt"), "--output_dir", str(out), *TINY]
    assert lt.main([*common, "--max_iters", "6", f"distill.teacher={root / 'model'}", "distill.kind=jsd"]) == 0
    assert lt.main([*common, "--max_iters", "9", "--resume"]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in rows if r.get("kind") != "eval"]
    assert [r["step"] for r in steps] == list(range(1, 10))
    assert all("kd" in r for r in steps)


@pytest.mark.parametrize("flags", [["--quantize", "q8_0"], ["--prune", "magnitude", "--sparsity", "0.5"]])
def test_a_quantized_or_pruned_folder_is_a_teacher(root, tmp_path, flags):
    out = tmp_path / "teacher"
    assert lc.main(["--model_dir", str(root / "model"), "--output_dir", str(out), "--no_report", "--no_progress",
                    *flags]) == 0
    student, tok = _student(root)
    teacher = load_teacher(DistillConfig(teacher=str(out)), tok, 16, tok.vocab_size, log=lambda *a: None)
    x = np.random.default_rng(2).integers(0, tok.vocab_size, (2, 16))
    loss, terms = make_step_loss(DistillConfig(), teacher)(student, x, x)
    loss.backward()
    assert teacher.logits(x, x).shape == (2, 16, tok.vocab_size) and terms["kd"] > 0
    assert all(p.grad is None for p in teacher.model.parameters())
