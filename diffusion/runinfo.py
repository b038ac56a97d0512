"""Stamping run folders: every output folder holds the resolved ``config.yaml`` and a ``run_info.json`` (seed, git
commit, package versions, command line), so a result can always be traced back to what produced it.

A folder is never shared by two configs: resuming with a key that changes results is refused, naming the keys;
keys that only steer the run (the schema's ``RUN_CONTROL_KEYS``: output_dir, batch size, logging, views) may change,
and config.yaml then records the new values. A folder that holds no result yet (a run that failed before its first
result) accepts any new config, so fixing a typo and rerunning into the same folder just works.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from omegaconf import OmegaConf

from diffusion.config import REPO_ROOT, config_dict, result_keys_changed, to_yaml
from diffusion.errors import ConfigError
from diffusion.files import atomic_write_json, atomic_write_text, make_dirs

log = logging.getLogger(__name__)

_STAMPED_PACKAGES = (
    "torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "omegaconf", "open_clip_torch",
    "safetensors", "pillow", "numpy", "lpips", "scikit-learn",
)


def git_commit() -> Optional[str]:
    """The repository's HEAD commit (with '-dirty' when the tree has changes), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {}
    for name in _STAMPED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_stamped_config(folder: Path) -> Optional[dict]:
    """The config.yaml of a run folder as plain dicts, or None when there is none. A damaged one is a ConfigError."""
    cfg_file = Path(folder) / "config.yaml"
    if not cfg_file.is_file():
        return None
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(cfg_file))
    except Exception as err:
        raise ConfigError(f"{cfg_file} cannot be read ({str(err).splitlines()[0]}): it is damaged. Restore it, or "
                          f"delete {folder} to start over.") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{cfg_file} is not a config mapping; restore it, or delete {folder} to start over.")
    return loaded


def check_same_run(cfg: Any, folder: Path, has_results: bool) -> None:
    """Refuse to continue ``folder`` with a config whose result-changing keys differ from its config.yaml."""
    old = read_stamped_config(folder)
    if old is None:
        return
    changed = result_keys_changed(type(cfg), old, config_dict(cfg))
    if not changed:
        return
    if not has_results:
        log.info("%s holds no results yet: its config.yaml is replaced (keys changed: %s)", folder,
                 ", ".join(changed))
        return
    raise ConfigError(
        f"{folder / 'config.yaml'} was written by a run with other values of {', '.join(changed)}: continuing it "
        f"would mix results of two settings. Rerun with the values in that file to resume, use a new output_dir, or "
        f"delete {folder} to start over.")


def check_same_resolution(folder: Path, resolved: Dict[str, str], has_results: bool) -> None:
    """Refuse to continue a folder whose results were computed with other resolved settings (``auto`` dtype means
    float16 on a GPU and float32 on a CPU: the same config.yaml can mean two computations)."""
    info_file = Path(folder) / "run_info.json"
    if not has_results or not info_file.is_file():
        return
    try:
        old = json.loads(info_file.read_text()).get("resolved") or {}
    except (OSError, ValueError):
        return  # a damaged run_info.json is rewritten; config.yaml is the record that decides
    changed = {k: (old[k], v) for k, v in resolved.items() if k in old and old[k] != v}
    if changed:
        what = ", ".join(f"{k} {a} (this run: {b})" for k, (a, b) in changed.items())
        raise ConfigError(f"{folder} holds results computed with {what}: continuing would mix them. Set the value "
                          f"explicitly to match (e.g. model.dtype={next(iter(changed.values()))[0]}), or use a new "
                          "output_dir.")


def stamp_run_dir(cfg: Any, output_dir: Optional[str | Path] = None,
                  has_results: Optional[Callable[[Path], bool]] = None, extra: Optional[Dict[str, Any]] = None,
                  resolved: Optional[Dict[str, str]] = None) -> Path:
    """Create the run folder and write config.yaml (resolved) and run_info.json (seed, git commit, versions, argv,
    ``resolved`` settings such as the dtype ``auto`` became, and ``extra``).

    ``has_results(folder)`` says whether the folder already holds results (default: it does once config.yaml
    exists); see :func:`check_same_run` for what a resumed run may change, :func:`check_same_resolution` for the
    resolved settings.
    """
    out = Path(output_dir or cfg.output_dir)
    make_dirs(out)
    exists = (out / "config.yaml").is_file()
    results = has_results(out) if has_results is not None else exists
    check_same_run(cfg, out, results)
    if resolved:
        check_same_resolution(out, resolved, results)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    info = {
        "seed": getattr(cfg, "seed", None),
        "git_commit": git_commit(),
        "argv": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "resolved": resolved or {},
        **(extra or {}),
    }
    atomic_write_json(out / "run_info.json", info)
    return out
