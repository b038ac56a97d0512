"""Hostile but realistic use: every case ends in a correct result or in one clear line with exit status 2 (130 for
an interrupt), never a traceback, never a silently wrong result, never lost work.

Runs go through diffusion.cli.guarded, the wrapper every entry point uses, so the exit status and the one logged line
are what a user sees. The tiny random model keeps each case to a second or two.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion.edit.run as edit_run
from diffusion.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, guarded, parse_args
from diffusion.config import EditConfig, EmbedsConfig, LoraTrainConfig, load_config
from diffusion.demo.tiny import make_tiny_model
from diffusion.precompute import save_embeddings

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread_module")


def _edit_args(tmp_path: Path, tiny_model: Path, data: Path, **over) -> list:
    values = {"output_dir": tmp_path / "run", "embeds_dir": tmp_path / "embeds", "compute_missing_embeds": "true",
              "model.decoder": tiny_model / "decoder", "model.prior": tiny_model / "prior", "model.device": "cpu",
              "data.root": data, "num_inference_steps": 4, "search": "fixed", "t_skip": 0.5, "batch_size": 2,
              "lpips": "false", "views.enabled": "false", "data.num_samples": 1}
    values.update(over)
    return [f"{k}={v}" for k, v in values.items()]


def _edit_cfg(tmp_path, tiny_model, data, **over) -> EditConfig:
    return load_config(EditConfig, None, _edit_args(tmp_path, tiny_model, data, **over))


def _run(fn, caplog) -> tuple:
    """(exit status, the log text) of ``fn`` run as an entry point runs it."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = guarded(fn)
    return code, caplog.text


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,key", [
    ("eta=[nan]", "eta"), ("guidance_scale=nan", "guidance_scale"), ("lora.scale=nan", "lora.scale"),
    ("guidance_scale=-1", "guidance_scale"), ("eta=[inf]", "eta"), ("t_skips=[0.9,-0.1]", "t_skips"),
    ("flip_threshold=1.0", "flip_threshold"), ("flip_agreement=most", "flip_agreement"),
    ("inversion_guidance=nan", "inversion_guidance"), ("views.strip_etas=[nan]", "views.strip_etas"),
])
def test_non_finite_or_out_of_range_settings_stop_before_anything_loads(override, key, caplog, tmp_path):
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as code:
        parse_args(EditConfig, ["--config_path", "configs/edit/demo.yaml", override, f"output_dir={tmp_path}/o"])
    assert code.value.code == EXIT_USER_ERROR
    assert f"'{key}'" in caplog.text and override in caplog.text
    assert not (tmp_path / "o").exists()


def test_num_inference_steps_above_the_schedulers_is_refused_before_the_unet_loads(tmp_path, tiny_model, blob_data,
                                                                                    caplog):
    cfg = _edit_cfg(tmp_path, tiny_model, blob_data, num_inference_steps=2000)
    code, text = _run(lambda: edit_run.run_edits(cfg), caplog)
    assert code == EXIT_USER_ERROR and "num_inference_steps = 2000" in text and "at most 1000" in text
    assert not (tmp_path / "run").exists()  # nothing written


# ----------------------------------------------------------------------------------------------------------------
# Names, classes, files
# ----------------------------------------------------------------------------------------------------------------
def test_two_images_whose_names_differ_only_by_a_dot_keep_their_own_edits(tmp_path, tiny_model, blob_data):
    folder = blob_data / "test" / "class_a"
    shutil.copy(folder / "000.png", folder / "x.y.png")
    img = np.asarray(Image.open(folder / "001.png")).copy()
    Image.fromarray(255 - img).save(folder / "x_y.png")  # a different picture
    cfg = _edit_cfg(tmp_path, tiny_model, blob_data, **{"data.num_samples": "null",
                                                       "data.file_lists": "{class_a: " + str(tmp_path / "a.txt") + "}",
                                                       "directions": "[[class_a,class_b]]"})
    (tmp_path / "a.txt").write_text("x.y.png\nx_y.png\n")
    edit_run.run_edits(cfg)
    rows = list(__import__("csv").DictReader(open(tmp_path / "run" / "results.csv")))
    assert len(rows) == 2 and rows[0]["counterfactual_path"] != rows[1]["counterfactual_path"]
    for r in rows:
        original = np.asarray(Image.open(tmp_path / "run" / r["original_path"]))
        expected = np.asarray(Image.open(blob_data / r["source_path"]).convert("RGB").resize(original.shape[1::-1],
                                                                                             Image.BILINEAR))
        assert np.abs(original.astype(int) - expected.astype(int)).mean() < 20  # each folder holds its own image


def test_a_file_list_naming_an_unknown_class_is_refused(tmp_path, tiny_model, blob_data, caplog):
    (tmp_path / "l.txt").write_text("000.png\n")
    cfg = _edit_cfg(tmp_path, tiny_model, blob_data, **{"data.file_lists": "{clas_a: " + str(tmp_path / "l.txt") + "}"})
    code, text = _run(lambda: edit_run.run_edits(cfg), caplog)
    assert code == EXIT_USER_ERROR and "clas_a" in text and "class_a" in text


def test_a_file_list_line_with_a_folder_is_one_clear_line(tmp_path, tiny_model, blob_data, caplog):
    (tmp_path / "l.txt").write_text("test/class_a/000.png\n")
    cfg = _edit_cfg(tmp_path, tiny_model, blob_data, **{"data.file_lists": "{class_a: " + str(tmp_path / "l.txt") + "}"})
    code, text = _run(lambda: edit_run.run_edits(cfg), caplog)
    assert code == EXIT_USER_ERROR and "line 1" in text and "bare file name" in text
    _no_traceback(text)


def test_a_corrupt_image_names_the_key_that_skips_it_and_the_skip_is_listed(tmp_path, tiny_model, blob_data, caplog):
    (blob_data / "test" / "class_a" / "000.png").write_bytes(b"broken")
    cfg = _edit_cfg(tmp_path, tiny_model, blob_data, **{"data.num_samples": 2})
    code, text = _run(lambda: edit_run.run_edits(cfg), caplog)
    assert code == EXIT_USER_ERROR and "000.png" in text and "data.on_bad_file=skip" in text
    # the advice works: the same folder, with the key the message named (a run-control key: the resume is accepted)
    skip = _edit_cfg(tmp_path, tiny_model, blob_data, **{"data.num_samples": 2, "data.on_bad_file": "skip"})
    code, text = _run(lambda: edit_run.run_edits(skip), caplog)
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_files"] == ["test/class_a/000.png"] and summary["n_images"] == 3


# ----------------------------------------------------------------------------------------------------------------
# Artefacts from elsewhere, damaged files
# ----------------------------------------------------------------------------------------------------------------
def test_embeddings_made_by_another_image_encoder_are_refused(tmp_path, tiny_model, blob_data, caplog):
    other = make_tiny_model(tmp_path / "other_model", seed=1)  # same shapes, other weights, another folder
    save_embeddings(load_config(EmbedsConfig, None, [f"output_dir={tmp_path / 'embeds'}", f"data.root={blob_data}",
                                                     f"model.decoder={other / 'decoder'}",
                                                     f"model.prior={other / 'prior'}", "model.device=cpu"]))
    cfg = _edit_cfg(tmp_path, tiny_model, blob_data, compute_missing_embeds="false")
    code, text = _run(lambda: edit_run.run_edits(cfg), caplog)
    assert code == EXIT_USER_ERROR and "made by another image encoder" in text and "class_a.safetensors" in text


def test_a_truncated_embeddings_file_is_recomputed_by_save_embeds_and_refused_by_an_edit_run(tmp_path, tiny_model,
                                                                                            blob_data, caplog):
    ecfg = load_config(EmbedsConfig, None, [f"output_dir={tmp_path / 'embeds'}", f"data.root={blob_data}",
                                            f"model.decoder={tiny_model / 'decoder'}",
                                            f"model.prior={tiny_model / 'prior'}", "model.device=cpu"])
    save_embeddings(ecfg)
    target = tmp_path / "embeds" / "class_a.safetensors"
    from safetensors.torch import load_file

    before = load_file(str(target))["embeds"].clone()  # (load_file maps the file: copy before truncating it)
    good = target.read_bytes()
    target.write_bytes(good[: len(good) // 2])
    cfg = _edit_cfg(tmp_path, tiny_model, blob_data, compute_missing_embeds="false")
    code, text = _run(lambda: edit_run.run_edits(cfg), caplog)
    assert code == EXIT_USER_ERROR and "class_a.safetensors" in text and "not a readable safetensors file" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        save_embeddings(ecfg)  # not "complete, skipped": verified, found damaged, recomputed
    assert "recomputing it" in caplog.text and torch.equal(load_file(str(target))["embeds"], before)


def test_a_fake_adapter_file_is_one_line_naming_it(tmp_path, tiny_model, blob_data, caplog):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"\x00" * 64)
    cfg = _edit_cfg(tmp_path, tiny_model, blob_data, **{"lora.path": tmp_path / "lora"})
    code, text = _run(lambda: edit_run.run_edits(cfg), caplog)
    assert code == EXIT_USER_ERROR and "pytorch_lora_weights.safetensors" in text and "lora.step" in text
    _no_traceback(text)


def test_a_damaged_inversion_file_is_refused_by_name(tmp_path):
    from diffusion.edit.editor import Inversion
    from diffusion.errors import ArtefactError

    (tmp_path / "inv.safetensors").write_text("{}")
    with pytest.raises(ArtefactError, match="inv.safetensors"):
        Inversion.load(tmp_path / "inv.safetensors")


def test_models_load_from_safetensors_only_unless_the_user_opts_in(tmp_path, tiny_model, caplog):
    from diffusion.config import ModelConfig
    from diffusion.models import load_decoder

    pickled = tmp_path / "model"
    shutil.copytree(tiny_model, pickled)
    unet = pickled / "decoder" / "unet"
    weights = unet / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), unet / "diffusion_pytorch_model.bin")
    weights.unlink()
    cfg = ModelConfig(decoder=str(pickled / "decoder"), prior=str(pickled / "prior"), device="cpu")
    code, text = _run(lambda: load_decoder(cfg), caplog)
    assert code == EXIT_USER_ERROR and "model.allow_pickle_weights=true" in text
    load_decoder(ModelConfig(decoder=str(pickled / "decoder"), prior=str(pickled / "prior"), device="cpu",
                             allow_pickle_weights=True))  # the explicit opt-in works


# ----------------------------------------------------------------------------------------------------------------
# Resume never mixes; one run per folder
# ----------------------------------------------------------------------------------------------------------------
def test_resume_with_another_dtype_is_refused_and_run_control_keys_may_change(tmp_path, tiny_model, blob_data, caplog):
    edit_run.run_edits(_edit_cfg(tmp_path, tiny_model, blob_data))
    bf16 = _edit_cfg(tmp_path, tiny_model, blob_data, **{"model.dtype": "bfloat16"})
    code, text = _run(lambda: edit_run.run_edits(bf16), caplog)
    assert code == EXIT_USER_ERROR and "model.dtype" in text and "mix" in text
    rows_before = (tmp_path / "run" / "results.csv").read_text()
    steering = _edit_cfg(tmp_path, tiny_model, blob_data, batch_size=1, **{"data.on_bad_file": "skip"})
    code, _ = _run(lambda: edit_run.run_edits(steering), caplog)
    assert code == 0 and (tmp_path / "run" / "results.csv").read_text() == rows_before  # nothing redone or mixed
    assert "batch_size: 1" in (tmp_path / "run" / "config.yaml").read_text()  # config.yaml describes the folder


def test_auto_dtype_resolving_differently_on_resume_is_refused(tmp_path, tiny_model, blob_data, caplog):
    edit_run.run_edits(_edit_cfg(tmp_path, tiny_model, blob_data))
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["resolved"] == {"dtype": "float32"}
    info["resolved"]["dtype"] = "float16"  # as if the rows had been made on a GPU with model.dtype: auto
    (tmp_path / "run" / "run_info.json").write_text(json.dumps(info))
    code, text = _run(lambda: edit_run.run_edits(_edit_cfg(tmp_path, tiny_model, blob_data)), caplog)
    assert code == EXIT_USER_ERROR and "dtype float16 (this run: float32)" in text


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path, tiny_model, blob_data, caplog):
    import socket

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "started": "now"}))
    code, text = _run(lambda: edit_run.run_edits(_edit_cfg(tmp_path, tiny_model, blob_data)), caplog)
    assert code == EXIT_USER_ERROR and "in use by another run (pid 1" in text
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    code, text = _run(lambda: edit_run.run_edits(_edit_cfg(tmp_path, tiny_model, blob_data)), caplog)
    assert code == 0 and "taking over the lock" in text and not (tmp_path / "run" / ".lock").exists()


# ----------------------------------------------------------------------------------------------------------------
# Outputs that cannot be written
# ----------------------------------------------------------------------------------------------------------------
def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, tiny_model, blob_data, caplog):
    (tmp_path / "run").write_text("a file, not a folder")
    code, text = _run(lambda: edit_run.run_edits(_edit_cfg(tmp_path, tiny_model, blob_data)), caplog)
    assert code == EXIT_USER_ERROR and "a file of that name is in the way" in text and str(tmp_path / "run") in text


def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(tmp_path, tiny_model, blob_data, caplog, monkeypatch):
    import diffusion.files as files

    real = os.replace

    def full(src, dst):
        if str(dst).endswith("summary.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", full)
    code, text = _run(lambda: edit_run.run_edits(_edit_cfg(tmp_path, tiny_model, blob_data)), caplog)
    assert code == EXIT_USER_ERROR and "No space left on device" in text and "summary.json" in text
    assert not [p for p in (tmp_path / "run").rglob("*") if ".tmp" in p.name]
    monkeypatch.setattr(files.os, "replace", real)
    code, _ = _run(lambda: edit_run.run_edits(_edit_cfg(tmp_path, tiny_model, blob_data)), caplog)
    assert code == 0 and (tmp_path / "run" / "summary.json").is_file()  # the rerun finishes from what was kept


# ----------------------------------------------------------------------------------------------------------------
# Classifier outputs that are not numbers
# ----------------------------------------------------------------------------------------------------------------
class NaNOracle:
    classes = ("class_a", "class_b")

    def __call__(self, images):
        return torch.full((len(images), 2), float("nan"))


def test_a_nan_oracle_never_counts_as_a_flip_and_never_reaches_json(tmp_path, tiny_model, blob_data):
    cfg = _edit_cfg(tmp_path, tiny_model, blob_data, search="first_flip", oracle_dir="unused", t_skips="[0.9,0.5]")
    summary = edit_run.run_edits(cfg, oracle=NaNOracle(), judge=NaNOracle())
    rows = list(__import__("csv").DictReader(open(tmp_path / "run" / "results.csv")))
    assert all(r["flipped"] == "0" and r["judge_flipped"] == "0" for r in rows)
    text = (tmp_path / "run" / "summary.json").read_text()
    assert "NaN" not in text and json.loads(text)["flip_rate"] == 0.0 == summary["flip_rate"]


# ----------------------------------------------------------------------------------------------------------------
# Interrupts
# ----------------------------------------------------------------------------------------------------------------
def test_ctrl_c_of_an_edit_run_is_one_line_exit_130_and_the_rerun_resumes(tmp_path, tiny_model, blob_data, caplog,
                                                                          monkeypatch):
    cfg = _edit_cfg(tmp_path, tiny_model, blob_data, **{"data.num_samples": 2})
    real = edit_run._edit_batch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(edit_run, "_edit_batch", interrupted)
    code, text = _run(lambda: edit_run.run_edits(cfg), caplog)
    assert code == EXIT_INTERRUPTED and "interrupted" in text and "rerun the same command to resume" in text
    assert not (tmp_path / "run" / ".lock").exists()  # the folder is free again
    monkeypatch.setattr(edit_run, "_edit_batch", real)
    code, _ = _run(lambda: edit_run.run_edits(cfg), caplog)
    assert code == 0 and json.loads((tmp_path / "run" / "summary.json").read_text())["n_rows"] == 4


@pytest.mark.slow
def test_sigint_of_the_real_command_exits_130_with_one_line(tmp_path):
    """The documented command, interrupted with SIGINT while it edits: exit 130, one line, no traceback."""
    import signal
    import time

    out = tmp_path / "demo"
    cmd = [sys.executable, "kandinsky_eval.py", "--config_path", "configs/edit/demo.yaml", f"output_dir={out}/edit",
           f"embeds_dir={out}/embeds", f"data.root={out}/digits", "views.enabled=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    shards = out / "edit" / "shards"
    while time.time() < deadline and not any(p.stat().st_size for p in shards.glob("*.csv")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "Traceback" not in err and "rerun the same command to resume" in err


def test_ctrl_c_in_lora_training_is_exit_130_without_a_final_adapter(tmp_path, tiny_model, blob_data, caplog,
                                                                    monkeypatch):
    import signal

    from diffusion.train import trainer

    cfg = load_config(LoraTrainConfig, None, [
        f"output_dir={tmp_path / 'lora'}", f"model.decoder={tiny_model / 'decoder'}",
        f"model.prior={tiny_model / 'prior'}", "model.device=cpu", f"data.root={blob_data}", "train_batch_size=2",
        "max_train_steps=3", "checkpointing_steps=1", "resume_from_checkpoint=latest", "model.image_size=32"])
    real = trainer.diffusion_loss
    monkeypatch.setattr(trainer, "diffusion_loss",
                        lambda *a, **k: (os.kill(os.getpid(), signal.SIGINT), real(*a, **k))[1])
    code, text = _run(lambda: trainer.train_lora(cfg), caplog)
    assert code == EXIT_INTERRUPTED and "final adapter was not written" in text and "resume" in text
    assert not (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "lora" / "checkpoint-1").is_dir()


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_and_a_moved_run_resumes(tmp_path, tiny_model,
                                                                                       blob_data, caplog):
    from diffusion.train.trainer import train_lora

    args = [f"model.decoder={tiny_model / 'decoder'}", f"model.prior={tiny_model / 'prior'}", "model.device=cpu",
            f"data.root={blob_data}", "train_batch_size=2", "checkpointing_steps=1", "resume_from_checkpoint=latest",
            "model.image_size=32"]
    train_lora(load_config(LoraTrainConfig, None, [f"output_dir={tmp_path / 'a'}", "max_train_steps=2", *args]))
    shutil.move(tmp_path / "a", tmp_path / "moved")  # nothing depends on where the folder lives
    state = tmp_path / "moved" / "checkpoint-2" / "training_state.json"
    state.write_text(state.read_text()[:40])  # truncated by a crash
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = train_lora(load_config(LoraTrainConfig, None, [f"output_dir={tmp_path / 'moved'}",
                                                                "max_train_steps=3", *args]))
    assert result.resumed_from.name == "checkpoint-1" and result.global_step == 3
    assert "checkpoint-2 is damaged" in caplog.text and "previous complete checkpoint" in caplog.text


def test_the_processes_of_one_distributed_job_share_the_lock(tmp_path, monkeypatch):
    import socket

    from diffusion.errors import BusyError
    from diffusion.files import run_lock

    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "job": "job-a"}))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    with run_lock(tmp_path):  # another rank of the same torchrun job: shared, not refused
        pass
    assert (tmp_path / ".lock").exists()  # and left to its owner
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    with pytest.raises(BusyError, match="in use by another run"):
        with run_lock(tmp_path):
            pass


def test_a_lock_still_being_written_by_another_rank_is_shared_not_refused(tmp_path, monkeypatch):
    """Two ranks of one torchrun job starting together: the second must never read the first's lock while it is
    empty and take it for a foreign run (CI once failed so). The lock appears with its record in it; a record that
    is empty for a moment (an exclusive create and a write, where the filesystem has no hard links) is read again."""
    import socket
    import threading

    from diffusion.files import run_lock

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    with run_lock(tmp_path / "new") as lock:  # created with its record already in it
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert [p.name for p in lock.parent.iterdir()] == [".lock"]  # no temporary file left beside it
    assert not (tmp_path / "new" / ".lock").exists()
    lock = tmp_path / ".lock"
    lock.write_text("")  # the other rank has created it and not yet written its record
    record = json.dumps({"pid": 1, "host": socket.gethostname(), "job": "job-a"})
    writer = threading.Timer(0.3, lambda: lock.write_text(record))
    writer.start()
    try:
        with run_lock(tmp_path):  # shared once the record is there, not refused as "pid None"
            pass
    finally:
        writer.join()
    assert lock.read_text() == record  # left to its owner
