"""The phi3tune command line, run as users run it: `python -m phi3tune ...` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import rows_of_text, tiny_tuner

from phi3tune.cli import SUBCOMMANDS, apply_overrides, main, parse_assignment

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT)}
OPTIONS = {
    "train": ["--set", "--resume", "--overwrite", "CONFIG", "--model", "--data", "--output-dir"],
    "init": ["--template", "--model", "--data", "--overwrite", "PATH"],
    "generate": ["--max-new-tokens", "--temperature", "--top-p", "--system", "--quant", "--base-model"],
    "merge": ["--dtype", "--base-model", "--overwrite", "OUT_DIR"],
    "push": ["--public", "--message", "REPO_ID"],
    "demo": ["--output-dir", "--overwrite", "--quick", "--model", "--data", "--steps"],
}


def phi3tune(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "phi3tune", *args], capture_output=True, text=True, env=ENV,
                          input=stdin, timeout=300)


@pytest.fixture(scope="module")
def train_run(tiny_model, tmp_path_factory):
    """`phi3tune train` on a config written by FineTuner.save_config, with --set overrides."""
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_of_text(12)))
    config = tiny_tuner(tiny_model, tmp / "elsewhere", "missing.jsonl", max_steps=50).save_config(tmp / "run.yaml")
    proc = phi3tune("train", str(config), "--data", str(data), "--output-dir", str(tmp / "out"),  # flags beat the file
                    "--set", "training.max_steps=2", "--set", "adapter.r=4", "--set", "training.logging_steps=1")
    return tmp, config, proc


def test_every_subcommand_has_help_naming_its_options(capsys):
    assert set(OPTIONS) <= set(SUBCOMMANDS)
    for name, options in OPTIONS.items():
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0 and out.startswith(f"usage: phi3tune {name}"), out
        for option in [*options, "--quiet"]:
            assert option in out, (name, option)


def test_module_and_console_script_run():
    script = Path(sys.executable).with_name("phi3tune")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for cmd in ([sys.executable, "-m", "phi3tune", "--help"], [str(script), "demo", "--help"])]
    (top, err), (demo, err2) = (p.communicate(timeout=120) for p in procs)
    assert [p.returncode for p in procs] == [0, 0], (err, err2)
    assert top.startswith("usage: phi3tune") and all(cmd in top for cmd in OPTIONS)
    assert demo.startswith("usage: phi3tune demo") and "--quick" in demo


def test_train_from_config_with_overrides(train_run):
    tmp, _, proc = train_run
    assert proc.returncode == 0, proc.stderr
    adapter = tmp / "out" / "final_checkpoint"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4  # --set adapter.r=4
    steps = [json.loads(x)["step"] for x in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # --set training.max_steps=2 (the file says 50), logging_steps=1
    saved = yaml.safe_load((tmp / "out" / "phi3tune_config.yaml").read_text())
    assert saved["training"]["max_steps"] == 2 and saved["adapter"]["r"] == 4
    assert saved["data"]["source"] == str(tmp / "train.jsonl")  # --data and --output-dir override the file
    assert saved["training"]["output_dir"] == str(tmp / "out") and not (tmp / "elsewhere").exists()
    assert f"adapter: {adapter}" in proc.stdout and "loss curve:" in proc.stdout


def test_train_refuses_a_finished_run_and_overwrite_passes_through(train_run, capsys):
    tmp, config, _ = train_run
    out = ["--output-dir", str(tmp / "out"), "--data", str(tmp / "train.jsonl")]
    assert main(["train", str(config), *out, "--set", "training.max_steps=2"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("phi3tune train: error: ") and "Traceback" not in err
    assert "already holds a run" in err
    assert "pass --resume to continue it, --overwrite" in err and "=True" not in err  # the CLI's words
    assert main(["train", str(config), *out, "--set", "training.max_steps=1", "--set", "adapter.r=4",
                 "--overwrite", "-q"]) == 0
    steps = [json.loads(x) for x in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1]


def test_generate_prints_the_same_answer_as_the_api(train_run, capsys):
    from phi3tune import load_finetuned

    tmp, _, _ = train_run
    adapter = tmp / "out" / "final_checkpoint"
    expected = load_finetuned(adapter).generate("copy abc", max_new_tokens=6)
    assert main(["generate", str(adapter), "copy abc", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    piped = phi3tune("generate", str(adapter), "--max-new-tokens", "6", "-q", stdin="copy abc\nsay hi\n")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith(f">>> copy abc\n{expected}\n\n>>> say hi\n")


def test_merge_writes_a_model_and_refuses_4bit(train_run, capsys):
    tmp, _, _ = train_run
    adapter = tmp / "out" / "final_checkpoint"
    assert main(["merge", str(adapter), str(tmp / "merged"), "--dtype", "float32"]) == 0
    assert (tmp / "merged" / "model.safetensors").is_file()
    assert f"merged model: {tmp / 'merged'}" in capsys.readouterr().out
    assert main(["merge", str(adapter), str(tmp / "m4"), "--dtype", "nf4"]) == 1
    assert "never merges into a quantized base" in capsys.readouterr().err
    assert not (tmp / "m4").exists()


def test_push_offline_fails_fast(train_run):
    tmp, _, _ = train_run
    t = time.perf_counter()
    proc = phi3tune("push", str(tmp / "out" / "final_checkpoint"), "me/adapter")
    assert proc.returncode == 1 and "no model hub reachable" in proc.stderr
    assert time.perf_counter() - t < 10


def test_set_values_are_yaml_and_keys_nest():
    cfg = {"quant": None, "training": {"max_steps": 100}, "model": "m"}
    overrides = [parse_assignment(s) for s in ("training.max_steps=5", "training.learning_rate=1e-4",
                                               "adapter.target_modules=[qkv_proj, o_proj]", "quant.bits=8",
                                               "training.save_steps=null", "model=other/model")]
    apply_overrides(cfg, overrides)
    assert cfg == {"quant": {"bits": 8}, "model": "other/model",
                   "training": {"max_steps": 5, "learning_rate": 1e-4, "save_steps": None},
                   "adapter": {"target_modules": ["qkv_proj", "o_proj"]}}
    from phi3tune import ConfigError

    with pytest.raises(ConfigError, match="model is a value"):
        apply_overrides(cfg, [("model.x", 1)])


def test_bad_command_lines_exit_2_and_bad_configs_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as bad:
        main(["train", "x.yaml", "--set", "no_equals_sign"])
    assert bad.value.code == 2 and "KEY=VALUE" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("model: m\ntraining: {max_steps: 5}\n")
    assert main(["train", str(tmp_path / "c.yaml"), "--set", "training.max_stepz=3"]) == 1
    assert "max_stepz" in capsys.readouterr().err  # pydantic names the unknown field


def test_bench_estimate_prints_one_json_line(tiny_model, tmp_path):
    import json as _json
    import subprocess as _sp
    import sys as _sys

    from phi3tune import FineTuner

    cfg = FineTuner(tiny_model).data(source="data.jsonl").save_config(tmp_path / "run.yaml")
    proc = _sp.run([_sys.executable, "-m", "phi3tune", "bench", str(cfg), "--estimate",
                    "--set", "training.batch_size=8"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    est = _json.loads(proc.stdout.strip().splitlines()[-1])["estimate"]
    assert est["tokens_per_micro_batch"] == 8 * 512  # the override reached the estimate
    assert est["lora_params"] > 0 and est["total_gib"] > 0


# ---------------------------------------------------------------------------------------------- issue 27
HEAVY = {"torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"}


def imported_by(*argv: str, then: str = "") -> set[str]:
    """Top-level modules loaded after `phi3tune ARGV` parses (in a fresh interpreter), plus ``then``'s import."""
    code = (f"import sys\nfrom phi3tune.cli import main\ntry:\n    main({list(argv)!r})\nexcept SystemExit:\n"
            f"    pass\n{then}\nprint(sorted({{m.split('.')[0] for m in sys.modules}}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(eval(proc.stdout.strip().splitlines()[-1]))


def test_help_and_version_import_nothing_heavy():
    for argv in (["--help"], ["--version"], ["train", "--help"], ["init", "--help"], ["export", "--help"]):
        assert not imported_by(*argv) & HEAVY, argv
    assert "torch" in imported_by("--version", then="import phi3tune.finetuner")  # the control: it can fail


def test_unknown_option_prints_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as bad:
        main(["train", "run.yaml", "--bogus"])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and err.startswith("usage: phi3tune train") and "--bogus" in err


def test_train_without_a_file_is_the_readme_quickstart(tmp_path):
    from phi3tune import FineTuner
    from phi3tune.cli import build_parser, train_config

    args = build_parser().parse_args(["train", "--model", "m/x", "--data", "d.jsonl", "--set", "adapter.r=8"])
    got = FineTuner.from_config(train_config(args)).to_config()
    assert got == FineTuner("m/x").data(source="d.jsonl").adapter(r=8).to_config()
    defaults = FineTuner.from_config(train_config(build_parser().parse_args(["train"]))).to_config()
    assert defaults == FineTuner().to_config()
    assert defaults["model"] == "microsoft/Phi-3-mini-4k-instruct" and defaults["quant"]["bits"] == 4


def test_init_writes_every_field_with_its_help_and_round_trips(tmp_path, capsys):
    from phi3tune import AdapterSpec, DataSpec, FineTuner, QuantSpec, TrainSpec

    path = tmp_path / "run.yaml"
    assert main(["init", str(path), "--model", "m/x", "--data", "d.jsonl"]) == 0
    assert f"phi3tune train {path}" in capsys.readouterr().out
    text = path.read_text()
    assert FineTuner.from_config(path).to_config() == FineTuner("m/x").data(source="d.jsonl").to_config()
    lines = text.splitlines()
    for key in FineTuner().to_config():
        assert any(line.startswith(f"{key}:") for line in lines), key
    for spec in (QuantSpec, AdapterSpec, DataSpec, TrainSpec):
        for name, field in spec.model_fields.items():
            at = next(i for i, line in enumerate(lines) if line.startswith(f"  {name}:"))
            assert lines[at - 1].startswith("  # ") and field.description, (spec.__name__, name)  # its help above
    assert "# hub dataset name" in text and "(default: timdettmers/openassistant-guanaco)" in text
    # an existing file is kept; the message names the flag
    assert main(["init", str(path)]) == 1
    assert "--overwrite" in capsys.readouterr().err and path.read_text() == text
    assert main(["init", str(path), "--template", "qlora_phi3", "--overwrite"]) == 0
    from phi3tune.templates import path as template

    assert path.read_text() == template("qlora_phi3").read_text()


def test_errors_speak_python_in_the_api_and_flags_on_the_command_line():
    from phi3tune.errors import OVERWRITE, RESUME, OutputDirError, hint

    exc = OutputDirError("dir 'x' {holds} a run", hint("; pass {resume} or {overwrite} in {dir}", resume=RESUME,
                                                       overwrite=OVERWRITE, dir="'x'"))
    assert str(exc) == "dir 'x' {holds} a run; pass resume=True or overwrite=True in 'x'"
    assert exc.cli_message() == "dir 'x' {holds} a run; pass --resume or --overwrite in 'x'"
    assert OutputDirError("plain").cli_message() == "plain"


def test_a_missing_config_points_at_init_and_the_shipped_template(tmp_path, capsys):
    from phi3tune import ConfigError
    from phi3tune.files import read_config

    assert main(["train", str(tmp_path / "nope.yaml")]) == 1
    err = capsys.readouterr().err
    assert "phi3tune init PATH" in err and "--template qlora_phi3" in err and "save_config" not in err
    with pytest.raises(ConfigError) as api:
        read_config(tmp_path / "nope.yaml")
    assert "save_config(path)" in str(api.value) and "phi3tune.templates.path('qlora_phi3')" in str(api.value)
    import phi3tune.templates

    assert phi3tune.templates.path("qlora_phi3").is_file()  # the name the message gives works


def test_example_script_reports_our_error_as_one_line_with_its_own_flags(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")  # a previous run
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "qlora_phi3.py"), "--tiny", "--output-dir",
                           str(out)], capture_output=True, text=True, env=ENV, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith("qlora_phi3.py: error: ") and "--overwrite" in last and "overwrite=True" not in last
