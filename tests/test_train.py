import json
import subprocess
import sys

import pytest
import torch

from dsv3lite.train import TrainConfig, gamma_at, lr_at, main, mtp_lambda_at, train


def _cfg(corpus, out, **kw):
    base = dict(preset="tiny", steps=12, out=str(out), corpus=str(corpus), batch_size=4,
                seq_len=32, lr=3e-3, warmup_steps=3, log_interval=1, eval_interval=100,
                eval_batches=2, ckpt_interval=100, data_dir=str(out.parent / "data"))
    return TrainConfig(**{**base, **kw})


def _train_losses(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train"] for r in lines if "train" in r}


def test_resume_continues_exactly(text_corpus, tmp_path):
    straight = _cfg(text_corpus, tmp_path / "straight")
    train(straight, progress=False)
    split = _cfg(text_corpus, tmp_path / "split", stop_after=6)
    train(split, progress=False)  # steps 1-6, then a checkpoint
    split.stop_after = None
    train(split, resume=True, progress=False)  # steps 7-12 from the checkpoint
    a, b = _train_losses(tmp_path / "straight"), _train_losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a == b  # bit-identical losses on CPU
    assert a[12]["main"] < a[1]["main"]  # and it learned something


def test_schedules_follow_the_papers_shape():
    cfg = TrainConfig(steps=1000, lr=1e-3, warmup_steps=100, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-5) and lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(999, cfg) == pytest.approx(1e-4, rel=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(100, 999))
    assert mtp_lambda_at(0, cfg) == 0.3 and mtp_lambda_at(999, cfg) == 0.1
    assert mtp_lambda_at(675, cfg) == 0.3 and mtp_lambda_at(676, cfg) == 0.1  # 10T of 14.8T
    assert gamma_at(966, cfg) == 1e-3 and gamma_at(967, cfg) == 0.0  # last 500B of 14.8T


def test_v3_learning_rate_schedule_has_the_papers_phases():
    """[V3] §4.2 scaled to 14,800 steps, so that one step is 1B tokens: warmup, constant
    to 10T, cosine to 2.2e-5 at 14.3T, 2.2e-5 for 333B, then 7.3e-6 for the last 167B."""
    cfg = TrainConfig(steps=14800, lr=2.2e-4, warmup_steps=2, min_lr_ratio=0.1,
                      lr_schedule="v3")
    cfg.validate(cfg.model_args())
    lr = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert lr[0] == pytest.approx(1.1e-4) and lr[1] == pytest.approx(2.2e-4)
    assert lr[2] == lr[9999] == 2.2e-4  # constant until 10T
    assert lr[10000] == pytest.approx(2.2e-4) and lr[12150] == pytest.approx(1.21e-4)
    assert all(a >= b for a, b in zip(lr[10000:14300], lr[10001:14300]))
    assert lr[14299] == pytest.approx(2.2e-5, rel=1e-4)  # the cosine's end
    assert lr[14300] == lr[14632] == pytest.approx(2.2e-5)  # 333B at 2.2e-5
    assert lr[14633] == lr[14799] == pytest.approx(7.3e-6)  # the last 167B
    bad = TrainConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="lr_schedule='linear' is invalid"):
        bad.validate(bad.model_args())


def test_metrics_hold_losses_throughput_and_max_violation(text_corpus, tmp_path):
    result = train(_cfg(text_corpus, tmp_path / "run", steps=4, eval_interval=3,
                        log_interval=2), progress=False)
    lines = [json.loads(l) for l in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and "val" in lines[0]  # validation before training
    assert [r["step"] for r in lines if "val" in r] == [0, 3, 4]  # not tied to log steps
    last = lines[-1]
    assert set(last["train"]) == {"main", "mtp", "balance", "total"}
    assert last["tokens"] == 4 * 4 * 32 and last["tokens_per_s"] > 0
    assert len(last["max_vio"]) == len(result.model.moe_layers()) and "val" in last
    assert (result.out / "latest").read_text() == "step-000004"


@pytest.mark.parametrize("argv, message", [
    (["--preset", "huge"], "preset='huge' is invalid"),
    (["--resume", "{tmp}/nothing"], "no checkpoint in"),
    (["--corpus", "{tmp}/blank"], "holds no non-empty .txt"),
    (["--preset", "tiny", "--seq-len", "4096"], "seq_len=4096 is invalid"),
])
def test_cli_errors_are_one_clear_line(argv, message, tmp_path, capsys):
    (tmp_path / "blank").mkdir()
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "o"),
                                                     "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_cli_error_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dsv3lite.train", "--resume",
                           str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: no checkpoint")


def test_plot_run_draws_the_logged_values(text_corpus, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from dsv3lite.plot import plot_run, read_metrics

    result = train(_cfg(text_corpus, tmp_path / "run", steps=3, eval_interval=1),
                   progress=False)
    fig = plot_run(result.out)
    loss_ax, vio_ax = fig.axes
    train_line = loss_ax.get_lines()[0]
    records = [r for r in read_metrics(result.out) if "train" in r]
    assert list(train_line.get_ydata()) == [r["train"]["main"] for r in records]
    assert len(vio_ax.get_lines()) == len(result.model.moe_layers())


def test_train_and_generate_are_plain_functions_of_plain_modules(text_corpus, tmp_path):
    import types

    import dsv3lite.generate
    import dsv3lite.train
    from dsv3lite.generate import generate
    from dsv3lite.train import train

    # no module-class swap: the modules are ordinary modules, not callables
    for module in (dsv3lite.train, dsv3lite.generate):
        assert type(module) is types.ModuleType and not callable(module)
    result = train(_cfg(text_corpus, tmp_path / "run", steps=2), progress=False)
    out = generate(result.model, [1, 2, 3], 5, temperature=0)
    assert result.step == 2 and len(out.tokens) == 5


def test_train_accepts_a_prebuilt_model(text_corpus, tmp_path):
    from dsv3lite import ModelArgs, Transformer

    model = Transformer(ModelArgs.tiny(vocab_size=512, n_mtp_depth=0))
    before = model.embed.weight.detach().clone()
    result = train(_cfg(text_corpus, tmp_path / "run", steps=2), progress=False, model=model)
    assert result.model is model and not torch.equal(model.embed.weight, before)


def test_fp8_benchmark_results_are_found_and_plotted(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from dsv3lite.plot import latest_results, plot_fp8_gemm

    assert latest_results("fp8", tmp_path) is None
    row = dict(M=4096, N=4096, K=4096, b_tiles="128x128", fp8_triton_tflops=900.0,
               scaled_mm_tflops=1000.0, bf16_matmul_tflops=700.0)
    for day, device in [("20261101", "h100"), ("20261130", "h200")]:
        (tmp_path / f"fp8-{device}-{day}.json").write_text(json.dumps(
            {"device": device, "gemm": [row], "wgrad_gemm": [dict(row, b_tiles="1x128",
                                                                  scaled_mm_tflops=None)]}))
    newest = latest_results("fp8", tmp_path)
    assert newest.name == "fp8-h200-20261130.json"
    fig = plot_fp8_gemm(newest)
    ax = fig.axes[0]
    heights = sorted(round(p.get_height()) for p in ax.patches)
    assert heights == [0, 700, 700, 900, 900, 1000]  # 3 series x 2 shapes; no peer = 0
    assert "h200" in ax.get_title()
    with pytest.raises(ValueError, match="no 'gemm' rows"):
        plot_fp8_gemm({"device": "x"})


def test_slider_frames_embed_one_drawn_frame_per_value():
    """The kernel-free slider: every value drawn once, embedded as an image, no URL."""
    import matplotlib

    matplotlib.use("Agg")
    from dsv3lite.plot import slider_frames

    drawn = []

    def draw(value, ax):
        drawn.append(value)
        ax.plot([0, 1], [0, value])

    html = slider_frames(draw, [1.0, 2.0, 3.0], label="slope").data
    assert html.count("data:image/png;base64") == 3
    assert sorted(set(drawn)) == [1.0, 2.0, 3.0]
    assert "http://" not in html and "https://" not in html  # plays offline
    with pytest.raises(ValueError, match="values is empty"):
        slider_frames(draw, [], label="slope")
