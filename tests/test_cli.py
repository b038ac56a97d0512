"""The command line as a user meets it: no arguments, --help, --print_config, the paper's config names, override
errors that name the override, scalars for lists, deprecated keys, and a failed run that leaves its folder usable."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion.cli import parse_args
from diffusion.config import (
    SCHEMAS, ClassifierConfig, EditConfig, EmbedsConfig, LoraTrainConfig, describe, load_config,
)
from diffusion.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {
    "kandinsky_eval.py": "edit", "kandinsky_lora_train.py": "lora", "scripts/save_embeds.py": "embeds",
    "scripts/train_classifiers.py": "classifier", "scripts/train_mini_model.py": "mini",
}


@pytest.mark.parametrize("script,kind", list(ENTRY_POINTS.items()))
def test_no_arguments_prints_what_it_does_the_configs_and_an_example(script, kind):
    proc = subprocess.run([sys.executable, script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    out = proc.stdout
    first_line = (REPO / script).read_text().split('"""')[1].strip().splitlines()[0]
    assert first_line in out  # what it does
    for path in sorted((REPO / "configs" / kind).glob("*.yaml")):
        assert f"configs/{kind}/{path.name}" in out  # the configs that exist
    assert f"python {script} --config_path configs/{kind}/" in out and "Traceback" not in proc.stderr


def test_help_lists_every_key_with_type_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as code:
        parse_args(EditConfig, ["--help"])
    assert code.value.code == 0
    text = capsys.readouterr().out
    for key, tp, default, meaning in describe(EditConfig):
        assert f"  {key} ({tp}; default {default})" in text and meaning in text
    assert "class_mean_images (int or null; default null)" in text
    assert "search (first_flip | bisect | fixed | sweep; default 'first_flip')" in text


@pytest.mark.parametrize("schema", list(SCHEMAS.values()))
def test_every_key_of_every_schema_has_a_meaning(schema):
    missing = [key for key, _, _, meaning in describe(schema) if not meaning]
    assert not missing


def test_print_config_prints_the_merged_config_and_exits(capsys):
    with pytest.raises(SystemExit) as code:
        parse_args(LoraTrainConfig, ["--config_path", "configs/lora/demo.yaml", "--print_config", "rank=8"])
    assert code.value.code == 0
    printed = capsys.readouterr().out
    assert "rank: 8" in printed and "learning_rate:" in printed  # the override, the file and the defaults
    assert load_config(LoraTrainConfig, "configs/lora/demo.yaml", ["rank=8"]).rank == 8


@pytest.mark.parametrize("kind,schema", [("edit", EditConfig), ("lora", LoraTrainConfig), ("embeds", EmbedsConfig),
                                         ("classifier", ClassifierConfig)])
def test_the_papers_retina_name_resolves_to_the_kermany_configs(kind, schema):
    cfg = load_config(schema, f"configs/{kind}/retina.yaml")
    assert cfg.data.name == "kermany"


def test_a_missing_config_lists_the_configs_and_the_closest_name():
    with pytest.raises(ConfigError) as err:
        load_config(EditConfig, "configs/edit/butterfli.yaml")
    msg = str(err.value)
    assert "Did you mean configs/edit/butterfly.yaml?" in msg and "kermany.yaml" in msg and "demo.yaml" in msg


def test_override_errors_name_the_override_not_the_file():
    with pytest.raises(ConfigError) as err:
        load_config(EditConfig, "configs/edit/demo.yaml", ["t_skip=1.5"])
    assert str(err.value).startswith("command-line override 't_skip=1.5': 't_skip' = 1.5 must be <= 1")
    with pytest.raises(ConfigError) as err:
        load_config(EditConfig, "configs/edit/demo.yaml", ["batch_size=many"])
    assert "command-line override 'batch_size=many'" in str(err.value) and "expected int" in str(err.value)
    bad = _write(REPO / "configs/edit/demo.yaml", "inversion_guidance: -2\n")
    with pytest.raises(ConfigError) as err:  # a bad value in the file is blamed on the file
        load_config(EditConfig, str(bad), ["data.num_samples=3"])
    assert str(err.value).startswith(f"{bad}: 'inversion_guidance' = -2.0 must be >= 0")
    twice = _write(REPO / "configs/edit/demo.yaml", "batch_size: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML.*duplicate key.*batch_size"):
        load_config(EditConfig, str(twice))


def _write(base: Path, extra: str) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "bad.yaml"
    path.write_text(base.read_text() + extra)
    return path


def test_unknown_keys_are_named_by_their_full_dotted_path():
    with pytest.raises(ConfigError) as err:
        load_config(EditConfig, "configs/edit/demo.yaml", ["data.on_bad=skip"])
    msg = str(err.value)
    assert "Did you mean: on_bad_file?" in msg and "data.on_bad_file" in msg and "data.root" in msg


def test_a_scalar_where_a_list_is_expected_is_a_one_element_list():
    cfg = load_config(EditConfig, "configs/edit/demo.yaml", ["eta=2", "t_skips=0.9", "views.strip_etas=1"])
    assert cfg.eta == [2.0] and cfg.t_skips == [0.9] and cfg.views.strip_etas == [1.0]


def test_a_deprecated_key_still_works_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        cfg = load_config(EditConfig, "configs/edit/demo.yaml", ["num_images=5"])
    assert cfg.class_mean_images == 5
    assert "'num_images' is deprecated" in caplog.text and "class_mean_images" in caplog.text
    both = _write(REPO / "configs/edit/demo.yaml", "num_images: 5\nclass_mean_images: 6\n")
    with pytest.raises(ConfigError, match="keep only 'class_mean_images'"):  # one file setting both: ambiguous
        load_config(EditConfig, str(both))


def test_a_run_that_failed_before_its_first_result_accepts_the_corrected_config(tmp_path, tiny_model, blob_data):
    import diffusion.edit.run as edit_run

    base = [f"output_dir={tmp_path / 'run'}", f"embeds_dir={tmp_path / 'embeds'}", "compute_missing_embeds=true",
            f"model.decoder={tiny_model / 'decoder'}", f"model.prior={tiny_model / 'prior'}", "model.device=cpu",
            f"data.root={blob_data}", "num_inference_steps=4", "search=fixed", "lpips=false", "views.enabled=false",
            "data.num_samples=1"]
    with pytest.raises(ConfigError, match="no pytorch_lora_weights"):  # a typo in lora.path
        edit_run.run_edits(load_config(EditConfig, None, base + [f"lora.path={tmp_path / 'lroa'}"]))
    summary = edit_run.run_edits(load_config(EditConfig, None, base))  # the corrected rerun, same folder
    assert summary["n_rows"] == 2
    with pytest.raises(ConfigError, match="other values of guidance_scale"):  # now it holds results: never mixed
        edit_run.run_edits(load_config(EditConfig, None, base + ["guidance_scale=2"]))
