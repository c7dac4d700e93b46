"""What a run shows and draws: eval and progress lines on the console, no third-party warnings, loss.png."""

from __future__ import annotations

import warnings

import pytest
from helpers import rows_of_text, tiny_tuner

from phi3tune import load_finetuned

ROWS = rows_of_text(12, seed=5)


def lines_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "phi3tune"]


def shown(caught: list[warnings.WarningMessage]) -> list[str]:
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)  # Python's defaults
    return [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
            if not issubclass(w.category, hidden)]


def test_a_plain_run_and_load_say_the_eval_loss_and_warn_nothing(tiny_model, tmp_path, caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")  # pyproject's filterwarnings (FutureWarning ignored) does not apply here
        res = (tiny_tuner(tiny_model, tmp_path / "run", ROWS, max_steps=2, eval_steps=1, progress_bar=True)
               .data(eval_fraction=0.25).run())
        ft = load_finetuned(res.adapter_dir)
        ft.generate("copy ab", max_new_tokens=2)
    assert not shown(caught), shown(caught)
    evals = [h for h in res.history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 1, 2]  # the held-out loss before the first step, then each eval
    said = lines_of(caplog)
    for h in evals:  # with a progress bar too, each eval is a line
        assert f"step {h['step']}: eval loss {h['eval_loss']:.4f}, perplexity {h['eval_perplexity']:.2f}" in said
    assert not [s for s in said if "/2  loss" in s]  # the bar shows the train loss; no progress lines with it
    if (res.output_dir / "loss.png").is_file():  # matplotlib installed: the run drew the figure loss_figure builds
        from phi3tune.plot import loss_figure

        fig = loss_figure(res.history, "run")
        assert fig is not None and fig.axes[0].get_yscale() == "log"
        assert fig.texts[0].get_text().startswith(f"run\nstep 2: train loss {res.metrics['train_loss']:.4f}, eval ")


def test_without_a_bar_each_log_step_is_a_progress_line(tiny_model, tmp_path, caplog):
    res = tiny_tuner(tiny_model, tmp_path / "run", ROWS, max_steps=3, logging_steps=1).run()
    progress = [s for s in lines_of(caplog) if s.startswith("step ") and "tokens/s" in s]
    assert len(progress) == 3, lines_of(caplog)
    for line, h in zip(progress, [h for h in res.history if "loss" in h]):
        assert line.startswith(f"step {h['step']}/3  loss {h['loss']:.4f}  lr {h['lr']:.2e}  ") and " ETA " in line
    assert progress[-1].endswith("ETA 00:00:00")
    assert not [h for h in res.history if "eval_loss" in h]  # no eval data: no eval at step 0 either


def test_peft_still_warns_without_the_narrow_filter(tiny_model):
    """The control: PEFT's FutureWarning is real (so the silence above is the filter's doing); when a PEFT release
    stops reading is_gradient_checkpointing this fails, and logs.peft_wrapping can go."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj"]))
    assert any("is_gradient_checkpointing" in w for w in shown(caught)), shown(caught)


# ---------------------------------------------------------------------------------------------- loss.png
HISTORY = [{"step": 0, "eval_loss": 3.2, "eval_perplexity": 24.5},
           *({"step": s, "loss": 3.0 / s, "lr": 2e-4 * (1 - s / 40)} for s in range(1, 41)),
           {"step": 20, "eval_loss": 0.3, "eval_perplexity": 1.35}, {"step": 40, "eval_loss": 0.09,
                                                                       "eval_perplexity": 1.094}]


def test_loss_figure_is_log_scale_with_an_lr_panel_and_a_titled_summary(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from phi3tune.plot import loss_figure, plot_history

    fig = loss_figure(HISTORY, "my-run")
    assert fig is not None
    loss_ax, lr_ax = fig.axes
    assert loss_ax.get_yscale() == "log" and lr_ax.get_yscale() == "linear"
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train loss", "eval loss"]
    eval_x = list(loss_ax.get_lines()[1].get_xdata())
    assert eval_x == [0, 20, 40]  # eval from step 0
    assert list(lr_ax.get_lines()[0].get_ydata()) == [h["lr"] for h in HISTORY if "lr" in h]
    assert lr_ax.get_ylabel() == "learning rate" and lr_ax.get_xlabel() == "optimizer step"
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    labels = {t.get_text() for t in loss_ax.get_yticklabels(which="both")} - {""}
    assert {"0.1", "1"} <= labels and not any("e" in t or "^" in t for t in labels), labels  # plain numbers
    title = fig.texts[0].get_text()  # suptitle
    assert title == "my-run\nstep 40: train loss 0.0750, eval loss 0.0900 (perplexity 1.09)"
    (tmp_path / "my-run").mkdir()
    path = plot_history(HISTORY, tmp_path / "my-run" / "loss.png")  # the title names the run directory
    assert path is not None and imread(path).shape == (500, 700, 4)  # 7 x 5 in at 100 dpi
