"""Keeping the answers of quiz.html and study.html out of sight until a participant has answered.

Two measures, both deterministic (the same run folder gives the same bytes, so :func:`write_views` stays idempotent):

- Images the pages show are **copies with opaque names** in ``study/`` (the first 16 hex digits of the file's SHA-256:
  ``study/3f9c0a1b2c3d4e5f.png``), so an image's address no longer says ``edits/8_to_3/...``.
- A question's true class is a **token**: the class's index in the page's class list, written as 4 ASCII digits, XORed
  with a keystream and base64-encoded. The keystream is :func:`mulberry32` seeded with ``fnv1a32(key + "|" + image)``
  (one byte per draw: the top 8 bits), ``key`` being a per-page key derived from the page's images and seed. The page
  decodes a token only when it records an answer (``blind.js`` holds the same functions).

This hides the answers from a participant reading the page, its DOM or its image addresses: it suits a supervised
study or practice. It is not secure: the key sits in the page, so anyone determined can decode every token.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Set

from diffusion.files import make_dirs
from diffusion.views.pages import url

BLIND_DIR = "study"  # the folder of opaque copies, beside index.html
_OPAQUE_NAME = re.compile(r"^[0-9a-f]{16}\.(png|gif|jpg|jpeg|webp)$")
_M32 = 0xFFFFFFFF
TOKEN_DIGITS = 4  # class index digits: every token has the same length, whatever the class (no length leak)


# --------------------------------------------------------------------------------------------------------------------
# The two 32-bit functions the page and Python share (so Python can replay a participant's order, and tests can read
# a page's answers)
# --------------------------------------------------------------------------------------------------------------------
def fnv1a32(text: str) -> int:
    """32-bit FNV-1a hash of the UTF-8 bytes of ``text``."""
    h = 0x811C9DC5
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & _M32
    return h


def _imul(a: int, b: int) -> int:
    return (a * b) & _M32


def mulberry32(seed: int) -> Iterator[int]:
    """The mulberry32 generator: an endless stream of unsigned 32-bit integers from a 32-bit seed (JavaScript's
    ``Math.imul`` arithmetic, reproduced bit for bit)."""
    a = seed & _M32
    while True:
        a = (a + 0x6D2B79F5) & _M32
        t = _imul(a ^ (a >> 15), 1 | a)
        t = ((t + _imul(t ^ (t >> 7), 61 | t)) & _M32) ^ t
        yield (t ^ (t >> 14)) & _M32


def seeded_shuffle(items: Sequence, seed_text: str) -> list:
    """Fisher-Yates shuffle driven by ``mulberry32(fnv1a32(seed_text))``: for i = n-1 .. 1, swap item i with item
    ``draw % (i + 1)``. ``blind.js`` shuffles the same way, so a page's order can be replayed here."""
    out = list(items)
    draws = mulberry32(fnv1a32(seed_text))
    for i in range(len(out) - 1, 0, -1):
        j = next(draws) % (i + 1)
        out[i], out[j] = out[j], out[i]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------------------------
def page_key(parts: Iterable[str]) -> str:
    """A page's key: 32 hex digits of the SHA-256 of its parts (image names, seed), so the same page gets the same
    key and two pages different ones."""
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:32]


def _keystream(key: str, image: str, n: int) -> bytes:
    draws = mulberry32(fnv1a32(f"{key}|{image}"))
    return bytes(next(draws) >> 24 for _ in range(n))


def encode_class(class_index: int, key: str, image: str) -> str:
    """The token of a question: ``class_index`` hidden under the page's ``key`` and the question's ``image`` URL."""
    if not 0 <= class_index < 10 ** TOKEN_DIGITS:
        raise ValueError(f"class index {class_index} does not fit {TOKEN_DIGITS} digits")
    plain = f"{class_index:0{TOKEN_DIGITS}d}".encode("ascii")
    stream = _keystream(key, image, len(plain))
    return base64.b64encode(bytes(p ^ s for p, s in zip(plain, stream))).decode("ascii")


def decode_class(token: str, key: str, image: str) -> int:
    """The class index a token hides (the inverse of :func:`encode_class`)."""
    raw = base64.b64decode(token)
    stream = _keystream(key, image, len(raw))
    return int(bytes(r ^ s for r, s in zip(raw, stream)).decode("ascii"))


# --------------------------------------------------------------------------------------------------------------------
# Opaque copies
# --------------------------------------------------------------------------------------------------------------------
def opaque_name(path: Path) -> str:
    """``study/<16 hex of the content's SHA-256><suffix>``: the same file always gets the same name."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"{BLIND_DIR}/{digest}{path.suffix.lower()}"


class OpaqueCopies:
    """Copies run files into ``<run>/study/`` under opaque names; :meth:`prune` then removes the copies no page uses
    any more (a config change, fewer images), leaving every other file alone."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.used: Set[str] = set()

    def __call__(self, rel_path: str | None) -> str | None:
        """The URL of an opaque copy of the run-relative file ``rel_path``; None when it is missing (or None)."""
        if not rel_path or not (self.run_dir / rel_path).is_file():
            return None
        source = self.run_dir / rel_path
        name = opaque_name(source)
        target = self.run_dir / name
        if not target.is_file():
            make_dirs(target.parent)
            shutil.copyfile(source, target)
        self.used.add(name)
        return url(name)

    def prune(self) -> List[str]:
        """Delete the opaque copies in ``study/`` that no page of this pass used; returns their names."""
        folder = self.run_dir / BLIND_DIR
        stale = [] if not folder.is_dir() else sorted(
            f"{BLIND_DIR}/{p.name}" for p in folder.iterdir()
            if p.is_file() and _OPAQUE_NAME.match(p.name) and f"{BLIND_DIR}/{p.name}" not in self.used)
        for name in stale:
            (self.run_dir / name).unlink()
        return stale
