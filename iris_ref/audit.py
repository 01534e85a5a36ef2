"""Audit any implementation of an IRIS/SPIN/SPACE/SPIF loss against the golden vectors.

Calling convention of the audited ("foreign") function::

    fn(policy_real_logps, policy_synthetic_logps, opponent_real_logps, opponent_synthetic_logps,
       **constants) -> loss tensor, or an object with a ``.loss`` attribute, or a mapping with "loss"

The four log-prob vectors are passed positionally as 1-D tensors (``--dtype``, float64 by
default); the first two require grad. Constants are passed as keywords with the reference
names (``alpha``, ``beta``, ``mu``, ``reward_bound``, and for weighted cases ``real_weights``,
``synthetic_weights`` or, for SPIN, ``pair_weights`` as 1-D tensors). Constants whose golden
value is None (SPIF without a bound) are not passed at all. ``arg_map`` / ``--arg-map
alpha=order,beta=temperature`` renames keywords for implementations that spell them
differently. SPIN, SPACE and SPIF are weighted MEANS over the batch (uniform weights 1/N), not
sums; code without sample weights (paired DPO-style code) is audited with ``--weights uniform``.

What is checked, per golden case: the loss value, and the autograd gradients with respect to
the two policy vectors, which must equal ``-beta * a`` and ``+beta * b`` (THEORY.md §2, the a, b
stored in the golden file). If the returned object also carries ``real_weights`` and
``synthetic_weights`` tensors (as the reference's ``ObjectiveOutput`` does), they are checked
against a and b too. A quantity x passes when ``|x - expected| <= atol + rtol * |expected|``
elementwise and x is finite. Defaults: rtol = atol = 1e-10 for float64, 1e-3 for float32 (the
float32 rounding of log-probs near -1000 alone moves a reward by ~1e-5). Each report line shows
the element closest to failing with its absolute error and its relative error
|x - expected| / |expected| (absolute error only where the expected value is 0).

Anything the audited code raises fails its case (SystemExit too; only KeyboardInterrupt stops
the audit). A wrong signature or return value is a contract error, printed once however many
cases it fails; hints name the likely cause where it is clear (missing sample weights, a sum for
a mean) and exceptions show the audited code's file and line.

With float64 inputs, two numerical causes get verdicts of their own when they explain every
failing case: "matches up to float32 rounding" (the audited code made float32 tensors, and each
value is within its case's float32 error bound, ``_within_float32_rounding``) and "matches up to
the softplus threshold" (each value matches the reference recomputed with torch's thresholded
softplus to the float64 tolerance, ``_explained_by_softplus_threshold``).

Command line: ``python -m iris_ref.audit --impl module:function --objective iris`` (see
``--help``). Exit status: 0 every selected case passes; 1 the mathematics is wrong (a mismatch
no numerical cause explains) or the audited code raised; 2 an adapter or usage problem: a case
failed on the calling convention and no value was wrong, or the arguments are wrong (unknown
objective, unimportable ``--impl``, no case matching the given constants); 3 the mathematics is
right: every failing case matches only up to a named numerical cause.
Python: ``audit(fn, "iris", constants={"alpha": 0.5}) -> AuditReport`` (``.verdict``, ``.exit_status``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.resources
import importlib.util
import json
import math
import re
import sys
import sysconfig
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from iris_ref import objectives as reference  # re-evaluated to test numerical explanations

OBJECTIVES = ("iris", "spin", "space", "spif")
LOGP_NAMES = ("policy_real_logps", "policy_synthetic_logps", "opponent_real_logps", "opponent_synthetic_logps")
SCALAR_CONSTANTS = {
    "iris": ("alpha", "beta"),
    "spin": ("beta",),
    "space": ("mu", "beta"),
    "spif": ("beta", "reward_bound"),
}
DEFAULT_TOLERANCE = {"float64": 1e-10, "float32": 1e-3}
DTYPES = {"float64": torch.float64, "float32": torch.float32}
# The golden vectors ship inside the package (package data "golden/*.json"), so the audit
# works from any folder after `pip install .`, not only from a checkout.
DEFAULT_GOLDEN_DIR = importlib.resources.files("iris_ref") / "golden"
WEIGHT_SELECTIONS = ("all", "uniform", "weighted")
_UNSET = object()  # --reward-bound not given (None means "the unbounded cases")


class AuditUsageError(ValueError):
    """A problem with the audit's arguments (not a failure of the audited function)."""


class ContractError(Exception):
    """The audited function does not follow the calling convention (its signature, or what it
    returns), so its values could not be compared: the adapter is wrong, not necessarily the
    mathematics. ``key`` says when two cases failed "the same way": it leaves out what varies
    from case to case (a shape, a batch size)."""

    def __init__(self, message: str, key: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.key = key or message
        self.hint = hint


# TypeErrors that Python raises when a call does not match the signature. The audit passes the
# same arguments (up to the weight keywords) to every case, so these are the adapter's fault.
_SIGNATURE_ERROR = re.compile(
    r"unexpected keyword argument|missing \d+ required|takes \d+ positional|takes from \d+ to \d+ positional"
    r"|takes no arguments|got multiple values for argument|positional-only arguments passed as keyword"
)


# --------------------------------------------------------------------------------------------
# Golden cases
# --------------------------------------------------------------------------------------------


def golden_path(objective: str, golden_dir: str | Path | None = None) -> Path:
    if objective not in OBJECTIVES:
        raise AuditUsageError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    directory = Path(golden_dir) if golden_dir is not None else DEFAULT_GOLDEN_DIR
    path = directory / f"{objective}.json"
    if not path.is_file():
        raise AuditUsageError(f"golden file not found: {path} (pass --golden DIR)")
    return path


def load_golden(objective: str, golden_dir: str | Path | None = None) -> list[dict]:
    """All golden cases of one objective, as stored in ``<golden_dir>/<objective>.json``."""
    path = golden_path(objective, golden_dir)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AuditUsageError(f"cannot read golden file {path}: {exc}") from None
    if document.get("objective") != objective or not isinstance(document.get("cases"), list):
        raise AuditUsageError(f"{path} is not a golden file for {objective!r}")
    return document["cases"]


def _constant_matches(stored, wanted) -> bool:
    if wanted is None or stored is None:
        return wanted is None and stored is None
    return math.isclose(float(stored), float(wanted), rel_tol=1e-12, abs_tol=0.0)


def select_cases(
    cases: list[dict],
    objective: str,
    constants: Mapping | None = None,
    weights: str = "all",
    name_contains: str | None = None,
) -> list[dict]:
    """Cases whose constants equal every given one (``reward_bound=None`` selects unbounded
    SPIF cases), restricted to uniform or weighted cases if asked, and whose name contains
    ``name_contains``."""
    constants = dict(constants or {})
    unknown = set(constants) - set(SCALAR_CONSTANTS[objective])
    if unknown:
        raise AuditUsageError(
            f"{objective} has no constant {', '.join(sorted(unknown))}; its constants are {', '.join(SCALAR_CONSTANTS[objective])}"
        )
    if weights not in WEIGHT_SELECTIONS:
        raise AuditUsageError(f"weights must be one of {', '.join(WEIGHT_SELECTIONS)}, got {weights!r}")
    selected = []
    for case in cases:
        if any(not _constant_matches(case["constants"].get(k), v) for k, v in constants.items()):
            continue
        if weights == "uniform" and case["weights"]:
            continue
        if weights == "weighted" and not case["weights"]:
            continue
        if name_contains and name_contains not in case["name"]:
            continue
        selected.append(case)
    if not selected:
        available = sorted({json.dumps(c["constants"], sort_keys=True) for c in cases})
        wanted = ", ".join(f"{k}={v}" for k, v in constants.items()) or "(no constant filter)"
        raise AuditUsageError(
            f"no golden {objective} case matches {wanted} (weights={weights}"
            + (f", name contains {name_contains!r}" if name_contains else "")
            + f"); available constants: {'; '.join(available)}"
        )
    return selected


# --------------------------------------------------------------------------------------------
# Foreign implementations
# --------------------------------------------------------------------------------------------


def load_impl(spec: str) -> Callable:
    """Resolve ``module:function`` (or ``path/to/file.py:function``; dotted attributes allowed)."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise AuditUsageError(f"--impl must look like module:function or path/to/file.py:function, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise AuditUsageError(f"--impl file not found: {file}")
            module_spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except AuditUsageError:
        raise
    except (Exception, SystemExit) as exc:  # an import can raise anything, even SystemExit
        raise AuditUsageError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    target = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise AuditUsageError(f"{module_name!r} has no attribute {attr_path!r}")
        target = getattr(target, part)
    if not callable(target):
        raise AuditUsageError(f"{spec!r} is not callable")
    return target


def parse_arg_map(text: str | None) -> dict[str, str]:
    """``"alpha=order,beta=temperature"`` -> ``{"alpha": "order", "beta": "temperature"}``."""
    if not text:
        return {}
    mapping = {}
    for item in text.split(","):
        ref_name, sep, foreign_name = item.strip().partition("=")
        if not sep or not ref_name.strip() or not foreign_name.strip() or not foreign_name.strip().isidentifier():
            raise AuditUsageError(f"--arg-map entries must look like reference_name=foreign_name, got {item!r}")
        mapping[ref_name.strip()] = foreign_name.strip()
    return mapping


_NUMBER_HINT = "return the loss tensor itself: a Python number (loss.item(), float(loss)) carries no gradient"


def _extract_loss(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"]
    if hasattr(output, "loss"):
        return output.loss
    kind = type(output).__name__
    raise ContractError(
        f"returned {kind}; expected a loss tensor, an object with .loss or a mapping with 'loss'",
        key=f"returned {kind}",
        hint=_NUMBER_HINT if isinstance(output, (int, float)) else None,
    )


def _returned_weights(output):
    """(a, b) if the output carries weight tensors, else None."""
    if isinstance(output, torch.Tensor):
        return None
    get = output.get if isinstance(output, Mapping) else (lambda k: getattr(output, k, None))
    a, b = get("real_weights"), get("synthetic_weights")
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a, b
    return None


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Error of one checked quantity (scalar or vector) against its expected value.

    ``worst_index`` is the element closest to failing (largest ratio); ``actual``, ``expected``,
    ``abs_error`` and ``rel_error`` all describe that one element, so a printed line never mixes
    the values of one element with the relative error of another. ``rel_error`` is
    |actual - expected| / |expected|, and None where the expected value is exactly 0 (the loss
    at policy = opponent, a clamped SPIF weight): there only the absolute error means anything.
    """

    quantity: str
    worst_index: int | None  # None for the scalar loss
    ratio: float  # |error| / (atol + rtol*|expected|) at worst_index; > 1 fails, inf if not finite
    actual: float
    expected: float
    abs_error: float  # inf if actual is not finite
    rel_error: float | None
    max_abs_error: float  # over the whole vector, for the report's "largest absolute errors"

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0


def compare(quantity: str, actual: torch.Tensor, expected: list[float], rtol: float, atol) -> Comparison:
    """``atol``: a number, or a tensor of per-element bounds (the float32 rounding bound)."""
    actual = actual.detach().to(torch.float64).reshape(-1)
    expected_t = torch.tensor(expected, dtype=torch.float64).reshape(-1)
    if actual.shape != expected_t.shape:
        raise ContractError(f"{quantity} has shape {tuple(actual.shape)}, expected {tuple(expected_t.shape)}", key=f"{quantity} shape")
    # a NaN error would compare as "not worse" than anything: count non-finite values as inf
    error = torch.where(torch.isfinite(actual), (actual - expected_t).abs(), torch.full_like(actual, math.inf))
    ratio = torch.where(error == 0, 0.0, error / (atol + rtol * expected_t.abs()))  # 0/0 with atol = 0
    worst = int(torch.argmax(ratio))
    abs_error, want = float(error[worst]), float(expected_t[worst])
    return Comparison(
        quantity=quantity,
        worst_index=worst if expected_t.numel() > 1 else None,
        ratio=float(ratio[worst]),
        actual=float(actual[worst]),
        expected=want,
        abs_error=abs_error,
        rel_error=abs_error / abs(want) if want != 0 else None,
        max_abs_error=float(error.max()),
    )


@dataclass
class CaseResult:
    name: str
    constants: dict
    weighted: bool
    passed: bool
    comparisons: list[Comparison] = field(default_factory=list)
    error: str | None = None  # why no value could be compared: what the audited function raised
    contract: bool = False  # the error is a calling-convention problem (see ContractError)
    error_key: str | None = None  # equal for cases that failed the same way
    hint: str | None = None  # the likely fix of a contract error, where it is clear
    batch_scaled: bool = False  # the loss or its gradients are N times the expected ones (a sum, not a mean)
    float32_seen: bool = False  # the audited code computed a float32 tensor in this case
    cause: str | None = None  # the numerical cause that explains this failing case (see _diagnose)

    @property
    def worst(self) -> Comparison | None:
        return max(self.comparisons, key=lambda c: c.ratio, default=None)


def _float_list(values) -> list[float]:
    return [float(v) for v in values]


def _describe_exception(exc: BaseException) -> str:
    if isinstance(exc, ContractError):
        return str(exc)
    if isinstance(exc, SystemExit):  # str(SystemExit(None)) is empty; say what happened
        return f"SystemExit({exc.code!r}): the audited code called sys.exit"
    try:
        text = str(exc)
    except Exception:  # a foreign exception's __str__ can fail too; the audit must go on
        text = "<message unprintable>"
    return f"{type(exc).__name__}: {text}"


def _record_error(result: CaseResult, exc: BaseException, arg_map: Mapping, passed: Iterable[str]) -> None:
    """Fill in why ``result``'s case produced no value, whether the adapter is to blame, and a
    hint where the cause is clear. ``passed``: the keywords the audited function was given."""
    result.error = _describe_exception(exc)
    location = _foreign_location(exc)
    if isinstance(exc, ContractError):
        result.contract, result.error_key, result.hint = True, exc.key, exc.hint
    elif isinstance(exc, TypeError) and _SIGNATURE_ERROR.search(result.error):
        result.contract, result.error_key = True, result.error
        result.hint = _signature_hint(result.error, arg_map, passed)
    else:
        result.error_key = result.error
    if location is not None:
        result.error += f" (at {location})"


class _Float32Spy(TorchFunctionMode):
    """Sees every torch call of the audited code: did any produce a float32 tensor? Evidence that
    float32 rounding is at work even where the loss comes back as float64 (float32 constants)."""

    seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen = self.seen or any(getattr(t, "dtype", None) == torch.float32 for t in (out if isinstance(out, (tuple, list)) else (out,)))
        return out


def _run_foreign(fn: Callable, inputs: list[torch.Tensor], kwargs: dict):
    """Everything that executes the audited code: the call, reading the loss and weights off its
    output (a property can run code), and the backward pass (custom autograd functions).
    Returns (loss, grad_real, grad_synthetic, returned weights or None)."""
    policy_real, policy_synthetic = inputs[0], inputs[1]
    output = fn(*inputs, **kwargs)
    loss = _extract_loss(output)
    if not isinstance(loss, torch.Tensor):
        kind = type(loss).__name__
        raise ContractError(f"the loss is a {kind}, not a tensor", key=f"loss is {kind}", hint=_NUMBER_HINT)
    if loss.numel() != 1:
        raise ContractError(
            f"the loss has shape {tuple(loss.shape)}; expected one number (a 0-d or one-element tensor)",
            key="loss not scalar",
            hint="one value per sample or pair is not yet the loss: SPIN, SPACE and SPIF take the weighted mean "
            "of the per-sample terms (weights 1/N when uniform)",
        )
    loss = loss.reshape(())
    if not loss.requires_grad:
        raise ContractError("the loss does not depend differentiably on the policy log-probs (detached, .item() or no_grad?)")
    grad_real, grad_synthetic = torch.autograd.grad(loss, [policy_real, policy_synthetic], allow_unused=True)
    # an input the loss ignores has gradient zero, which is what autograd's None means here
    if grad_real is None:
        grad_real = torch.zeros_like(policy_real)
    if grad_synthetic is None:
        grad_synthetic = torch.zeros_like(policy_synthetic)
    return loss, grad_real, grad_synthetic, _returned_weights(output)


def _case_arguments(case: dict, dtype: torch.dtype, arg_map: Mapping) -> tuple[list[torch.Tensor], dict]:
    """The four log-prob tensors (the policy ones requiring grad) and the keywords of one case."""
    inputs = [torch.tensor(case["inputs"][k], dtype=dtype) for k in LOGP_NAMES]
    inputs[0].requires_grad_()
    inputs[1].requires_grad_()
    kwargs = {arg_map.get(k, k): v for k, v in case["constants"].items() if v is not None}
    for k, v in case["weights"].items():
        kwargs[arg_map.get(k, k)] = torch.tensor(v, dtype=dtype)
    return inputs, kwargs


def evaluate_case(fn: Callable, case: dict, dtype: torch.dtype, rtol: float, atol: float, arg_map: Mapping) -> CaseResult:
    """Run ``fn`` on one golden case and compare value, gradients and returned weights."""
    inputs, kwargs = _case_arguments(case, dtype, arg_map)
    result = CaseResult(name=case["name"], constants=dict(case["constants"]), weighted=bool(case["weights"]), passed=False)
    expected = case["expected"]
    beta = float(case["constants"]["beta"])
    try:
        with _Float32Spy() as spy:
            loss, grad_real, grad_synthetic, returned = _run_foreign(fn, inputs, kwargs)
    except KeyboardInterrupt:  # the user stopping the audit, not a property of the audited code
        raise
    except BaseException as exc:  # anything else fails this case, SystemExit included: a
        # sys.exit(0) in the audited code must not end the audit with status 0, read as a pass
        _record_error(result, exc, arg_map, kwargs)
        return result
    a = _float_list(expected["real_weights"])
    b = _float_list(expected["synthetic_weights"])
    checks = [
        ("loss", loss, [float(expected["loss"])]),
        ("dloss/dpolicy_real", grad_real, [-beta * x for x in a]),
        ("dloss/dpolicy_synthetic", grad_synthetic, [beta * x for x in b]),
    ]
    if returned is not None:
        checks += [("real_weights", returned[0], a), ("synthetic_weights", returned[1], b)]
    try:
        result.comparisons = [compare(q, actual, exp, rtol, atol) for q, actual, exp in checks]
    except ContractError as exc:  # returned weights of the wrong shape
        _record_error(result, exc, arg_map, kwargs)
        return result
    result.passed = all(c.passed for c in result.comparisons)
    result.float32_seen = spy.seen and dtype == torch.float64  # float32 inputs would make it trivial
    if not result.passed:
        result.batch_scaled = _scaled_by_batch_size(checks, rtol, atol)
        result._checks = checks  # the foreign tensors, for _diagnose (not a field: kept out of the JSON)
    return result


def _describe_error(c: Comparison) -> str:
    if c.rel_error is None:
        return f"abs err {c.abs_error:.2e} (expected 0: no relative error)"
    return f"abs err {c.abs_error:.2e}, rel err {c.rel_error:.2e}"


def _describe_case(r: CaseResult) -> str:
    """The worst quantity of a case that ran; for a failing case, its value and what failed."""
    worst = r.worst
    where = f"[{worst.worst_index}]" if worst.worst_index is not None else ""
    if r.passed:
        return f"worst {worst.quantity}{where}: {_describe_error(worst)}"
    failing = ", ".join(c.quantity for c in r.comparisons if not c.passed)
    return f"worst {worst.quantity}{where}: {worst.actual!r}, expected {worst.expected!r}, {_describe_error(worst)}; failing: {failing}"


# --------------------------------------------------------------------------------------------
# Diagnoses: hints where the cause of a failure is clear
# --------------------------------------------------------------------------------------------

WEIGHT_KEYWORDS = ("real_weights", "synthetic_weights", "pair_weights")
_AUDIT_FILE = Path(__file__).resolve()
_TORCH_DIR = Path(torch.__file__).resolve().parent
_STDLIB_DIR = Path(sysconfig.get_paths()["stdlib"]).resolve()
FLOAT32_ROUNDING = "float32 rounding"
FLOAT32_UNIT = 2.0**-24  # float32's unit roundoff: the relative error of one rounding
FLOAT32_STEPS = 16  # roundings on the longest path from a log-prob to a checked value, see _within_float32_rounding
# torch's default first. Above 36 the error log1p(e^-x) < 2.3e-16 is below float64 resolution;
# below 10 (an error above e^-10 = 4.5e-5) a "threshold" is a different formula, not a rounding trade-off
SOFTPLUS_THRESHOLDS = (20, *range(10, 37))


def _is_foreign_frame(filename: str) -> bool:
    """A frame of the audited code: not the audit itself, not torch, not the standard library
    (where a foreign call only ends up raising; the line that called it is more useful)."""
    path = Path(filename).resolve()
    if path == _AUDIT_FILE or path.is_relative_to(_TORCH_DIR):
        return False
    in_site_packages = "site-packages" in path.parts or "dist-packages" in path.parts
    return in_site_packages or not path.is_relative_to(_STDLIB_DIR)


def _foreign_location(exc: BaseException) -> str | None:
    """``file:line in function`` of the innermost frame of the audited code in ``exc``'s
    traceback; None when the error arose in the audit's own call (a signature mismatch)."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if _is_foreign_frame(frame.filename):
            path = Path(frame.filename)
            shown = path.relative_to(Path.cwd()) if path.is_absolute() and path.is_relative_to(Path.cwd()) else path
            return f"{shown}:{frame.lineno} in {frame.name}"
    return None


def _signature_hint(message: str, arg_map: Mapping, passed: Iterable[str]) -> str:
    reference_name = {foreign: ref for ref, foreign in arg_map.items()}
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", message)
    if unexpected:
        foreign = unexpected.group(1)
        ref = reference_name.get(foreign, foreign)
        if ref in WEIGHT_KEYWORDS:  # paired or DPO-style code without sample weights
            return (
                f"the function takes no {foreign}: audit the uniform cases only with --weights uniform "
                f'(Python: weights="uniform"), or, if it takes sample weights under another name, --arg-map {ref}=NAME'
            )
        return f"the function has no keyword {foreign!r}: if it names {ref} differently, rename it with --arg-map {ref}=NAME"
    if "missing" in message or "keyword" in message:
        return f"the audit passes the keywords {', '.join(passed)}; rename them with --arg-map reference=foreign"
    return "the four log-prob vectors come positionally: fn(" + ", ".join(LOGP_NAMES) + ", **constants)"


def _scaled_by_batch_size(checks: list, rtol: float, atol: float) -> bool:
    """True if the gradients are N and M times the expected ones (N annotated, M synthetic
    samples), or, for pairs (N = M), the loss is N times the expected loss: the mark of a sum
    where the objective takes a mean (weights 1/N). ``checks``: evaluate_case's (quantity,
    actual, expected) for the loss and the two gradients."""
    (_, loss, loss_want), (_, grad_real, real_want), (_, grad_synthetic, synthetic_want) = checks[:3]
    n, m = len(real_want), len(synthetic_want)

    def scaled(actual, want, factor) -> bool:
        if not any(want):  # all zeros: any factor fits
            return False
        return compare("", actual, [factor * x for x in want], rtol, factor * atol).passed

    gradients = scaled(grad_real, real_want, n) and scaled(grad_synthetic, synthetic_want, m)
    return gradients or (n == m and scaled(loss, loss_want, n))


def _within_float32_rounding(objective: str, case: dict, checks: list, rtol: float, atol: float) -> bool:
    """Every checked value within float32 rounding of the exact one, to first order (docs/audit.md):

        |x - expected| <= tol64 + STEPS*u*(S + E*|expected|) + tiny32,   u = 2^-24

    S: rounding a log-prob p (or o), or a reward (|r| <= beta*(|p| + |o|)), moves it by u*(|p| + |o|)
    at most, so x moves by u*S, S = sum_l |dx/dp_l|*(|p_l| + |o_l|) (d/do = -d/dp), dx/dp the golden
    gradient for the loss, the reference's float64 Hessian for gradients (over beta for weights).
    E = 1 + tau*max|r|: a weight e^y carries the error u*|y| of its exponent, |y| <= tau*max|r|, tau
    the largest factor on a reward in an exponential (IRIS max(alpha, |1-alpha|), SPIN, SPACE 1, SPIF
    0). tiny32: float32 flushes smaller weights. STEPS = 16 roundings on a path (casts, difference,
    beta, tilt, log-weight, exp, up to 6 sums, log, ...); the reference in float32 needs 3.7."""
    (pr, ps, orr, os_), kwargs = _case_arguments(case, torch.float64, {})
    n, beta, constants = pr.numel(), float(case["constants"]["beta"]), case["constants"]
    size = torch.cat([pr.detach().abs() + orr.abs(), ps.detach().abs() + os_.abs()])
    loss = lambda p: reference.OBJECTIVES[objective](p[:n], p[n:], orr, os_, **kwargs).loss  # noqa: E731
    moved = torch.autograd.functional.hessian(loss, torch.cat([pr, ps]).detach()).abs() @ size
    gradient = torch.tensor(checks[1][2] + checks[2][2], dtype=torch.float64)
    sensitivity = [gradient.abs() @ size, moved[:n], moved[n:], moved[:n] / beta, moved[n:] / beta]
    tau = max(constants["alpha"], abs(1 - constants["alpha"])) if objective == "iris" else float(objective != "spif")
    rewards = case["expected"]["real_rewards"] + case["expected"]["synthetic_rewards"]
    step, tiny = FLOAT32_STEPS * FLOAT32_UNIT, torch.finfo(torch.float32).tiny
    rtol32 = rtol + step * (1 + tau * max(abs(float(x)) for x in rewards))
    return all(compare(q, x, want, rtol32, atol + step * s + tiny).passed for (q, x, want), s in zip(checks, sensitivity))


def _explained_by_softplus_threshold(objective: str, case: dict, result: CaseResult, threshold: int, rtol: float, atol: float) -> bool:
    """Every failing value agrees to the float64 tolerance with the reference recomputed with
    torch's softplus(x, threshold), which returns x itself above the threshold."""
    inputs, kwargs = _case_arguments(case, torch.float64, {})
    with mock.patch.object(reference, "_softplus", lambda x: F.softplus(x, threshold=threshold)):
        loss = reference.OBJECTIVES[objective](*inputs, **kwargs).loss
    grad_real, grad_synthetic = torch.autograd.grad(loss, inputs[:2])
    beta = float(case["constants"]["beta"])
    expected = [loss.detach().reshape(1), grad_real, grad_synthetic, -grad_real / beta, grad_synthetic / beta]
    checks = zip(result.comparisons, result._checks, expected)
    return all(c.passed or compare(q, actual, e.tolist(), rtol, atol).passed for c, (q, actual, _), e in checks)


def _diagnose(objective: str, cases: list[dict], results: list[CaseResult], rtol: float, atol: float) -> None:
    """Set ``cause`` on failing cases that a numerical cause explains. A softplus threshold must
    explain every failing case (it is one function); float32 rounding is judged case by case."""
    failing = [(case, r) for case, r in zip(cases, results) if hasattr(r, "_checks")]
    if objective in ("spin", "space") and failing:
        fits = [t for t in SOFTPLUS_THRESHOLDS if all(_explained_by_softplus_threshold(objective, c, r, t, rtol, atol) for c, r in failing)]
        if fits:
            # the golden cases tell apart only thresholds with a softplus argument between them
            which = "20, torch's default" if fits[0] == 20 else f"between {min(fits)} and {max(fits)}"
            for _, r in failing:
                r.cause = f"the softplus threshold ({which})"
            return
    for case, r in failing:
        if r.float32_seen and _within_float32_rounding(objective, case, r._checks, rtol, atol):
            r.cause = FLOAT32_ROUNDING


@dataclass
class AuditReport:
    objective: str
    impl: str
    dtype: str
    rtol: float
    atol: float
    golden: str
    results: list[CaseResult]

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    @property
    def exit_status(self) -> int:
        """0 every case passes; 1 a value or gradient is wrong and no numerical cause explains
        it, or the audited code raised; 2 no value was found wrong but some case failed on the
        calling convention (fix the adapter first); 3 every failing case has a numerical cause."""
        if self.passed:
            return 0
        if any(not r.contract and r.cause is None for r in self.failures):
            return 1
        return 2 if any(r.contract for r in self.failures) else 3

    @property
    def verdict(self) -> str:
        """One name per exit status; 3 names its causes: 'matches up to float32 rounding',
        'matches up to the softplus threshold (20, torch's default)'."""
        if self.exit_status == 1:
            return "wrong mathematics" if any(r.error is None and r.cause is None for r in self.failures) else "the audited code raised"
        causes = dict.fromkeys(r.cause for r in self.failures if r.cause)
        return {0: "pass", 2: "adapter problem"}.get(self.exit_status) or "matches up to " + " and ".join(causes)

    def contract_errors(self) -> list[tuple[str, list[CaseResult]]]:
        """The distinct calling-convention errors, each with the cases that failed with it."""
        groups: dict[str, list[CaseResult]] = {}
        for r in self.failures:
            if r.contract:
                groups.setdefault(r.error_key, []).append(r)
        return [(cases[0].error, cases) for cases in groups.values()]

    def hints(self) -> list[str]:
        """Likely causes of the failures, where they are clear (distinct, in case order)."""
        hints = [r.hint for r in self.failures if r.hint]
        summed = [r for r in self.failures if r.batch_scaled]
        if summed:
            hints.append(
                f"in {len(summed)} failing case(s) the loss or its gradients are N times the expected ones, N the number "
                "of samples: the function sums where a (weighted) mean is expected (SPIN, SPACE and SPIF are weighted "
                "means, weights 1/N when uniform)"
            )
        if any(r.cause and "softplus" in r.cause for r in self.failures):
            hints.append("torch.nn.functional.softplus returns x itself above its threshold (an error of log1p(e^-x), 2.1e-9 "
                         "at 20); for full precision use x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))")
        if any(r.cause == FLOAT32_ROUNDING for r in self.failures):
            hints.append("the audited code computes in float32 (a .float() cast, float32 constants or weights) although its "
                         "inputs are float64; compute in the inputs' dtype to be checked at the float64 tolerance")
        unexplained = sum(r.float32_seen and r.cause is None for r in self.failures)
        if unexplained:
            hints.append(f"the audited code computes in float32, but {unexplained} failing case(s) exceed even the float32 "
                         "rounding bound of the case: float32 does not explain them")
        return list(dict.fromkeys(hints))

    def largest_errors(self) -> dict[str, tuple[float, str]]:
        """For each quantity, the largest absolute error over all cases and where it occurred."""
        largest: dict[str, tuple[float, str]] = {}
        for r in self.results:
            for c in r.comparisons:
                if c.quantity not in largest or c.max_abs_error > largest[c.quantity][0]:
                    largest[c.quantity] = (c.max_abs_error, r.name)
        return largest

    def format(self, verbose: bool = True) -> str:
        lines = [
            f"audit of {self.impl} against the {self.objective} golden vectors ({self.golden})",
            f"dtype {self.dtype}, pass if |error| <= {self.atol:g} + {self.rtol:g}*|expected|, for the loss, "
            "the gradients (-beta*a, +beta*b) and returned weights",
            "a line shows its worst element: value, expected, abs err, rel err = abs err/|expected| (abs err only where expected is 0)",
        ]
        width = max(len(r.name) for r in self.results)
        for r in self.results:
            if (r.passed and not verbose) or r.contract:  # contract errors: once each, below
                continue
            status = "PASS" if r.passed else "FAIL"
            detail = f"raised {r.error}" if r.error is not None else _describe_case(r)
            detail += f"; matches up to {r.cause}" if r.cause else ""
            lines.append(f"{status} {r.name:<{width}}  {detail}")
        for message, cases in self.contract_errors():
            where = "every case" if len(cases) == len(self.results) else f"{len(cases)}/{len(self.results)} cases, e.g. {cases[0].name}"
            lines.append(f"CONTRACT ERROR in {where}: {message}")
        largest = self.largest_errors()
        if largest:  # no heading over nothing when every case raised
            lines.append("largest absolute errors:")
            for quantity, (err, name) in largest.items():
                lines.append(f"  {quantity:<24} {err:.3e}  ({name})")
        lines.extend(f"hint: {hint}" for hint in self.hints())
        lines.append(self._summary())
        return "\n".join(lines)

    def _summary(self) -> str:
        n, n_passed = len(self.results), len(self.results) - len(self.failures)
        if self.exit_status == 2 and n_passed == 0:
            return "ADAPTER PROBLEM: no case ran, the function does not follow the calling convention (see --help); the mathematics was not checked"
        if self.exit_status == 2:
            return f"ADAPTER PROBLEM: {n_passed}/{n} cases passed, the other {n - n_passed} do not follow the calling convention (see --help)"
        if self.exit_status == 3:
            return f"NUMERICAL CAUSE ONLY: {n_passed}/{n} cases passed, verdict: {self.verdict} (the mathematics is right)"
        return f"{'PASS' if self.passed else 'FAIL'}: {n_passed}/{n} cases passed"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        data["exit_status"] = self.exit_status
        data["verdict"] = self.verdict
        data["hints"] = self.hints()
        # json cannot hold inf; a non-finite value is recorded as the string "inf"
        for r in data["results"]:
            for c in r["comparisons"]:
                for key in ("ratio", "actual", "abs_error", "rel_error", "max_abs_error"):
                    if isinstance(c[key], float) and not math.isfinite(c[key]):
                        c[key] = repr(c[key])
        return data


def audit(
    fn: Callable,
    objective: str,
    *,
    golden_dir: str | Path | None = None,
    constants: Mapping | None = None,
    weights: str = "all",
    name_contains: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    dtype: str = "float64",
    arg_map: Mapping | None = None,
    impl_name: str | None = None,
) -> AuditReport:
    """Check ``fn`` on the golden cases of ``objective`` and return the report.

    ``constants`` filters the cases (e.g. ``{"alpha": 0.5}``); ``weights`` is "all", "uniform"
    (for implementations without sample weights) or "weighted"; tolerances default by dtype.
    """
    if dtype not in DTYPES:
        raise AuditUsageError(f"dtype must be float64 or float32, got {dtype!r}")
    rtol = DEFAULT_TOLERANCE[dtype] if rtol is None else float(rtol)
    atol = DEFAULT_TOLERANCE[dtype] if atol is None else float(atol)
    if not (rtol >= 0 and atol >= 0) or rtol + atol == 0:
        raise AuditUsageError(f"tolerances must be non-negative and not both zero, got rtol={rtol}, atol={atol}")
    cases = select_cases(load_golden(objective, golden_dir), objective, constants, weights, name_contains)
    results = [evaluate_case(fn, case, DTYPES[dtype], rtol, atol, dict(arg_map or {})) for case in cases]
    if dtype == "float64":  # in float32 the tolerance already allows for float32 rounding
        _diagnose(objective, cases, results, rtol, atol)
    name = impl_name or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
    return AuditReport(
        objective=objective,
        impl=name,
        dtype=dtype,
        rtol=rtol,
        atol=atol,
        golden=str(golden_path(objective, golden_dir)),
        results=results,
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _float_or_none(text: str):
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m iris_ref.audit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Audit a loss implementation against the golden vectors of iris-ref: loss values and\n"
            "autograd gradients w.r.t. the two policy log-prob vectors (expected -beta*a, +beta*b).\n\n"
            "Calling convention: fn(policy_real_logps, policy_synthetic_logps, opponent_real_logps,\n"
            "opponent_synthetic_logps, **constants) with four 1-D tensors positionally and the\n"
            "constants as keywords with the reference names: iris alpha, beta; spin beta; space mu,\n"
            "beta; spif beta, reward_bound (not passed when None); weighted cases also pass\n"
            "real_weights and synthetic_weights (spin: pair_weights) as tensors. fn returns a loss\n"
            "tensor, an object with .loss, or a mapping with 'loss'; returned real_weights and\n"
            "synthetic_weights, if present, are checked too.\n\n"
            "SPIN, SPACE and SPIF are weighted MEANS over the batch (uniform weights 1/N), not sums.\n"
            "Code without sample weights (paired DPO-style code) needs --weights uniform."
        ),
        epilog=(
            "templates: python -m iris_ref.audit --template MODEL_OR_TOKENIZER_DIR [--chat-template-kwargs JSON]\n"
            "  checks a tokenizer and its chat template for token-exact self-play instead (BOS policy,\n"
            "  prefix property, leading space, stop tokens, date, think blocks; exit 1 on a violation,\n"
            "  see iris_ref/template_audit.py)\n\n"
            "examples:\n"
            "  python -m iris_ref.audit --impl iris_ref.objectives:iris_loss --objective iris\n"
            "  python -m iris_ref.audit --impl mylib/losses.py:renyi_loss --objective iris --alpha 0.5 \\\n"
            "      --arg-map alpha=order,beta=temperature --weights uniform --json report.json\n\n"
            "exit status: 0 every selected case passes; 1 the mathematics is wrong (a mismatch no\n"
            "numerical cause explains) or the audited code raised; 2 the adapter is wrong (a case broke\n"
            "the calling convention: signature, keywords, a float or a vector returned; no value was\n"
            "wrong) or a usage error; 3 the mathematics is right, every failing case matches only up to\n"
            "'float32 rounding' (the code makes float32 tensors, each value is within its case's float32\n"
            "error bound) or 'the softplus threshold' (each value matches the reference recomputed with\n"
            "torch's softplus(x, threshold), 20 by default, to the float64 tolerance)."
        ),
    )
    parser.add_argument("--impl", required=True, help="module:function or path/to/file.py:function")
    parser.add_argument("--objective", required=True, choices=OBJECTIVES)
    parser.add_argument("--alpha", type=float, help="only cases with this IRIS order")
    parser.add_argument("--beta", type=float, help="only cases with this beta")
    parser.add_argument("--mu", type=float, help="only SPACE cases with this mu")
    parser.add_argument("--reward-bound", type=_float_or_none, default=_UNSET, help="only SPIF cases with this bound ('none': unbounded)")
    parser.add_argument("--weights", choices=WEIGHT_SELECTIONS, default="all", help="'uniform' skips the sample-weighted cases (default: all)")
    parser.add_argument("--case", dest="name_contains", help="only cases whose name contains this text")
    parser.add_argument("--golden", type=Path, help=f"directory of the golden JSON files (default: {DEFAULT_GOLDEN_DIR})")
    parser.add_argument("--rtol", type=float, help="relative tolerance (default 1e-10 for float64, 1e-3 for float32)")
    parser.add_argument("--atol", type=float, help="absolute tolerance (default as --rtol)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float64", help="dtype of the input tensors (default float64)")
    parser.add_argument("--arg-map", help="rename keywords: reference=foreign[,...], e.g. alpha=order,beta=temperature")
    parser.add_argument("--json", type=Path, dest="json_out", help="also write the full report as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="print only failing cases and the summary")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg == "--template" or arg.startswith("--template=") for arg in argv):
        from iris_ref import template_audit

        return template_audit.main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {"alpha": args.alpha, "beta": args.beta, "mu": args.mu}
    constants = {k: v for k, v in given.items() if v is not None}
    if args.reward_bound is not _UNSET:
        constants["reward_bound"] = args.reward_bound
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, "")  # --impl mymodule:fn finds modules of the current directory
    try:
        fn = load_impl(args.impl)
        report = audit(
            fn,
            args.objective,
            golden_dir=args.golden,
            constants=constants,
            weights=args.weights,
            name_contains=args.name_contains,
            rtol=args.rtol,
            atol=args.atol,
            dtype=args.dtype,
            arg_map=parse_arg_map(args.arg_map),
            impl_name=args.impl,
        )
    except AuditUsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(report.format(verbose=not args.quiet))
    if args.json_out is not None:
        try:
            args.json_out.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"{parser.prog}: error: cannot write {args.json_out}: {exc}", file=sys.stderr)
            return 2
    return report.exit_status


if __name__ == "__main__":
    sys.exit(main())
