"""What the commands that parse their own flags share (`main(argv)` runs in-process, as tests call it)."""

from __future__ import annotations

import sys

from absl import flags


def parse(fv: flags.FlagValues, argv: list[str], prog: str, doc: str, stray: str,
          required: tuple[str, ...] = ()) -> flags.FlagValues:
  """argv (absl syntax: `--k=2` or `--k 2`, lists comma-separated, `--flag`/`--noflag`) into fv. --help
  prints `doc` and the flags; a bad value, a stray argument (`stray` says what to write instead) or a
  missing required flag exits with one line naming it."""
  if {"-h", "--help", "--helpshort", "--helpfull"} & set(argv):
    print(doc + "\nflags:\n" + fv.get_help(include_special_flags=False))
    sys.exit(0)
  try:
    rest = fv([prog, *argv])
  except flags.Error as e:
    sys.exit(f"{prog}: {e}")
  if len(rest) > 1:
    sys.exit(f"{prog}: unexpected argument {rest[1]!r} ({stray.format(arg=rest[1])})")
  for name in required:
    if fv[name].value is None:
      sys.exit(f"{prog}: --{name} is required")
  return fv
