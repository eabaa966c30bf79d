"""Hostile model outputs, property-based: every registered verifier gets generated text (huge numbers, deep
LaTeX nesting, unbalanced braces, control characters, 1 MB strings, arbitrary unicode), returns 0.0 or 1.0
within its time limit, and never compiles or evaluates model text (an audit hook watches `compile`/`exec`)."""

import json
import re
import sys
import time
import traceback

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from next_jax.rl import rewards

LIMIT_S = 0.5  # math_reward's budget in these tests (its default is MATH_TIMEOUT_S = 2 s)
SLACK_S = 1.0  # signal delivery + a loaded shared machine
PLAIN_LIMIT_S = 0.5  # exact/countdown have no timer: they must be fast by construction
GOLDS = {"math": ["1", "\\frac{1}{2}", "x^2+2x+1", "2^{10}", "\\sqrt{2}"],
         "exact": ["7", "007", "-3.5"],
         "last_number": ["7", "953", "-3.5"],
         "countdown": [json.dumps({"target": 24, "numbers": [3, 8, 1]}),
                       json.dumps({"target": 10, "numbers": [2, 5, 7], "use_all": True})]}
try:  # reasoning-gym's verifiers (registered when rg_tasks is imported): golds are our locators
  from next_jax.rl import rg_tasks, tasks
  _RG = [p.answer for name in ("rg:basic_arithmetic", "rg:countdown") for p in tasks.make_task(name, 2, 0, "test")]
  GOLDS.update({v: _RG for v in rg_tasks.EXTRACTORS})
except ImportError:  # the test extra installs reasoning-gym; without it these verifiers are not registered
  pass
# what rg_tasks lets reach reasoning-gym's countdown scorer (its arithmetic gate) compiles, tokenised by sympy,
# to integers and operators only
RG_ARITHMETIC = re.compile(r"from sympy import \*|(Integer \(\d+ \)|[\s+\-*/()])*")
COUNTS = {}
# the deadline may fire inside a gc callback, where Python reports it as unraisable (rewards.py docstring)
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.usefixtures("frozen_heap")]


class NoEval:
  """An audit hook (installed once, armed per call) recording source text compiled for eval/exec by a
  string parser: sympy's parse_expr/sympify, or code of the verifiers and the libraries they call directly.
  sympy's own code generation (e.g. polys' monomial functions, built from templates) is not model text."""

  armed, seen = False, []
  PARSERS = ("sympy/parsing/", "sympy/core/sympify.py", "math_verify/", "latex2sympy2_extended/", "next_jax/")

  @classmethod
  def hook(cls, event, args):
    if not cls.armed or event != "compile" or not isinstance(args[0], (str, bytes)):
      return
    frame, files = sys._getframe(1), []
    while frame is not None:
      files.append(frame.f_code.co_filename)
      frame = frame.f_back
    if any("importlib._bootstrap" in f for f in files):
      return  # a lazily imported module's body (sympy.physics.units sympifies constant names)
    if any(f == traceback.__file__ for f in files):
      return  # Python ≥ 3.11 ast.parses *our* source lines to place carets when a traceback is formatted
      # (e.g. pytest reporting a deadline that fired inside a gc callback as unraisable)
    caller = files[0]  # the frame that called compile/eval/exec
    if any(p in f for f in files for p in cls.PARSERS[:2]) or any(p in caller for p in cls.PARSERS[2:]) \
        or caller == __file__:
      cls.seen.append(args[0] if isinstance(args[0], str) else args[0].decode("utf-8", "replace"))


sys.addaudithook(NoEval.hook)

# ------------------------------------------------------------------------------------------ strategies

fragments = st.one_of(
    st.integers(min_value=0, max_value=10**400).map(str),  # huge numbers
    st.integers(1, 12).map(lambda k: "9" * k + "^{" + "9" * k + "}"),  # power towers
    st.integers(1, 6).map(lambda k: "10" + "^{10" * k + "}" * k),
    st.integers(1, 9).map(lambda k: "1" + "0" * k + "!"),  # big factorials
    st.integers(1, 400).map(lambda d: "\\frac{" * d + "1" + "}{2}" * d),  # deep LaTeX nesting
    st.integers(1, 400).map(lambda d: "\\sqrt{" * d + "x" + "}" * d),
    st.integers(1, 2000).map(lambda d: "{" * d), st.integers(1, 2000).map(lambda d: "}" * d),
    st.text(alphabet="{}[]()\\^_$ boxed", max_size=60),  # unbalanced braces and box fragments
    st.text(alphabet=st.characters(categories=["Cc", "Cs", "Co"]), max_size=20),  # control chars, surrogates
    st.text(max_size=40),  # any unicode
    st.sampled_from(["\\boxed{", "}", "Answer: ", "\\fbox{", "\\left(", "\\right)", "$", "=", "*", "/",
                     "\\div", "\\times", "__import__('os')", "lambda: 0", "Symbol('x')", "\\begin{matrix}", "\\\\"]),
)
wrappers = st.sampled_from(["{}", "\\boxed{{{}}}", "Answer: {}", "The answer is \\boxed{{{}}}.", "$${}$$",
                            "\\boxed{{\\boxed{{{}}}}}", "{}\\boxed{{1}}"])
responses = st.builds(lambda parts, w: w.format("".join(parts)), st.lists(fragments, max_size=8), wrappers)
one_mb = st.builds(lambda frag, w: w.format((frag or "{") * (1_000_000 // max(len(frag), 1) + 1))[:1_100_000],
                   st.one_of(fragments.filter(lambda f: 0 < len(f) <= 400)), wrappers)


def check_all(text: str, key: str) -> None:
  """Every verifier on `text` against one of its golds: a float in {0, 1}, in time, nothing evaluated."""
  COUNTS[key] = COUNTS.get(key, 0) + 1
  for name, fn in rewards.REWARDS.items():
    for gold in GOLDS[name][COUNTS[key] % len(GOLDS[name]):][:1]:  # golds in rotation
      kwargs = {"timeout_s": LIMIT_S} if name == "math" else {}
      NoEval.armed = True
      t = time.perf_counter()
      try:
        r = fn(text, gold, **kwargs)
      finally:
        NoEval.armed = False
      took = time.perf_counter() - t
      if name.startswith("rg"):
        NoEval.seen[:] = [x for x in NoEval.seen if not RG_ARITHMETIC.fullmatch(x)]
      assert r in (0.0, 1.0) and isinstance(r, float), (name, r)
      assert took < (LIMIT_S if name == "math" else PLAIN_LIMIT_S) + SLACK_S, (name, took, text[:200])
      assert not NoEval.seen, (name, [x[:80] for x in NoEval.seen[:3]], text[:200])


def _settings(n):
  return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))


def test_every_registered_verifier_has_golds():
  assert set(rewards.REWARDS) == set(GOLDS), "add golds for a new verifier here, or it goes unfuzzed"


def test_verifiers_are_warm_and_the_audit_hook_sees_eval():
  rewards.math_reward("\\boxed{1}", "1")  # imports math-verify/sympy outside any timed call
  NoEval.armed = True
  eval("1 + 1")  # noqa: S307  (the hook must see this, or the property tests prove nothing)
  NoEval.armed = False
  assert any("1 + 1" in s for s in NoEval.seen), NoEval.seen
  NoEval.seen.clear()
  try:  # a deadline that fires in a gc callback inside sympify is reported as unraisable: formatting its
    raise rewards._Deadline()  # traceback parses this source line, which is not model text
  except rewards._Deadline as e:
    in_sympify = compile("traceback.format_exception(e)", "/site-packages/sympy/core/sympify.py", "exec")
    NoEval.armed = True
    exec(in_sympify, {"traceback": traceback, "e": e})  # noqa: S102
    NoEval.armed = False
  assert not NoEval.seen, NoEval.seen
  assert rewards.math_reward("The answer is \\boxed{\\frac{2}{4}}", "\\frac{1}{2}") == 1.0
  assert not NoEval.seen


@_settings(9000)
@given(responses)
def test_generated_hostile_text(text):
  check_all(text, "hostile")


@_settings(1000)
@given(st.text(max_size=300))
def test_arbitrary_unicode(text):
  check_all(text, "unicode")


@_settings(60)
@given(one_mb)
def test_one_megabyte_strings(text):
  assert len(text) >= 1_000_000
  check_all(text, "1MB")


def test_at_least_ten_thousand_strings_were_tried():
  assert sum(COUNTS.values()) >= 10_000, COUNTS


@pytest.mark.parametrize("text", ["\\boxed{4\ud800}", "Answer: \udfff 7", "\\boxed{\ud83d}\\boxed{5}"])
def test_lone_surrogates_neither_raise_nor_hide_the_answer(text):
  """A lone surrogate (valid in a Python str, not encodable as UTF-32 strictly) used to make the linear-time
  box scan raise UnicodeEncodeError."""
  expected = {"\\boxed{4\ud800}": "4\ud800", "Answer: \udfff 7": "\udfff 7", "\\boxed{\ud83d}\\boxed{5}": "5"}
  assert rewards.extract_answer(text) == expected[text]
  check_all(text, "surrogate")


@pytest.mark.parametrize("text, gold", [("\\boxed{\\gcd(0.5, 1)}", "0.5"), ("\\boxed{\\lcm(4, 6)}", "12"),
                                        ("\\boxed{\\gcd(12, 18)}", "6"), ("\\boxed{\\lcm(0.25, 2)}", "2")])
def test_gcd_and_lcm_are_exact_and_evaluate_no_string(text, gold):
  """latex2sympy's \\gcd/\\lcm called sympy.nsimplify, which sympifies a string built from a float argument
  (the audit hook saw 'from sympy import *' compiled); rewards._gcd_lcm converts floats exactly instead."""
  rewards.math_reward("\\boxed{1}", "1")  # warm: imports compile code legitimately
  NoEval.seen.clear()
  NoEval.armed = True
  try:
    r = rewards.math_reward(text, gold, timeout_s=LIMIT_S + SLACK_S)
  finally:
    NoEval.armed = False
  assert r == 1.0 and not NoEval.seen, NoEval.seen[:3]
