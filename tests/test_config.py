"""Configs: every YAML loads; unknown keys, wrong types and bad values stop the run with a message naming the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion.config import SCHEMAS, EditConfig, EmbedsConfig, load_config
from diffusion.errors import ConfigError
from diffusion.runinfo import stamp_run_dir

REPO = Path(__file__).resolve().parent.parent
ALL_CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs_for_every_entry_point():
    folders = {p.parent.name for p in ALL_CONFIGS}
    assert {"edit", "lora", "embeds", "classifier"} <= folders


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_loads_against_its_schema(path):
    schema = SCHEMAS[path.parent.name]
    cfg = load_config(schema, str(path))
    assert isinstance(cfg, schema)
    assert cfg.output_dir


def test_unknown_top_level_key_names_it_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(EditConfig, str(REPO / "configs/edit/demo.yaml"), ["guidance_scal=3"])
    msg = str(err.value)
    assert "guidance_scal" in msg and "guidance_scale" in msg


def test_unknown_nested_key_names_it_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config(EditConfig, str(REPO / "configs/edit/demo.yaml"), ["model.devic=cpu"])
    assert "model.devic" in str(err.value) and "device" in str(err.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nembeds_dir: y\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(EditConfig, str(bad))
    assert "bogus" in str(err.value) and "bad.yaml" in str(err.value)


@pytest.mark.parametrize("override,key", [
    ("batch_size=abc", "batch_size"),
    ("search=best", "search"),
    ("t_skips=[0.9,1.5]", "t_skip"),
    ("batch_size=0", "batch_size"),
    ("model.device=gpu0", "model.device"),
    ("data.name=butterfy", "data.name"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(EditConfig, str(REPO / "configs/edit/demo.yaml"), [override])
    assert key in str(err.value)


def test_data_name_typo_suggests_the_close_name():
    with pytest.raises(ConfigError) as err:
        load_config(EditConfig, str(REPO / "configs/edit/demo.yaml"), ["data.name=butterfy"])
    assert "butterfly" in str(err.value)


def test_required_keys_are_reported(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  root: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(EmbedsConfig, str(cfg))
    assert "output_dir" in str(err.value)


def test_first_flip_without_oracle_is_refused():
    with pytest.raises(ConfigError) as err:
        load_config(EditConfig, str(REPO / "configs/edit/demo.yaml"), ["search=first_flip", "oracle_dir=null"])
    assert "oracle_dir" in str(err.value)


def test_overrides_apply_after_yaml_and_keep_types():
    cfg = load_config(EditConfig, str(REPO / "configs/edit/demo.yaml"), ["eta=[1,2.5]", "data.num_samples=3"])
    assert cfg.eta == [1.0, 2.5] and cfg.data.num_samples == 3


def test_stamp_writes_config_seed_commit_versions(tmp_path):
    cfg = load_config(EditConfig, str(REPO / "configs/edit/demo.yaml"), [f"output_dir={tmp_path / 'run'}", "seed=7"])
    out = stamp_run_dir(cfg)
    saved = load_config(EditConfig, str(out / "config.yaml"))
    assert saved == cfg
    info = json.loads((out / "run_info.json").read_text())
    assert info["seed"] == 7 and "git_commit" in info and info["packages"]["torch"]
    # a resumed run with a different config is refused rather than mixing results
    other = load_config(EditConfig, str(out / "config.yaml"), [f"guidance_scale={cfg.guidance_scale + 1}"])
    with pytest.raises(ConfigError, match="guidance_scale"):
        stamp_run_dir(other)


ENTRY_POINTS = ["kandinsky_eval.py", "kandinsky_lora_train.py", "scripts/save_embeds.py"]
CONFIG_OF = {"kandinsky_eval.py": "configs/edit/demo.yaml", "kandinsky_lora_train.py": "configs/lora/demo.yaml",
             "scripts/save_embeds.py": "configs/embeds/demo.yaml"}


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_entry_point_rejects_bogus_key_before_loading_models(script):
    """Subprocess: the documented command with bogus.key=1 exits 2 within seconds, naming 'bogus'."""
    proc = subprocess.run([sys.executable, script, "--config_path", CONFIG_OF[script], "bogus.key=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "bogus" in proc.stderr
    assert "Loading weights" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_key_added_since_a_run_was_stamped_counts_as_unchanged_at_its_default() -> None:
    """A run folder stamped before a key existed resumes while the key keeps its default (which keeps the old
    behaviour); any other value of it, or a changed old key, is still refused."""
    from diffusion.config import MiniConfig, config_dict, result_keys_changed

    new = config_dict(MiniConfig(output_dir="m"))
    old = {k: v for k, v in new.items() if k not in ("unet_rotate", "unet_shift")}
    assert result_keys_changed(MiniConfig, old, new) == []
    assert result_keys_changed(MiniConfig, old, config_dict(MiniConfig(output_dir="m", unet_rotate=5))) == \
        ["unet_rotate"]
    assert result_keys_changed(MiniConfig, {**old, "seed": 1}, new) == ["seed"]
    # nested and enum-valued keys: compared with the default as the stamp writes it
    demo = str(REPO / "configs" / "edit" / "demo.yaml")
    edit = config_dict(load_config(EditConfig, demo, ["flip_agreement=mean"]))  # the key at its default
    old_edit = {k: v for k, v in edit.items() if k != "flip_agreement"}
    old_edit["data"] = {k: v for k, v in edit["data"].items() if k != "eval_split"}
    assert result_keys_changed(EditConfig, old_edit, edit) == []
    changed = config_dict(load_config(EditConfig, demo, ["flip_agreement=all"]))
    assert result_keys_changed(EditConfig, old_edit, changed) == ["flip_agreement"]
    # a key the stamp has and the schema no longer knows is a change (a result may depend on it)
    assert result_keys_changed(EditConfig, {**edit, "removed_key": 1}, edit) == ["removed_key"]
    # a stamp written before num_images became class_mean_images is the same run
    renamed = {k: v for k, v in edit.items() if k != "class_mean_images"}
    renamed["num_images"] = edit["class_mean_images"]
    assert result_keys_changed(EditConfig, renamed, edit) == []
    renamed["num_images"] = 7
    assert result_keys_changed(EditConfig, renamed, edit) == ["class_mean_images"]

