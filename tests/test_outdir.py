"""Output directories we write for the user: a directory next_jax did not write is never replaced without
the user's flag, `.`, its parents and the inputs never; replacement survives a kill or Ctrl-C at any instant
(the next run puts a whole tree back and removes what the killed one left); an unwritable or full target
is refused before any work; outputs honour the umask; a lock keeps a second process out, and a lock left
by a killed process does not."""

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from next_jax.core import outdir

ROOT = Path(__file__).resolve().parents[1]


def _write(text: str):
  def write(tmp: Path):
    (tmp / "result.txt").write_text(text)
  return write


def _never(_tmp):
  raise AssertionError("write() ran for an output that must be refused first")


def _tree(d: Path) -> dict:
  return {str(p.relative_to(d)): p.read_text() for p in sorted(d.rglob("*")) if p.is_file()}


def _siblings(parent: Path) -> list[str]:
  return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_users_directory_is_refused_before_any_work_naming_it_and_the_flag(tmp_path):
  user = tmp_path / "user"
  (user / "sub").mkdir(parents=True)
  (user / "sub" / "thesis.tex").write_text("years of work")
  with pytest.raises(outdir.OutputError, match=r"--out .*user holds files next_jax did not write.*--overwrite"):
    outdir.atomic_dir(user, _never, flag="--overwrite", name="--out")
  assert _tree(user) == {"sub/thesis.tex": "years of work"} and not _siblings(tmp_path)
  outdir.atomic_dir(user, _write("new"), overwrite=True, flag="--overwrite")  # the user asked for it
  assert _tree(user) == {outdir.MARKER: (user / outdir.MARKER).read_text(), "result.txt": "new"}
  outdir.atomic_dir(user, _write("newer"))  # ours now: replaced without the flag
  assert (user / "result.txt").read_text() == "newer" and _siblings(tmp_path) == []


@pytest.mark.parametrize("case", [".", "..", "input", "input_parent"])
def test_the_working_directory_its_parents_and_the_inputs_are_refused_even_with_overwrite(case, tmp_path,
                                                                                          monkeypatch):
  run = tmp_path / "run" / "checkpoint-2"
  run.mkdir(parents=True)
  (run / "adapter_model.safetensors").write_text("weights")
  monkeypatch.chdir(run if case in (".", "..") else tmp_path)
  out = {".": ".", "..": "..", "input": str(run), "input_parent": str(run.parent)}[case]
  match = "working directory" if case in (".", "..") else "would replace the input"
  with pytest.raises(outdir.OutputError, match=match):
    outdir.atomic_dir(out, _never, inputs=[run], overwrite=True)
  assert (run / "adapter_model.safetensors").read_text() == "weights"


def test_a_symlink_a_read_only_and_a_full_target_are_refused_before_any_work(tmp_path, monkeypatch):
  (tmp_path / "real").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "real")
  with pytest.raises(outdir.OutputError, match="link is a symbolic link"):
    outdir.check_out(tmp_path / "link")
  with pytest.raises(outdir.OutputError, match=r"needs about 2,048 MiB but .* has 1 MiB free"):
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(2**40, 2**40, 2**20))
    outdir.atomic_dir(tmp_path / "out", _never, need_bytes=2**31)

  def read_only(*_a, **_k):
    raise OSError(errno.EROFS, "Read-only file system")

  monkeypatch.setattr(outdir.tempfile, "mkstemp", read_only)
  with pytest.raises(outdir.OutputError, match=r"out: cannot write in .* \(Read-only file system\)"):
    outdir.atomic_dir(tmp_path / "out", _never)


def test_outputs_honour_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    out = outdir.atomic_dir(tmp_path / "out", _write("x"))
  finally:
    os.umask(old)
  assert out.stat().st_mode & 0o777 == 0o755 and (out / "result.txt").stat().st_mode & 0o777 == 0o644


def test_ctrl_c_between_the_renames_leaves_the_old_tree_whole(tmp_path, monkeypatch):
  out = outdir.atomic_dir(tmp_path / "out", _write("old"))
  real, calls = os.rename, []

  def rename(a, b):
    calls.append((a, b))
    if len(calls) == 2:  # old is aside, the new one not yet in
      raise KeyboardInterrupt
    real(a, b)

  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(KeyboardInterrupt):
    outdir.atomic_dir(out, _write("new"))
  monkeypatch.setattr(os, "rename", real)
  assert (out / "result.txt").read_text() == "old" and _siblings(tmp_path) == []


def _child(script: str) -> None:
  """Run `script` in a fresh Python that SIGKILLs itself at the point it chooses."""
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, check=False)
  assert proc.returncode == -9, proc.stderr[-2000:]


def test_a_kill_between_the_renames_is_repaired_by_the_next_run(tmp_path):
  out = outdir.atomic_dir(tmp_path / "out", _write("old"))
  for i in range(50):
    (out / f"f{i}").write_text("x")
  _child(f"""
      import os, signal
      from pathlib import Path
      from next_jax.core import outdir
      real = os.rename
      def rename(a, b):
        real(a, b)
        os.kill(os.getpid(), signal.SIGKILL)  # right after the old tree went aside
      os.rename = rename
      outdir.atomic_dir(Path({str(out)!r}), lambda t: (t / "result.txt").write_text("new"))
  """)
  assert not out.exists() and len(_siblings(tmp_path)) == 3  # old aside, new complete, the dead lock
  outdir.recover(out)  # what the next atomic_dir on OUT does first, under OUT's lock
  assert _tree(out)["result.txt"] == "new" and _siblings(tmp_path) == [".out.lock"]


def test_a_kill_while_writing_leaves_no_lock_that_blocks_and_the_temp_dir_is_removed_next_time(tmp_path):
  out = tmp_path / "out"
  _child(f"""
      import os, signal
      from pathlib import Path
      from next_jax.core import outdir
      def write(tmp):
        (tmp / "half.bin").write_bytes(b"0" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
      with outdir.lock(outdir.lock_path(Path({str(out)!r})), "--out"):
        outdir.atomic_dir(Path({str(out)!r}), write)
  """)
  stale = _siblings(tmp_path)
  assert ".out.lock" in stale and any(".out.tmp-" in s for s in stale) and not out.exists()
  outdir.check_unlocked(outdir.lock_path(out), "--out")  # the kernel dropped the dead process's flock
  outdir.atomic_dir(out, _write("done"))
  assert (out / "result.txt").read_text() == "done" and _siblings(tmp_path) == []


def test_a_second_process_is_refused_naming_the_directory_and_the_holder_pid(tmp_path):
  path, held, release = outdir.lock_path(tmp_path / "out"), threading.Event(), threading.Event()

  def holder():  # another open file description: to flock, exactly another process
    with outdir.lock(path, "--out"):
      held.set()
      release.wait(10)

  t = threading.Thread(target=holder)
  t.start()
  held.wait(10)
  try:
    with pytest.raises(outdir.Busy, match=rf"--out is in use by another process \(pid {os.getpid()}"), \
        outdir.lock(path, "--out"):
      pass
    with pytest.raises(outdir.Busy, match="in use"):
      outdir.check_unlocked(path, "--out")
  finally:
    release.set()
    t.join()
  with outdir.lock(path, "--out"), outdir.lock(path, "--out"):  # free again, and re-entrant in one thread
    assert path.exists()
  assert not path.exists()
