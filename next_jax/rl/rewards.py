"""Verifiers: response text + ground truth → reward in {0.0, 1.0}, and a registry by name.

    math       math-verify equivalence of the last \\boxed{} (or "Answer: X") with the ground truth
    exact      exact numeric value of the answer (synthetic tasks: "007" == "7" == "7.0")
    countdown  an arithmetic expression over the given numbers that reaches the target; parsed by a small
               recursive-descent parser with exact Fraction arithmetic (never eval)

Every verifier is a plain `fn(response: str, ground_truth: str) -> float` that never raises on model text.

Time limit of `math_reward` (the only verifier that calls into sympy): the whole call — parsing the gold,
parsing the answer, comparing — gets one wall-clock budget, `timeout_s` (default MATH_TIMEOUT_S = 2 s).
math-verify 0.9.0's own timeouts are `signal.alarm(int seconds)` per operation: integer seconds only, the
budget restarts for every comparison, and they raise inside a non-main thread. We switch them off and
enforce the budget ourselves with `signal.setitimer` (sub-second; previous handler and timer restored
afterwards). The interrupt re-fires every 50 ms until disarmed: one that lands in a gc callback or a
finaliser is swallowed there (Python prints "Exception ignored in …") and the next one stops the work.
A signal cannot stop one long C call (a huge integer power), and outside the main thread no signal can be
used at all, so cheap guards (`answer_guard`) reject hostile answers before sympy sees them: answers longer
than MAX_ANSWER_CHARS, bracket nesting deeper than MAX_NESTING, control characters, numeric power towers,
exponents with more than MAX_EXPONENT_DIGITS digits or whose result could exceed ~MAX_POWER_DIGITS digits,
and large factorials. Outside the main thread only these guards apply (no wall-clock bound).
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np

from next_jax.core.registry import Registry

RewardFn = Callable[[str, str], float]

MATH_TIMEOUT_S = 2.0  # wall-clock budget of one math_reward call (main thread)
MAX_ANSWER_CHARS = 300  # longer extracted answers are rejected, not truncated (a prefix can change meaning)
MAX_NESTING = 20  # deepest {[( nesting accepted in an answer
MAX_EXPONENT_DIGITS = 4  # an exponent may hold at most this many digits (2^{2024} ok, 9^{387420489} not)
MAX_POWER_DIGITS = 100_000  # bound on (longest digit run) · 10^(exponent digits): size of one power
MAX_FACTORIAL_DIGITS = 3  # 999! ok, 100000! not
MAX_NUMBER_CHARS = 64  # exact_reward: longer numerals are rejected
MAX_TAIL_CHARS = 4096  # last_number_reward scans only the end of a response
_RETRY_S = 0.05  # the deadline signal re-fires at this interval until disarmed

# countdown expression parser limits
MAX_EXPR_CHARS = 200
MAX_EXPR_DEPTH = 16
MAX_LITERAL_DIGITS = 6

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_LINE = re.compile(r"answer\s*(?:is\b\s*:?|:)[ \t]*([^\n]*)", re.IGNORECASE)
_DOLLAR = re.compile(r"(?<!\\)\$")  # a math delimiter, not an escaped \$ (MATH's "\$18.90")
_FULL_STOP = re.compile(r"(?<![.\s])\.\s*$")  # one sentence-ending period ("…\cup\{1\}."), not "…"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_DIGIT_RUN = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+\.[0-9]*|\.[0-9]+")
_POWER = re.compile(r"\^|\*\*")
_TOKEN = re.compile(r"[+-]?(?:[0-9]+|\\?[A-Za-z]+)")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_LETTER = re.compile(r"[A-Za-z]")
_FACTORIAL_JUNK = re.compile(r"[^0-9+\-(){} ]")  # a numeric factorial operand may only add/subtract
_EXPR_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))")
_EXPR_REWRITES = (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("\u00d7", "*"), ("\u00b7", "*"),
                  ("\u00f7", "/"), ("\u2212", "-"), ("\\left", ""), ("\\right", ""), ("$", ""))


class ExprError(ValueError):
  """A countdown expression that is malformed, too long/deep, or divides by zero."""


class _Deadline(BaseException):  # BaseException: math-verify's `except Exception` must not swallow it
  pass


# ------------------------------------------------------------------------------------------ extraction


def _last_boxed_span(text: str) -> tuple[int, int] | None:
  """(start, end) of the content of the last-opened *closed* \\boxed{…}/\\fbox{…}, in O(len(text)).

  Braces are +1/−1 steps (escaped \\{ \\} are not); unmatched '}' are ignored, i.e. the depth is the walk
  reflected at 0: d = D − min(0, cummin D). A box opened at p (depth d_p after its '{') is closed iff the
  depth later drops below d_p: suffix-min(d)[p+1] < d_p; its end is the first such position.
  """
  starts = [m.end() - 1 for m in _BOX_OPEN.finditer(text)]
  if not starts:
    return None
  # one code per character, lone surrogates included (model text can hold them; "strict" would raise)
  codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
  step = (codes == ord("{")).astype(np.int64) - (codes == ord("}"))
  escaped = np.zeros(len(codes), bool)
  escaped[1:] = codes[:-1] == ord("\\")
  escaped[2:] &= codes[:-2] != ord("\\")
  step[escaped] = 0
  walk = np.cumsum(step)
  depth = walk - np.minimum(np.minimum.accumulate(walk), 0)
  suffix_min = np.minimum.accumulate(depth[::-1])[::-1]
  for p in reversed(starts):
    if p + 1 < len(depth) and suffix_min[p + 1] < depth[p]:
      end = p + 1 + int(np.argmax(depth[p + 1:] < depth[p]))
      return p + 1, end
  return None


def _clean_answer_line(line: str) -> str:
  """'**Answer:** $x=5$. Done' → 'x=5': markdown stars, the first $…$ group (an escaped \\$ is a
  dollar sign, not a delimiter: '$\\$18.90$' → '\\$18.90'), trailing dots."""
  s = line.strip().strip("*").strip()
  if s.startswith("$"):
    inner = s.lstrip("$")
    close = _DOLLAR.search(inner)
    s = inner[:close.start()] if close else inner
  return s.strip().rstrip(".").strip()


def last_boxed(text: str) -> str | None:
  """Stripped content of the last closed \\boxed{…} / \\fbox{…} (no fallbacks), else None."""
  span = _last_boxed_span(text) if isinstance(text, str) else None
  return text[span[0]:span[1]].strip() if span else None


def extract_answer(text: str) -> str | None:
  """Content of the last non-empty \\boxed{…} (or \\fbox{…}, balanced braces); else the rest of the line after the
  last "Answer:" / "answer is" (trimmed, $…$ unwrapped); else None. Linear time, no recursion."""
  if not isinstance(text, str) or not text:
    return None
  boxed = last_boxed(text)
  if boxed:  # an empty box is the instruction echoed ("put your final answer within \\boxed{}"), no answer
    return boxed
  last = None
  for last in _ANSWER_LINE.finditer(text):
    pass
  if last is None:
    return None
  ans = _clean_answer_line(last.group(1))
  return ans or None


# -------------------------------------------------------------------------------------------- guards


def _max_nesting(s: str) -> int:
  depth = best = 0
  for ch in s:
    if ch in "{[(":
      depth += 1
      best = max(best, depth)
    elif ch in "}])":
      depth = max(depth - 1, 0)
  return best


def _group_after(s: str, i: int) -> str:
  """The operand starting at i (spaces skipped): a balanced {…}/(…) group, else one number/name token."""
  while i < len(s) and s[i] == " ":
    i += 1
  if i < len(s) and s[i] in "{(":
    opener, closer, depth = s[i], "}" if s[i] == "{" else ")", 0
    for j in range(i, len(s)):
      depth += (s[j] == opener) - (s[j] == closer)
      if depth == 0:
        return s[i:j + 1]
    return s[i:]
  m = _TOKEN.match(s, i)
  return m.group(0) if m else s[i:i + 1]


def _group_before(s: str, i: int) -> str:
  """The operand ending just before i (spaces skipped): a balanced group ending in '}' or ')', else ''."""
  while i > 0 and s[i - 1] == " ":
    i -= 1
  if i == 0 or s[i - 1] not in "})":
    return ""
  closer, opener, depth = s[i - 1], "{" if s[i - 1] == "}" else "(", 0
  for j in range(i - 1, -1, -1):
    depth += (s[j] == closer) - (s[j] == opener)
    if depth == 0:
      return s[j:i]
  return s[:i]


def _numeric(span: str) -> bool:
  """No variables: no letters once LaTeX commands (\\frac, \\cdot, …) are removed."""
  return _LETTER.search(_LATEX_COMMAND.sub("", span)) is None


def answer_guard(answer: str) -> str | None:
  """Why an extracted answer is too dangerous to hand to sympy (None: safe). Cheap: O(len · #operators).

  Rejects: > MAX_ANSWER_CHARS chars; control characters; {[( nesting > MAX_NESTING; numeric power towers
  (a numeric exponent or base group that itself holds a power: 9^{9^{9}}, 10**10**10, (9^{99})^{99});
  exponents with > MAX_EXPONENT_DIGITS digits; powers whose size bound (longest digit run) · 10^(exponent
  digits) exceeds MAX_POWER_DIGITS; factorials of > MAX_FACTORIAL_DIGITS-digit numbers or of numeric
  groups holding anything but + - and short numbers, and chained factorials. Symbolic towers (e^{-x^2})
  pass: sympy keeps them unevaluated.
  """
  if len(answer) > MAX_ANSWER_CHARS:
    return f"longer than {MAX_ANSWER_CHARS} chars"
  if _CONTROL.search(answer):
    return "control characters"
  if _max_nesting(answer) > MAX_NESTING:
    return f"nesting deeper than {MAX_NESTING}"
  longest_run = max((len(r) for r in _DIGIT_RUN.findall(answer)), default=1)
  for m in _POWER.finditer(answer):
    expo, base = _group_after(answer, m.end()), _group_before(answer, m.start())
    after = answer[m.end() + len(expo):].lstrip(" ")
    if _numeric(expo) and (_POWER.search(expo) or after.startswith(("^", "**")) or "!" in expo):
      return "power tower"
    if base and _numeric(base) and _numeric(expo) and _POWER.search(base):
      return "power tower"
    digits = sum(ch.isdigit() for ch in expo)
    if digits > MAX_EXPONENT_DIGITS:
      return f"exponent with more than {MAX_EXPONENT_DIGITS} digits"
    if longest_run * (10 ** digits - 1) > MAX_POWER_DIGITS:
      return "power result too large"
  for i, ch in enumerate(answer):
    if ch != "!":
      continue
    if answer[i + 1:].lstrip(" ").startswith("!"):
      return "chained factorial"
    j = i
    while j > 0 and answer[j - 1].isdigit():
      j -= 1
    operand = answer[j:i] or _group_before(answer, i)
    if not _numeric(operand):
      continue
    if _FACTORIAL_JUNK.search(operand) or max(map(len, _DIGIT_RUN.findall(operand)), default=0) \
        > MAX_FACTORIAL_DIGITS:
      return "factorial too large"
  return None


# ---------------------------------------------------------------------------------------- deadline


def _with_deadline(fn: Callable[[], float], seconds: float | None) -> float:
  """fn() under a wall-clock budget (main thread: SIGALRM via setitimer; elsewhere: no budget).

  Raises _Deadline when the budget is spent. The previous SIGALRM handler is restored and a previously
  armed ITIMER_REAL is re-armed with its remaining time (it is delayed by at most our budget)."""
  if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
    return fn()
  armed = [True]

  def handler(signum, frame):
    if armed[0]:
      raise _Deadline()

  old_handler = signal.signal(signal.SIGALRM, handler)
  old_remaining, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds, _RETRY_S)
  t0 = time.monotonic()
  try:
    return fn()
  finally:
    while True:  # a late signal may interrupt the disarming itself: retry until disarmed
      try:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        break
      except _Deadline:
        continue
    signal.signal(signal.SIGALRM, signal.SIG_DFL if old_handler is None else old_handler)
    if old_remaining > 0:
      left = max(old_remaining - (time.monotonic() - t0), 1e-3)
      signal.setitimer(signal.ITIMER_REAL, left, old_interval)


class _DropTimeoutDisabled(logging.Filter):
  """math-verify warns once that its own timeout is off; ours replaces it, so the warning misleads."""

  def filter(self, record):
    return not str(record.msg).startswith("Timeout is disabled")


def _numeral(text: str):
  """The sympy number of a LaTeX numeral ("1,024", "0.5"), built without `sympify`: sympify runs sympy's
  parse_expr, which evaluates its input with `eval`. latex2sympy calls sympy.Number(str) on numerals."""
  import sympy  # noqa: PLC0415

  t = text.replace(",", "")
  if t.isascii() and t.isdigit():
    return sympy.Integer(int(t))
  if _DECIMAL.fullmatch(t):
    return sympy.Float(t)  # mpmath parses the string
  raise ValueError(f"not a numeral: {text[:40]!r}")


def _gcd_lcm(self, f: str, args):
  """latex2sympy's \\gcd / \\lcm without sympy.nsimplify, which turns a float argument into a string
  (mpmath.identify) and parses it with sympify → eval. Floats become exact rationals (fractions.Fraction of
  their decimal text); other arguments are passed as they are."""
  import sympy  # noqa: PLC0415

  exact = tuple(sympy.Rational(str(a)) if isinstance(a, sympy.Float) else a for a in args)
  return sympy.UnevaluatedExpr(getattr(sympy, f)(exact))


def _math_verify():
  import math_verify  # noqa: PLC0415  (imports sympy: ~1 s, only when the math verifier is used)
  from latex2sympy2_extended import latex2sympy2 as l2s  # noqa: PLC0415

  l2s._Latex2Sympy.parse_number = lambda self, text: _numeral(text)  # no eval of model text
  l2s.Number = _numeral  # convert_number's "333,333" path
  l2s._Latex2Sympy.handle_gcd_lcm = _gcd_lcm  # no nsimplify → sympify of a computed string

  for name in ("math_verify.parser", "math_verify.grader"):
    log = logging.getLogger(name)
    if not any(isinstance(f, _DropTimeoutDisabled) for f in log.filters):
      log.addFilter(_DropTimeoutDisabled())
  return math_verify


# ------------------------------------------------------------------------------------------ verifiers


def _bare(text: str) -> str:
  """'$69$,$84$.' → '69,84': unescaped $ and one final period removed, stripped."""
  return _FULL_STOP.sub("", _DOLLAR.sub("", text).strip()).strip()


def math_reward(response: str, ground_truth: str, timeout_s: float | None = MATH_TIMEOUT_S) -> float:
  """1.0 iff math-verify finds the extracted answer equivalent to the ground truth, else 0.0.

  answer = extract_answer(response) (last \\boxed{}, else "Answer: X"); no answer → 0.0. Only the answer
  (≤ MAX_ANSWER_CHARS, passing `answer_guard`) is parsed, as `\\boxed{answer}`; the gold as
  `\\boxed{ground_truth}`, both less their unescaped $ and one final period (`_bare`: OlympiadBench writes
  "$69$,$84$" and "$(-\\infty, 0) \\cup\\{1\\}$."), by math-verify's LaTeX parser only (its plain-expression fallback
  calls sympy's `parse_expr`, which evaluates text with `eval`); then `math_verify.verify(gold, answer)`. The
  whole call has one wall-clock budget of timeout_s seconds *on the main thread only* (a signal): called
  from another thread it has no wall-clock bound, only the input guards (see the module docstring).
  Timeout or any exception → 0.0.
  """
  try:
    answer = extract_answer(response)
    if answer is None or answer_guard(answer) is not None:
      return 0.0
    gold, answer = _bare(str(ground_truth)), _bare(answer)
    if not gold or not answer:
      return 0.0
    mv = _math_verify()

    latex_only = [mv.LatexExtractionConfig()]  # ExprExtractionConfig would run sympy's parse_expr: eval

    def check() -> float:
      g = mv.parse("\\boxed{" + gold + "}", latex_only, parsing_timeout=None)
      p = mv.parse("\\boxed{" + answer + "}", latex_only, parsing_timeout=None)
      if not g or not p:
        return 0.0
      return float(mv.verify(g, p, timeout_seconds=None))

    return _with_deadline(check, timeout_s)
  except (Exception, _Deadline):  # noqa: BLE001  (a verifier never raises on model text)
    return 0.0


def parse_number(text: str) -> Fraction | None:
  """Exact value of a plain decimal numeral ("007", "-3", "2.50", ".5"), else None. No exponents, no
  thousands separators, at most MAX_NUMBER_CHARS characters."""
  s = text.strip().strip("$").strip()
  if len(s) > MAX_NUMBER_CHARS or not _NUMBER.fullmatch(s):
    return None
  return Fraction(s)


def exact_reward(response: str, ground_truth: str, bare: bool = True) -> float:
  """1.0 iff the answer's exact numeric value equals the ground truth's, else 0.0.

  answer = extract_answer(response), or (bare=True, the toy tasks' raw "12+34*5=" → "182" format) the
  whole stripped response when it has no \\boxed{}/"Answer:". Values compare exactly as rationals of their
  decimal numerals: "007" == "7" == "7.0" (the toy task zero-pads answers), "0.5" == ".50"; anything
  non-numeric (including "1e3", "1,000", "7 apples") → 0.0.
  """
  try:
    answer = extract_answer(response)
    if answer is None and bare:
      answer = response.strip()
    if answer is None:
      return 0.0
    want, got = parse_number(str(ground_truth)), parse_number(answer)
    return float(want is not None and got is not None and want == got)
  except Exception:  # noqa: BLE001
    return 0.0


def _tokenize_expr(expr: str) -> list[tuple[str, str]]:
  tokens, pos = [], 0
  expr = expr.rstrip()
  while pos < len(expr):
    m = _EXPR_TOKEN.match(expr, pos)
    if m is None:
      raise ExprError(f"unexpected character {expr[pos:].lstrip()[:1]!r} at {pos}")
    if m.group(1) is not None:
      if len(m.group(1)) > MAX_LITERAL_DIGITS:
        raise ExprError(f"number with more than {MAX_LITERAL_DIGITS} digits")
      tokens.append(("num", m.group(1)))
    else:
      tokens.append(("op", m.group(2)))
    pos = m.end()
  return tokens


def eval_expression(expr: str, max_chars: int = MAX_EXPR_CHARS,
                    max_depth: int = MAX_EXPR_DEPTH) -> tuple[Fraction, list[int]]:
  """(exact value, integer literals used) of an arithmetic expression; raises ExprError.

  Grammar (binary operators only, no unary minus, no powers):
      expr := term (('+'|'-') term)*     term := factor (('*'|'/') factor)*     factor := INT | '(' expr ')'
  Recursion only through parentheses, at most max_depth levels; at most max_chars characters; literals of
  at most MAX_LITERAL_DIGITS digits. x/0 raises ExprError.
  """
  if len(expr) > max_chars:
    raise ExprError(f"expression longer than {max_chars} chars")
  tokens = _tokenize_expr(expr)
  if not tokens:
    raise ExprError("empty expression")
  pos, used = 0, []

  def peek():
    return tokens[pos] if pos < len(tokens) else ("end", "")

  def factor(depth: int) -> Fraction:
    nonlocal pos
    kind, val = peek()
    if kind == "num":
      pos += 1
      used.append(int(val))
      return Fraction(int(val))
    if (kind, val) == ("op", "("):
      if depth >= max_depth:
        raise ExprError(f"parentheses nested deeper than {max_depth}")
      pos += 1
      v = expr_(depth + 1)
      if peek() != ("op", ")"):
        raise ExprError("missing ')'")
      pos += 1
      return v
    raise ExprError(f"expected a number or '(' at token {pos}, got {val or 'end'!r}")

  def term(depth: int) -> Fraction:
    nonlocal pos
    v = factor(depth)
    while peek() in (("op", "*"), ("op", "/")):
      op = peek()[1]
      pos += 1
      rhs = factor(depth)
      if op == "/" and rhs == 0:
        raise ExprError("division by zero")
      v = v * rhs if op == "*" else v / rhs
    return v

  def expr_(depth: int) -> Fraction:
    nonlocal pos
    v = term(depth)
    while peek() in (("op", "+"), ("op", "-")):
      op = peek()[1]
      pos += 1
      rhs = term(depth)
      v = v + rhs if op == "+" else v - rhs
    return v

  value = expr_(0)
  if pos != len(tokens):
    raise ExprError(f"unexpected {tokens[pos][1]!r} at token {pos}")
  return value, used


def countdown_reward(response: str, ground_truth: str) -> float:
  """1.0 iff the answer is an expression over the given numbers whose exact value is the target.

  ground_truth: JSON {"target": int, "numbers": [int, …], "use_all": bool (default false)}. The expression is
  extract_answer(response), else the whole stripped response; text after the first '=' is ignored
  ("3*8 = 24" → "3*8"); \\times \\cdot × · → *, \\div ÷ → /. Each given number may be used at most as often
  as it is given (use_all: exactly as often). Malformed / too long / too deep / x/0 → 0.0.
  """
  try:
    spec = json.loads(ground_truth)
    target, numbers = Fraction(int(spec["target"])), Counter(int(x) for x in spec["numbers"])
    expr = extract_answer(response)
    if expr is None:
      expr = response.strip()
    if len(expr) > 4 * MAX_EXPR_CHARS:
      return 0.0
    expr = expr.split("=", 1)[0]
    for old, new in _EXPR_REWRITES:
      expr = expr.replace(old, new)
    value, used = eval_expression(expr.strip())
    used = Counter(used)
    if any(used[k] > numbers[k] for k in used) or (spec.get("use_all", False) and used != numbers):
      return 0.0
    return float(value == target)
  except Exception:  # noqa: BLE001
    return 0.0


def last_number(response: str) -> str | None:
  """The number last_number_reward scores: the first number of extract_answer(response) when the response
  has a \\boxed{}/"Answer:"/"answer is", else the last number in it (the GSM8K "last number" rule):
  "43 + 30 = 73" → "73", "The answer is 73. Then 5" → "73"; None without a number. Only the last
  MAX_TAIL_CHARS characters are scanned."""
  tail = response[-MAX_TAIL_CHARS:]
  marked = extract_answer(tail)
  numbers = _NUMBER.findall(marked) if marked is not None else []
  numbers = numbers[:1] or _NUMBER.findall(tail)[-1:]
  return numbers[0] if numbers else None


def last_number_reward(response: str, ground_truth: str) -> float:
  """1.0 iff last_number(response) equals the ground truth exactly (as exact_reward compares them)."""
  try:
    number = last_number(response)
    return exact_reward(number, ground_truth) if number is not None else 0.0
  except Exception:  # noqa: BLE001
    return 0.0


# ------------------------------------------------------------------------------------------ registry


REWARDS = Registry("reward", {"math": math_reward, "exact": exact_reward, "last_number": last_number_reward,
                              "countdown": countdown_reward})  # REWARDS.register(name, fn) adds one


def get_reward(name: str) -> RewardFn:
  """The verifier registered under `name`."""
  return REWARDS.lookup(name)


def score_batch(fn: RewardFn | str, responses: Sequence[str], truths: Sequence[str]) -> np.ndarray:
  """float32[N] rewards: fn(responses[i], truths[i]). fn is a verifier or its registry name."""
  if isinstance(fn, str):
    fn = get_reward(fn)
  if len(responses) != len(truths):
    raise ValueError(f"score_batch: {len(responses)} responses but {len(truths)} truths")
  return np.asarray([fn(r, t) for r, t in zip(responses, truths)], dtype=np.float32)
