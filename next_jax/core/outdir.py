"""Directories we write for the user (HF models, PEFT adapters, post-hoc OUT, GGUF conversions) and the
locks that keep two processes out of one directory.

    check_out(out, inputs=…)     before any work: refuse what must never be replaced or cannot be written
    atomic_dir(out, write)       write(tmp) into a sibling, then swap it in crash-safely; returns out
    lock(path, what)             an exclusive flock on a lock file, for the life of a run

Ownership: every directory `atomic_dir` writes holds a MARKER file. An existing non-empty directory without
one is the user's: it is refused unless the caller's overwrite flag (named in the message) is given. `.`, its
parents, the inputs and their parents are refused always; so is a symbolic link (rename would replace the link).

Crash safety: the new tree is written to `.<name>.tmp-<pid>-<rand>`; the old one is renamed aside to
`.<name>.old-<pid>-<rand>`, the new one renamed in, then the old one deleted. A kill at any instant leaves the
old or the new tree whole; the next `atomic_dir` on the same OUT (under its lock, so every such sibling is
stale) puts a whole tree back at OUT when it is missing and deletes the rest. Directories are made with
mkdir, so they honour the umask (mkdtemp's are 0700).

Locks: `flock` on a lock file, released by the kernel when its process dies, so a lock left by a killed run
never blocks the next. The holder writes its pid into the file (named when a second process is refused) and
removes the file on release.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

MARKER = ".next_jax"
_SIBLING = re.compile(r"(tmp|old)-\d+-[0-9a-f]+")
_HELD: dict[tuple[str, int], list] = {}  # (lock file, thread) → [fd, depth]: re-entrant within a thread


class CheckpointError(ValueError):
  """A model, adapter or checkpoint file that cannot be used as is; the message names the file or field.
  (Defined in this lowest layer so every reader and writer above raises the one type; `hf` re-exports it.)"""


class OutputError(CheckpointError):
  """An output directory that must not or cannot be written; the message names it (and the flag, if any)."""


class Busy(OutputError):
  """A directory another live process holds the lock of."""


# ---------------------------------------------------------------------------------------------- locks


def lock_path(out: str | os.PathLike) -> Path:
  """The lock file of an output directory: `.<name>.lock` beside it (OUT itself is replaced by rename)."""
  out = Path(out).absolute()
  return out.parent / f".{out.name}.lock"


def _holder(path: Path) -> str:
  try:
    return Path(path).read_text().strip() or "unknown"
  except OSError:
    return "unknown"


def _busy_error(path: Path, what: str) -> Busy:
  return Busy(f"{what} is in use by another process (pid {_holder(path)}, lock {path}); wait for it to "
              "finish or use another directory")


def _acquire(path: Path, what: str, wait: bool) -> int:
  """An fd holding LOCK_EX on the file now at `path` (retried when a releasing holder unlinked it)."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
      os.close(fd)
      raise _busy_error(path, what) from None
    try:
      st = os.stat(path)
      same = (st.st_ino, st.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
    except FileNotFoundError:
      same = False
    if same:
      os.ftruncate(fd, 0)
      os.write(fd, f"{os.getpid()}\n".encode())
      return fd
    os.close(fd)


@contextlib.contextmanager
def lock(path: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
  """Hold an exclusive lock on `path` (a lock file; its directory must exist). Another live holder raises
  Busy naming `what` and its pid, or with wait=True is waited for. Re-entrant within one thread."""
  path = Path(path).absolute()
  key = (str(path), threading.get_ident())
  if key in _HELD:
    _HELD[key][1] += 1
    try:
      yield
    finally:
      _HELD[key][1] -= 1
    return
  _HELD[key] = [_acquire(path, what, wait), 1]
  try:
    yield
  finally:
    fd = _HELD.pop(key)[0]
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)
    os.close(fd)


def check_unlocked(path: str | os.PathLike, what: str) -> None:
  """Raise Busy when another process holds the lock at `path`; creates and changes nothing."""
  path = Path(path).absolute()
  if (str(path), threading.get_ident()) in _HELD:
    return
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise _busy_error(path, what) from None
  finally:
    os.close(fd)


# ------------------------------------------------------------------------------------------- checking


def owned(d: str | os.PathLike) -> bool:
  """Whether `d` is a directory next_jax wrote (it holds MARKER)."""
  return (Path(d) / MARKER).is_file()


def _existing_ancestor(p: Path) -> Path:
  p = p.absolute()
  while not p.exists() and p != p.parent:
    p = p.parent
  return p


def _mb(n: float) -> str:
  return f"{n / 2**20:,.0f} MiB"


def check_writable(out: Path, prefix: str, need_bytes: int = 0) -> None:
  """Create (and remove) a file where OUT's siblings go, and compare free space with need_bytes."""
  where = _existing_ancestor(out.parent)
  try:
    fd, probe = tempfile.mkstemp(prefix=".next_jax-probe-", dir=where)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise OutputError(f"{prefix}: cannot write in {where} ({e.strerror or e}); choose a writable "
                      "directory") from None
  free = shutil.disk_usage(where).free
  if need_bytes and free < 1.05 * need_bytes:
    raise OutputError(f"{prefix}: needs about {_mb(need_bytes)} but {where} has {_mb(free)} free")


def check_out(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
              replace_ours: bool = True, flag: str | None = None, name: str | None = None,
              need_bytes: int = 0) -> Path:
  """Refuse, before any work, an OUT that must not be replaced or cannot be written (module docstring).

  overwrite: the user's flag (`flag`, named in messages) that allows replacing a directory we did not
  write; replace_ours: whether a directory we wrote may be replaced without it; name: how the user gave
  OUT (e.g. "--out"); need_bytes: the size of what will be written, when known."""
  out = Path(out)
  prefix = f"{name} {out}" if name else str(out)
  if out.is_symlink():
    raise OutputError(f"{prefix} is a symbolic link (to {os.readlink(out)}); give the directory itself")
  real, cwd = out.resolve(), Path.cwd().resolve()
  if real == cwd or real in cwd.parents:
    raise OutputError(f"{prefix} is the working directory or a directory above it; give a new directory")
  for i in inputs:
    ri = Path(i).resolve()
    if real == ri or real in ri.parents:
      raise OutputError(f"{prefix} would replace the input {i}; write somewhere else")
  if out.exists() and not out.is_dir():
    raise OutputError(f"{prefix} is a file")
  under = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
  if under is not None:
    raise OutputError(f"{prefix} lies under {under}, which is a file")
  if out.is_dir() and any(out.iterdir()):
    hint = f"pass {flag} to replace it" if flag else "remove it first"
    if owned(out) and not replace_ours:
      raise OutputError(f"{prefix} already holds an earlier result; {hint}")
    if not owned(out) and not overwrite:
      raise OutputError(f"{prefix} holds files next_jax did not write (no {MARKER} marker); choose a new or "
                        f"empty directory, or {hint} (its files are deleted)")
  check_writable(out, prefix, need_bytes)
  return out


# -------------------------------------------------------------------------------------------- writing


def _sibling(out: Path, kind: str) -> Path:
  return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _mark(d: Path, complete: bool) -> None:
  (d / MARKER).write_text(json.dumps({"written_by": "next_jax", "complete": complete}) + "\n")


def _complete(d: Path) -> bool:
  try:
    return bool(json.loads((d / MARKER).read_text()).get("complete"))
  except (OSError, ValueError, AttributeError):
    return False


def recover(out: Path) -> None:
  """Under OUT's lock: put a whole tree back at a missing OUT (a complete new one, else the old one) from
  what a killed swap left, and delete every other stale `.tmp-` / `.old-` sibling."""
  pre = f".{out.name}."
  stale = [p for p in out.parent.glob(glob.escape(pre) + "*")
           if p.is_dir() and not p.is_symlink() and _SIBLING.fullmatch(p.name[len(pre):])]
  if not out.exists() and not out.is_symlink():
    new = [p for p in stale if p.name[len(pre):].startswith("tmp") and _complete(p)]
    old = [p for p in stale if p.name[len(pre):].startswith("old")]
    pick = max(new or old, key=lambda p: p.stat().st_mtime, default=None)
    if pick is not None:
      os.rename(pick, out)
      stale.remove(pick)
  for p in stale:
    shutil.rmtree(p, ignore_errors=True)


def _swap(tmp: Path, out: Path) -> None:
  """Old OUT aside, new one in, old one deleted; an interrupt between the renames puts the old one back."""
  if not out.exists() or not any(out.iterdir()):
    os.replace(tmp, out)  # rename(2) replaces an empty directory
    return
  old = _sibling(out, "old")
  os.rename(out, old)
  try:
    os.rename(tmp, out)
  except BaseException:
    if not out.exists():
      os.rename(old, out)
    raise
  shutil.rmtree(old, ignore_errors=True)


def atomic_dir(out: str | os.PathLike, write: Callable[[Path], None], **check) -> Path:
  """Run write(tmp) in a fresh sibling of OUT, then swap it in (module docstring); `check` goes to
  `check_out`, which runs first, so nothing is computed for an OUT that would be refused. Holds OUT's lock
  (waiting for another writer) while it writes."""
  out = Path(out)
  check_out(out, **check)
  out.parent.mkdir(parents=True, exist_ok=True)
  with lock(lock_path(out), str(out), wait=True):
    recover(out)
    check_out(out, **check)  # recover may have put an earlier result back
    tmp = _sibling(out, "tmp")
    os.mkdir(tmp, 0o777)  # honours the umask
    try:
      _mark(tmp, complete=False)
      write(tmp)
      _mark(tmp, complete=True)
      _swap(tmp, out)
    except OSError as e:
      if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        raise OutputError(f"{out}: writing failed ({e.strerror}: {e.filename or out}); nothing was "
                          "replaced") from e
      raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)  # only still there when writing failed
  return out
