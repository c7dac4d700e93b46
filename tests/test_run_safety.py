"""Nothing lost: phi3tune deletes or writes over only what its manifest says it wrote, and a signal after the last
optimizer step still leaves the final adapter."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from helpers import no_weights, resume_tuner, rows_of_text, tiny_tuner

from phi3tune import OutputDirError, TrainingInterrupted
from phi3tune import checkpoints as ckpt
from phi3tune.files import MANIFEST_NAME


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _users_dir(out: Path) -> dict[str, bytes]:
    """A directory that never held a phi3tune run: notes, another tool's runs/, a checkpoint-7/ of another tool."""
    (out / "runs" / "other_tool").mkdir(parents=True)
    (out / "runs" / "other_tool" / "events").write_text("theirs")
    (out / "notes.txt").write_text("mine")
    return _tree(out)


def test_resume_on_a_directory_of_someone_elses_files_deletes_nothing(tiny_model, tmp_path):
    out = tmp_path / "run"
    before = _users_dir(out)
    res = tiny_tuner(tiny_model, out, rows_of_text(4)).run(resume=True)  # nothing to resume: starts fresh
    after = _tree(out)
    assert {k: after[k] for k in before} == before  # every file of theirs, byte for byte
    written = set(json.loads((out / MANIFEST_NAME).read_text())["files"])
    assert "runs" not in written and "notes.txt" not in written and res.adapter_dir.name in written
    # overwrite deletes exactly the manifest's entries: theirs stay, ours go (negative control: ours existed)
    tiny_tuner(tiny_model, out, rows_of_text(4)).run(overwrite=True)
    assert {k: v for k, v in _tree(out).items() if k in before} == before


@pytest.mark.parametrize("resume", [True, False])
def test_a_checkpoint_dir_phi3tune_did_not_write_is_refused_not_replaced(tiny_model, tmp_path, monkeypatch, resume):
    out = tmp_path / "run"
    _users_dir(out)
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "model.bin").write_text("another tool's checkpoint")
    before = _tree(out)
    no_weights(monkeypatch)
    with pytest.raises(OutputDirError, match=r"\['checkpoint-7'\], which phi3tune did not write") as err:
        tiny_tuner(tiny_model, out, rows_of_text(4)).run(resume=resume, overwrite=not resume)
    assert MANIFEST_NAME in str(err.value) and "Move them away" in str(err.value)
    assert _tree(out) == before


def test_an_edited_manifest_cannot_reach_outside_output_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep")
    (out / MANIFEST_NAME).write_text(json.dumps({"files": ["../precious.txt", "/etc", ".."], "fingerprints": {}}))
    ckpt.clear_run(out)
    assert victim.read_text() == "keep"


def test_a_partial_save_is_recognised_by_mkdtemps_name_only(tmp_path):
    (tmp_path / ".final.abcd1234").mkdir()  # what atomic_dir leaves when killed
    (tmp_path / ".final.my-own-notes").mkdir()  # a user's hidden dir of a similar name
    assert [p.name for p in ckpt.remove_partial(tmp_path)] == [".final.abcd1234"]
    assert (tmp_path / ".final.my-own-notes").is_dir()


def _signal_during(monkeypatch: pytest.MonkeyPatch, target: str, sig: signal.Signals) -> None:
    module, name = target.rsplit(".", 1)
    import importlib

    owner = importlib.import_module(module)
    real = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        signal.raise_signal(sig)  # arrives in the middle of the final save / eval
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize(("target", "sig"), [("phi3tune.pipeline.save_final", signal.SIGINT),
                                             ("phi3tune.plot.plot_history", signal.SIGTERM)])
def test_a_signal_during_the_final_save_still_saves_the_final_adapter(tiny_model, tmp_path, monkeypatch, target,
                                                                       sig):
    out = tmp_path / "run"
    _signal_during(monkeypatch, target, sig)
    with pytest.raises(TrainingInterrupted, match=rf"^{sig.name}: arrived after the last step \(2 of 2\)") as err:
        tiny_tuner(tiny_model, out, rows_of_text(8), max_steps=2).run()
    assert err.value.checkpoint == str(out / ckpt.FINAL_DIR)
    assert (out / ckpt.FINAL_DIR / "adapter_model.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN


def test_a_signal_during_the_final_eval_still_saves_the_final_adapter(tiny_model, tmp_path, monkeypatch):
    from phi3tune.loop import Trainer

    real = Trainer.evaluate

    def evaluate(self: Trainer) -> dict[str, float]:
        if self.pos.step == self.total_steps:
            signal.raise_signal(signal.SIGINT)
        return real(self)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="after the last step") as err:
        resume_tuner(tiny_model, out, max_steps=2, save_strategy="no").run()
    assert (out / ckpt.FINAL_DIR / "adapter_model.safetensors").is_file() and err.value.checkpoint
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h for h in lines if "eval_loss" in h][-1]["step"] == 2  # the final eval ran to the end
