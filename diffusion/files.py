"""Reading and writing the project's files, in one place.

Writes are atomic: the content goes to a temporary file (or folder) beside the target, which is renamed over it once
complete, so a reader, a crash or a full disk never leaves half a file under the real name. When the write fails
the temporary file is removed and the error is an :class:`~diffusion.errors.OutputError` naming the path.

Reads of files the project wrote earlier go through :func:`read_json` and :func:`load_tensors`: a damaged or foreign
file is an :class:`~diffusion.errors.ArtefactError` naming the file and what to do, never a library traceback.
Tensors are only ever read with safetensors (no pickle).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from diffusion.errors import ArtefactError, OutputError

PathLike = str | os.PathLike


def _why(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


def output_error(path: PathLike, err: OSError, action: str = "write") -> OutputError:
    """The one-line error for a path that cannot be written: what, where, why, and what to do."""
    return OutputError(f"cannot {action} {path}: {_why(err)}. Check that the folder is writable and the disk has "
                       "space (or choose another output_dir), then rerun: finished work is kept.")


def make_dirs(path: PathLike) -> Path:
    """``mkdir -p`` with an :class:`OutputError` naming the folder (a file in the way, read-only, disk full)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        raise OutputError(f"cannot create folder {path}: a file of that name is in the way. Move it, or choose "
                          "another output path.") from err
    except OSError as err:
        raise output_error(path, err, "create folder") from err
    return path


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on failure removed.

    The temporary name keeps the suffix (``.x.tmp123.png``), so libraries that pick a format by extension work.
    """
    path = Path(path)
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    with _removed_on_failure(tmp, path):
        yield tmp
        os.replace(tmp, path)


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, target: Path) -> Iterator[None]:
    """Remove the temporary ``tmp`` when the block fails; an OSError becomes an OutputError naming ``target``."""
    try:
        yield
    except OSError as err:
        _remove(tmp)
        raise output_error(target, err) from err
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: PathLike, data: Any, indent: Optional[int] = 2) -> Path:
    """Write ``data`` as strict JSON (NaN and infinity refused: JSON has none) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, allow_nan=False))


def atomic_save(path: PathLike, save: Callable[[Path], None]) -> Path:
    """Call ``save(tmp)`` to write a file at a temporary path, then rename it to ``path``."""
    with atomic_path(path) as tmp:
        save(tmp)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it takes the place of ``path`` (an existing folder
    is replaced when ``replace``), on failure it is removed. Files inside are flushed to disk before the rename."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the folder it becomes must not be
    except OSError as err:
        raise output_error(path, err, "create folder") from err
    with _removed_on_failure(tmp, path):
        yield tmp
        fsync_files(tmp)
        if path.exists() and replace:
            trash = path.with_name(f".{path.name}.replaced-{os.getpid()}")
            _remove(trash)
            os.rename(path, trash)
            os.rename(tmp, path)
            _remove(trash)
        else:
            os.rename(tmp, path)


def fsync_files(folder: Path) -> None:
    """Flush the files directly in ``folder`` to disk (a power cut after the rename then keeps them whole)."""
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def relative_path(path: PathLike, root: PathLike) -> str:
    """``path`` relative to ``root`` (both resolved), POSIX-style; the resolved absolute path when outside it."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


# ----------------------------------------------------------------------------------------------------------------
# Guarded reads
# ----------------------------------------------------------------------------------------------------------------
def read_json(path: PathLike, fix: str) -> Any:
    """The JSON in ``path``; a missing, truncated or non-JSON file is an :class:`ArtefactError` ending in ``fix``
    (what to do, e.g. "delete it and rerun scripts/save_embeds.py")."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ArtefactError(f"{path} does not exist. {fix}") from err
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = _why(err) if isinstance(err, OSError) else f"not valid JSON ({str(err).splitlines()[0][:120]})"
        raise ArtefactError(f"{path} cannot be read: {reason}; the file is damaged or not one this project wrote. "
                            f"{fix}") from err


def load_tensors(path: PathLike, fix: str, device: str = "cpu") -> Dict[str, Any]:
    """Every tensor of a safetensors file; a missing, truncated or foreign file is an :class:`ArtefactError`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{path} does not exist. {fix}")
    try:
        return load_file(str(path), device=device)
    except Exception as err:  # SafetensorError (header, truncation), OSError, ValueError: all mean "unusable file"
        raise ArtefactError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0][:160]}); it is "
                            f"damaged (an interrupted copy?) or not one this project wrote. {fix}") from err


def tensors_metadata(path: PathLike, fix: str) -> Dict[str, str]:
    """The string metadata of a safetensors file (without reading its tensors); damaged files as :func:`load_tensors`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{path} does not exist. {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise ArtefactError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0][:160]}); it is "
                            f"damaged or not one this project wrote. {fix}") from err


# ----------------------------------------------------------------------------------------------------------------
# One run per folder
# ----------------------------------------------------------------------------------------------------------------
LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _create_lock(lock: Path, record: str) -> bool:
    """Create ``lock`` holding ``record``, or return False when it exists. The file appears with its record already
    in it (written beside it, then hard-linked into place, which fails if the name exists), so another process never
    reads a lock that exists but is still empty, as the processes of one torchrun job starting together would. Where
    the filesystem has no hard links, an exclusive create and a write."""
    tmp = lock.with_name(f"{lock.name}.{os.getpid()}.tmp")
    tmp.write_text(record, encoding="utf-8")
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(record)
    return True


def _read_lock(lock: Path, wait_s: float = 2.0) -> dict:
    """The holder's record of ``lock`` ({} when unreadable). An empty or half-written record (a holder between its
    exclusive create and its write, on a filesystem without hard links) is read again for up to ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            holder = json.loads(lock.read_text(encoding="utf-8") or "null")
        except (OSError, ValueError):
            holder = None
        if isinstance(holder, dict) or time.monotonic() >= deadline:
            return holder if isinstance(holder, dict) else {}
        time.sleep(0.05)


@contextlib.contextmanager
def run_lock(folder: PathLike) -> Iterator[Path]:
    """Hold ``folder/.lock`` while a run writes into ``folder``: a second run into the same folder is refused with a
    BusyError naming the holder, instead of both doing all the work. The process that holds it, and the other
    processes of its torchrun / accelerate job, share it. A lock left by a process that no longer runs (a kill -9, a
    power cut) on this machine is taken over with a warning."""
    import logging
    import socket

    from diffusion.errors import BusyError

    folder = make_dirs(folder)
    lock = folder / LOCK_NAME
    # the processes of one torchrun / accelerate job share a lock: they write into one folder together
    me = {"pid": os.getpid(), "host": socket.gethostname(), "job": os.environ.get("TORCHELASTIC_RUN_ID"),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for attempt in range(2):
        try:
            created = _create_lock(lock, json.dumps(me))
        except OSError as err:
            raise output_error(lock, err, "create") from err
        if created:
            break
        holder = _read_lock(lock)
        pid, host = holder.get("pid"), holder.get("host")
        same_job = me["job"] is not None and holder.get("job") == me["job"]
        if host == me["host"] and (pid == me["pid"] or same_job):  # this process or its job holds it: share it
            yield lock
            return
        if attempt == 0 and host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
            logging.getLogger(__name__).warning("%s: taking over the lock of a run that no longer exists (pid "
                                                "%s)", folder, pid)
            with contextlib.suppress(OSError):
                lock.unlink()
            continue
        raise BusyError(f"{folder} is in use by another run (pid {pid} on {host}, since {holder.get('started')})"
                        f": wait for it to finish, or use another output_dir. If no run uses it any more, delete "
                        f"{lock}.")
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
