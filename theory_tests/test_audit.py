"""The audit tool passes the reference objectives and fails deliberately wrong variants.

One test runs the command line in a subprocess (as a user would); the others use the Python
API `iris_ref.audit.audit` or `main([...])` in-process, which is the same code without the
interpreter start-up. The wrong IRIS variants come from theory_tests/mutants.py; the wrong
SPIN/SPACE/SPIF variants below are the usual slips: a sign error, β applied twice, a sum where
the weighted mean belongs, μ forgotten, the reward bound ignored. Code that is right but short of
float64 (float32 arithmetic, torch's softplus threshold) and float32 code with a real bug come
from mutants.py too (NUMERICAL_ONLY, FLOAT32_MUTANTS).
"""

from __future__ import annotations

import json
import math
import re
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from iris_ref.audit import LOGP_NAMES, AuditUsageError, audit, load_golden, main
from iris_ref.objectives import OBJECTIVES, iris_loss
from theory_tests.mutants import (
    FLOAT32_MUTANTS,
    MUTANTS,
    NUMERICAL_ONLY,
    in_float32,
    space_softplus_threshold_15,
    space_torch_softplus,
    spin_torch_softplus,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------
# Wrong SPIN / SPACE / SPIF variants (foreign style: they return a bare loss tensor)


def _rewards(pr, ps, orr, os_, beta):
    return beta * (pr - orr), beta * (ps - os_)


def _weights(w, n, like):
    return torch.full((n,), 1.0 / n, dtype=like.dtype) if w is None else w / w.sum()


def spin_sign_error(pr, ps, orr, os_, *, beta=0.1, pair_weights=None):
    """softplus(r − r') instead of softplus(−(r − r')): rewards the synthetic responses."""
    r, rs = _rewards(pr, ps, orr, os_, beta)
    return (_weights(pair_weights, r.numel(), r) * F.softplus(r - rs)).sum()


def spin_beta_twice(pr, ps, orr, os_, *, beta=0.1, pair_weights=None):
    """β multiplied into the rewards and again into the margin."""
    r, rs = _rewards(pr, ps, orr, os_, beta)
    return (_weights(pair_weights, r.numel(), r) * F.softplus(-beta * (r - rs))).sum()


def space_sum_instead_of_mean(pr, ps, orr, os_, *, mu=1.0, beta=1.0, real_weights=None, synthetic_weights=None):
    """Sums the per-sample terms instead of taking their (weighted) mean."""
    r, rs = _rewards(pr, ps, orr, os_, beta)
    log_mu = math.log(mu)
    return F.softplus(log_mu - r).sum() + mu * F.softplus(rs - log_mu).sum()


def space_mu_dropped(pr, ps, orr, os_, *, mu=1.0, beta=1.0, real_weights=None, synthetic_weights=None):
    """Forgets the factor μ on the synthetic term (right only for μ = 1)."""
    r, rs = _rewards(pr, ps, orr, os_, beta)
    pi, rho = _weights(real_weights, r.numel(), r), _weights(synthetic_weights, rs.numel(), rs)
    log_mu = math.log(mu)
    return (pi * torch.logaddexp(log_mu - r, torch.zeros_like(r))).sum() + (
        rho * torch.logaddexp(rs - log_mu, torch.zeros_like(rs))
    ).sum()


def spif_sign_error(pr, ps, orr, os_, *, beta=0.1, reward_bound=None, real_weights=None, synthetic_weights=None):
    """+Σπr instead of −Σπr on the annotated term."""
    r, rs = _rewards(pr, ps, orr, os_, beta)
    pi, rho = _weights(real_weights, r.numel(), r), _weights(synthetic_weights, rs.numel(), rs)
    if reward_bound is not None:
        r, rs = r.clamp(-reward_bound, reward_bound), rs.clamp(-reward_bound, reward_bound)
    return (pi * r).sum() + (rho * (rs + rs.square() / 4)).sum()


def spif_bound_ignored(pr, ps, orr, os_, *, beta=0.1, reward_bound=None, real_weights=None, synthetic_weights=None):
    """Accepts reward_bound and never clamps (right only for unbounded cases)."""
    r, rs = _rewards(pr, ps, orr, os_, beta)
    pi, rho = _weights(real_weights, r.numel(), r), _weights(synthetic_weights, rs.numel(), rs)
    return -(pi * r).sum() + (rho * (rs + rs.square() / 4)).sum()


def _exact_softplus(x):
    """log(1 + e^x) to full precision everywhere (torch's softplus is x itself above 20)."""
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


def spin_sum_instead_of_mean(pr, ps, orr, os_, *, beta=0.1):
    """DPO-style pairwise code (no sample weights) that sums the per-pair terms instead of averaging."""
    r, rs = _rewards(pr, ps, orr, os_, beta)
    return _exact_softplus(-(r - rs)).sum()


WRONG_VARIANTS = {
    "spin": [spin_sign_error, spin_beta_twice],
    "space": [space_sum_instead_of_mean, space_mu_dropped],
    "spif": [spif_sign_error, spif_bound_ignored],
}


# ------------------------------------------------------------------------------------------
# The reference passes


def _installed_copy(site: Path) -> Path:
    """Copy iris_ref into ``site`` as `pip install .` would: the package's modules and the
    package-data globs of pyproject.toml, nothing else of the repository."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = config.get("tool", {}).get("setuptools", {}).get("package-data", {}).get("iris_ref", [])
    source = REPO_ROOT / "iris_ref"
    files = list(source.glob("*.py")) + [path for pattern in globs for path in source.glob(pattern)]
    for path in files:
        target = site / "iris_ref" / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return site / "iris_ref"


def test_cli_passes_the_reference_in_a_subprocess_when_installed(tmp_path):
    """From an unrelated folder, with only what the package ships (its modules and package data),
    `python -m iris_ref.audit` on the reference IRIS loss exits 0, reads the golden vectors
    inside the package, reports every case as passing and writes a JSON report."""
    package = _installed_copy(tmp_path / "site")
    assert sorted(p.name for p in (package / "golden").glob("*.json")) == ["iris.json", "space.json", "spif.json", "spin.json"], (
        "the golden vectors must lie in iris_ref/golden/ and pyproject.toml must ship them: "
        "[tool.setuptools.package-data] iris_ref = [..., \"golden/*.json\"]"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    report_path = elsewhere / "report.json"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    completed = subprocess.run(
        [sys.executable, "-m", "iris_ref.audit", "--impl", "iris_ref.objectives:iris_loss", "--objective", "iris", "--json", str(report_path)],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    n_cases = len(load_golden("iris"))
    assert f"PASS: {n_cases}/{n_cases} cases passed" in completed.stdout
    assert "largest absolute errors" in completed.stdout
    report = json.loads(report_path.read_text())
    assert report["passed"] is True and len(report["results"]) == n_cases
    assert Path(report["golden"]).resolve() == (package / "golden" / "iris.json").resolve()


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_reference_objectives_pass_the_audit(objective):
    """Each reference objective reproduces its golden loss values, gradients and weights to 1e-10."""
    report = audit(OBJECTIVES[objective], objective)
    passed = report.passed
    assert passed, report.format(verbose=False)
    assert all(len(r.comparisons) == 5 for r in report.results), "returned weights should be checked too"


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_reference_objectives_pass_in_float32(objective):
    """With float32 inputs and the float32 default tolerance (1e-3) the reference passes as well."""
    report = audit(OBJECTIVES[objective], objective, dtype="float32")
    passed = report.passed
    assert passed, report.format(verbose=False)


# ------------------------------------------------------------------------------------------
# Wrong variants fail


@pytest.mark.parametrize("mutant_name", sorted(MUTANTS))
def test_wrong_iris_variants_fail_the_audit(mutant_name):
    """Each IRIS mutant (swapped tilts or roles, dropped sign, unnormalised weights, coarse series) fails at least one case."""
    report = audit(MUTANTS[mutant_name], "iris")
    assert not report.passed and report.exit_status == 1
    assert report.failures and all(r.error is None for r in report.failures)


@pytest.mark.parametrize(
    "objective,variant",
    [(objective, variant) for objective, variants in WRONG_VARIANTS.items() for variant in variants],
    ids=lambda x: getattr(x, "__name__", x),
)
def test_wrong_variants_of_the_other_objectives_fail(objective, variant):
    """Sign errors, β applied twice, sums instead of means, a forgotten μ and an ignored bound all fail the audit."""
    report = audit(variant, objective)
    assert not report.passed, f"{variant.__name__} passed"
    assert report.exit_status == 1, "wrong mathematics, not an adapter problem"


def test_mu_dropped_passes_where_it_is_right_and_fails_where_it_is_not():
    """Filtering by constants works: forgetting μ is harmless at μ = 1 and caught at μ = 4."""
    assert audit(space_mu_dropped, "space", constants={"mu": 1.0}).passed
    assert not audit(space_mu_dropped, "space", constants={"mu": 4.0}).passed


def test_bound_ignored_is_caught_only_on_bounded_cases():
    """`reward_bound=None` selects the unbounded SPIF cases, where ignoring the bound is harmless."""
    assert audit(spif_bound_ignored, "spif", constants={"reward_bound": None}).passed
    assert not audit(spif_bound_ignored, "spif", constants={"reward_bound": 25.0}).passed


def test_a_loss_off_by_1e9_fails():
    """The 1e-10 tolerance is tight: a loss shifted by 1e-9 (gradients intact) fails on the cases with |loss| < 9."""

    def shifted(*args, **kwargs):
        return iris_loss(*args, **kwargs).loss + 1e-9

    report = audit(shifted, "iris")
    assert not report.passed
    assert all(c.passed for r in report.results for c in r.comparisons if c.quantity != "loss")


def test_wrong_returned_weights_are_caught_even_with_a_right_loss():
    """If the output carries weights they are checked: unnormalised weights with the right loss fail."""

    class Output:
        def __init__(self, out):
            self.loss = out.loss
            self.real_weights = out.real_weights * 2.0
            self.synthetic_weights = out.synthetic_weights

    report = audit(lambda *a, **k: Output(iris_loss(*a, **k)), "iris")
    assert not report.passed
    failing = {c.quantity for r in report.failures for c in r.comparisons if not c.passed}
    assert failing == {"real_weights"}


def test_errors_of_the_audited_function_are_reported_per_case():
    """A function that raises, or returns a detached loss, fails each case with the reason instead of crashing the audit."""

    def raises(*args, **kwargs):
        raise RuntimeError("boom")

    report = audit(raises, "spin")
    assert not report.passed and all("RuntimeError: boom" in r.error for r in report.results)
    detached = audit(lambda *a, **k: iris_loss(*a, **k).loss.detach(), "iris", constants={"alpha": 2.0})
    assert not detached.passed and all("differentiabl" in r.error for r in detached.results)
    json.dumps(report.to_dict())


@pytest.mark.parametrize("code", [0, None, "bye"])
def test_sys_exit_in_the_audited_function_fails_the_case(code, tmp_path, capsys):
    """`sys.exit(0)` inside the audited code is a failing case with its message, in the Python
    API and on the command line (where it used to end the audit silently with status 0)."""

    def exits(*args, **kwargs):
        sys.exit(code)

    report = audit(exits, "spin")
    assert not report.passed and all(r.error.startswith("SystemExit") for r in report.results)
    module = tmp_path / "exiting_loss.py"
    module.write_text(f"import sys\ndef loss(*args, **kwargs):\n    sys.exit({code!r})\n")
    status = main(["--impl", f"{module}:loss", "--objective", "spin"])
    out = capsys.readouterr().out
    assert status == 1 and "SystemExit" in out and "FAIL: 0/" in out


def test_keyboard_interrupt_still_stops_the_audit():
    """Ctrl-C is the one exception not caught per case: it stops the audit."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        audit(interrupted, "spin")


def test_non_finite_values_fail_and_the_json_report_stays_valid():
    """NaN or inf never passes, and the JSON report records it without producing invalid JSON."""
    report = audit(lambda *a, **k: iris_loss(*a, **k).loss * float("nan"), "iris", constants={"alpha": 0.5})
    assert not report.passed
    text = json.dumps(report.to_dict(), allow_nan=False)
    assert '"inf"' in text


_REL_ERR = re.compile(r"rel err ([^,;) ]+)")
_SHOWN_VALUES = re.compile(r"(\S+), expected ([^,;) ]+)")


def _shifted_iris(*args, **kwargs):
    return iris_loss(*args, **kwargs).loss + 1e-9


def test_each_line_shows_the_relative_error_of_the_element_it_shows():
    """On a failing line the relative error is |shown value - shown expected| / |shown expected|,
    not the largest relative error of some other element of the same vector."""
    variants = [("iris", m) for m in MUTANTS.values()] + [(o, v) for o, vs in WRONG_VARIANTS.items() for v in vs]
    checked = 0
    for objective, variant in variants:
        for line in audit(variant, objective).format(verbose=False).splitlines():
            if not line.startswith("FAIL ") or "rel err" not in line:
                continue
            shown, expected = (float(x) for x in _SHOWN_VALUES.search(line).groups())
            if not math.isfinite(shown):
                continue
            assert float(_REL_ERR.search(line).group(1)) == pytest.approx(abs(shown - expected) / abs(expected), rel=0.01), line
            checked += 1
    assert checked > 50


def test_no_relative_error_where_the_expected_value_is_zero():
    """Where the expected value is 0 (the loss at policy = opponent) a relative error is undefined:
    the line shows the absolute error and says why, never a relative error of 1e+298."""
    report = audit(_shifted_iris, "iris", name_contains="/zero/")
    assert not report.passed
    for r in report.results:
        assert r.worst.quantity == "loss" and r.worst.expected == 0.0 and r.worst.rel_error is None
        assert r.worst.abs_error == pytest.approx(1e-9, rel=1e-3)
    lines = [line for line in report.format().splitlines() if line.startswith("FAIL ")]
    assert lines and all("rel err" not in line and "expected 0" in line for line in lines), lines
    json.dumps(report.to_dict(), allow_nan=False)


def test_no_empty_heading_when_every_case_raised():
    """If no case produced a value there is no 'largest absolute errors' heading with nothing under it."""

    def raises(*args, **kwargs):
        raise RuntimeError("boom")

    text = audit(raises, "spin").format()
    assert "largest absolute errors" not in text and "FAIL: 0/14" in text


# ------------------------------------------------------------------------------------------
# Calling conventions, filters and usage errors


def test_arg_map_renames_keywords():
    """A foreign function with its own keyword names passes once --arg-map/arg_map renames them, and fails with a hint without."""

    def foreign(pr, ps, orr, os_, *, order, temperature, real_weights=None, synthetic_weights=None):
        return iris_loss(pr, ps, orr, os_, alpha=order, beta=temperature, real_weights=real_weights, synthetic_weights=synthetic_weights)

    assert audit(foreign, "iris", arg_map={"alpha": "order", "beta": "temperature"}).passed
    unmapped = audit(foreign, "iris", constants={"alpha": 2.0})
    assert not unmapped.passed and "--arg-map alpha=" in unmapped.results[0].hint


def test_weights_filter_serves_implementations_without_sample_weights():
    """`weights="uniform"` runs only the unweighted cases, so a loss without weight arguments can be audited."""

    def no_weights(pr, ps, orr, os_, *, alpha, beta):
        return iris_loss(pr, ps, orr, os_, alpha=alpha, beta=beta).loss

    report = audit(no_weights, "iris", weights="uniform")
    assert report.passed and all(not r.weighted for r in report.results)
    assert audit(no_weights, "iris", weights="all").exit_status == 2  # no value wrong, weighted cases not callable


def test_constant_filters_select_the_matching_cases():
    """`constants={"alpha": 0.5, "beta": 1.0}` audits exactly the golden cases with those constants."""
    report = audit(iris_loss, "iris", constants={"alpha": 0.5, "beta": 1.0})
    assert report.results and all(r.constants == {"alpha": 0.5, "beta": 1.0} for r in report.results)


def test_cli_filters_and_file_impl(tmp_path, capsys):
    """`--impl path/to/file.py:fn` loads a file, `--arg-map` and `--alpha` apply, and a wrong variant exits 1."""
    module = tmp_path / "foreign_losses.py"
    module.write_text(
        "from iris_ref.objectives import iris_loss\n"
        "def renyi(pr, ps, orr, os_, *, order, beta, **weights):\n"
        "    return iris_loss(pr, ps, orr, os_, alpha=order, beta=beta, **weights)\n"
        "def renyi_swapped(pr, ps, orr, os_, *, order, beta):\n"
        "    return iris_loss(ps, pr, os_, orr, alpha=order, beta=beta)\n"
    )
    common = ["--objective", "iris", "--alpha", "2", "--arg-map", "alpha=order", "--weights", "uniform", "--quiet"]
    assert main(["--impl", f"{module}:renyi", *common]) == 0
    assert main(["--impl", f"{module}:renyi_swapped", *common]) == 1
    out = capsys.readouterr().out
    assert "FAIL iris/alpha=2.0" in out and "FAIL:" in out


# ------------------------------------------------------------------------------------------
# Hints where the cause is clear


def test_paired_code_without_sample_weights_is_told_to_use_weights_uniform(capsys):
    """DPO-style SPIN code without `pair_weights` fails the weighted cases on the unknown keyword:
    the hint is --weights uniform (not --arg-map), and with it the audit passes."""

    def dpo_style(pr, ps, orr, os_, *, beta):
        return OBJECTIVES["spin"](pr, ps, orr, os_, beta=beta).loss

    report = audit(dpo_style, "spin")
    assert report.exit_status == 2
    assert any("--weights uniform" in h and 'weights="uniform"' in h for h in report.hints()), report.hints()
    assert not any("--arg-map pair_weights" in h and "--weights" not in h for h in report.hints())
    assert audit(dpo_style, "spin", weights="uniform").passed
    assert "hint: " in report.format()


@pytest.mark.parametrize(
    "objective,variant,weights",
    [("spin", spin_sum_instead_of_mean, "uniform"), ("space", space_sum_instead_of_mean, "all")],
    ids=["spin", "space"],
)
def test_a_sum_where_the_mean_belongs_is_named(objective, variant, weights):
    """A loss (and gradients) N times the expected ones, N the batch size, is named as a sum where
    SPIN/SPACE/SPIF take a weighted mean."""
    report = audit(variant, objective, weights=weights)
    assert report.exit_status == 1
    assert any("sum" in h and "mean" in h for h in report.hints()), report.format(verbose=False)


@pytest.mark.parametrize("objective,variant", [("spin", spin_torch_softplus), ("space", space_torch_softplus)], ids=["spin", "space"])
def test_torch_softplus_threshold_is_named(objective, variant):
    """Failing only where softplus arguments exceed 20 (the switch cases, and for SPACE some large
    ones), by about 1e-9: the verdict and a hint name torch's softplus threshold."""
    report = audit(variant, objective)
    assert not report.passed and any("/switch/" in r.name for r in report.failures)
    assert report.exit_status == 3 and report.verdict == "matches up to the softplus threshold (20, torch's default)"
    assert any("threshold" in h and "softplus" in h for h in report.hints()), report.format(verbose=False)


# ------------------------------------------------------------------------------------------
# Numerical causes get their own verdict (exit status 3), on evidence; real bugs stay exit 1


@pytest.mark.parametrize("name", sorted(NUMERICAL_ONLY))
def test_right_code_short_of_float64_gets_its_numerical_verdict(name, tmp_path, capsys):
    """NeMo-Aligner's SPIN in float32, float64 SPIN with float32 constants, SPIN/SPACE with torch's
    softplus: every failing case is explained by its named cause; verdict and exit status 3, in the
    Python API, the JSON report and on the command line."""
    objective, fn, weights, verdict = NUMERICAL_ONLY[name]
    report = audit(fn, objective, weights=weights)
    assert report.failures and all(r.cause for r in report.failures), report.format(verbose=False)
    assert (report.exit_status, report.verdict) == (3, verdict), report.format(verbose=False)
    status = main(["--impl", f"theory_tests.mutants:{fn.__name__}", "--objective", objective, "--weights", weights, "--quiet",
                   "--json", str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    assert status == 3 and re.search(rf"NUMERICAL CAUSE ONLY: \d+/\d+ cases passed, verdict: {re.escape(verdict)} \(the mathematics is right\)", out), out
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] == verdict


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_the_reference_computed_in_float32_is_within_the_float32_bound(objective):
    """Positive control of the float32 bound: the reference objective run on its inputs rounded to
    float32 (and in float32 arithmetic) fails the float64 tolerance, yet every case lies within the
    first-order float32 rounding bound of the case, on all golden cases of all four objectives."""
    report = audit(in_float32(OBJECTIVES[objective]), objective)
    assert report.failures and report.verdict == "matches up to float32 rounding", report.format(verbose=False)
    assert report.exit_status == 3 and any("computes in float32" in h for h in report.hints())


@pytest.mark.parametrize("name", sorted(FLOAT32_MUTANTS))
def test_float32_code_with_a_real_bug_is_still_wrong_mathematics(name, capsys):
    """Negative controls: a sign error or a sum for a mean in NeMo-style float32 SPIN, and each IRIS
    mutant run in float32, exceed the float32 rounding bound somewhere: exit status 1, with a hint
    that float32 does not explain the failures."""
    objective, fn, weights = FLOAT32_MUTANTS[name]
    report = audit(fn, objective, weights=weights)
    assert (report.exit_status, report.verdict) == (1, "wrong mathematics"), report.format(verbose=False)
    assert any("exceed even the float32 rounding bound" in h for h in report.hints())
    if objective == "spin":  # importable by name
        assert main(["--impl", f"theory_tests.mutants:{fn.__name__}", "--objective", "spin", "--weights", "uniform"]) == 1
        assert "FAIL: " in capsys.readouterr().out


def test_float32_is_seen_where_the_loss_comes_back_float64():
    """The evidence is any float32 tensor the audited code computes, not the loss's dtype: SPIN with
    β and weights built as float32 tensors returns a float64 loss, and still counts as float32."""
    objective, fn, weights, _ = NUMERICAL_ONLY["float32_constants"]
    case = load_golden("spin")[0]
    inputs = [torch.tensor(case["inputs"][k], dtype=torch.float64) for k in LOGP_NAMES]
    assert fn(*inputs, beta=0.1).dtype == torch.float64
    report = audit(fn, objective, weights=weights)
    assert report.exit_status == 3 and all(r.float32_seen for r in report.results)


def test_float32_sized_errors_without_float32_are_wrong_mathematics():
    """The float32 verdict needs evidence that float32 is at work, not only errors of its size: a
    float64 loss off by a relative 1e-7 (inside the float32 bound) computes no float32 tensor and
    fails with exit status 1."""

    def off_by_1e7(*args, **kwargs):
        return OBJECTIVES["spin"](*args, **kwargs).loss * (1 + 1e-7)

    report = audit(off_by_1e7, "spin")
    assert (report.exit_status, report.verdict) == (1, "wrong mathematics")
    assert not any(r.float32_seen or r.cause for r in report.results)


def test_softplus_sized_errors_elsewhere_are_wrong_mathematics():
    """The softplus verdict needs a match with the thresholded reference, not only small errors: a
    loss off by 2e-9 everywhere (the size of the threshold's error) is wrong mathematics."""

    def off_by_2e9(*args, **kwargs):
        return OBJECTIVES["space"](*args, **kwargs).loss + 2e-9

    report = audit(off_by_2e9, "space")
    assert (report.exit_status, report.verdict) == (1, "wrong mathematics") and not report.hints()


def test_other_softplus_thresholds_are_detected():
    """A softplus thresholded at 15 instead of 20 is found by trying integer thresholds: the verdict
    names the range of thresholds the golden cases cannot tell apart, 15 among them."""
    report = audit(space_softplus_threshold_15, "space")
    assert report.exit_status == 3, report.format(verbose=False)
    low, high = map(int, re.fullmatch(r"matches up to the softplus threshold \(between (\d+) and (\d+)\)", report.verdict).groups())
    assert low <= 15 <= high < 20


def test_a_numerical_cause_does_not_hide_an_adapter_problem():
    """NeMo-style SPIN without sample weights on all cases: the weighted cases break the calling
    convention and the uniform ones match up to float32 rounding: exit status 2 (fix the adapter
    first), with the --weights uniform hint."""
    report = audit(NUMERICAL_ONLY["nemo_aligner_float32"][1], "spin")
    assert report.exit_status == 2 and report.verdict == "adapter problem"
    assert any("--weights uniform" in h for h in report.hints())


def test_no_hint_where_the_cause_is_not_clear():
    """Wrong mathematics of other kinds (sign errors, beta twice, mu dropped, the IRIS mutants) gets
    no sum or softplus hint."""
    variants = [("iris", m) for m in MUTANTS.values()] + [
        (o, v) for o, vs in WRONG_VARIANTS.items() for v in vs if v is not space_sum_instead_of_mean
    ]
    for objective, variant in variants:
        hints = audit(variant, objective).hints()
        assert not hints, (variant.__name__, hints)


def test_exceptions_show_where_the_audited_code_raised(tmp_path):
    """An exception names the innermost file and line of the audited code, not the audit's or torch's."""
    module = tmp_path / "crashing_loss.py"
    module.write_text(
        "import torch\n"
        "def _helper(x):\n"
        "    return torch.cat([x, x.reshape(1, -1)])\n"  # line 3: torch raises inside torch
        "def loss(pr, ps, orr, os_, **constants):\n"
        "    return _helper(pr).sum()\n"
    )
    from iris_ref.audit import load_impl

    report = audit(load_impl(f"{module}:loss"), "spin")
    assert report.exit_status == 1
    assert all(f"crashing_loss.py:3 in _helper" in r.error for r in report.results), report.results[0].error


# ------------------------------------------------------------------------------------------
# Contract errors: the adapter is wrong, not the mathematics (exit status 2)

# Adapters around the reference SPIN loss that break the calling convention in one way each.
CONTRACT_BREAKERS = '''
import torch.nn.functional as F
from iris_ref.objectives import spin_loss

def three_arguments(pr, ps, orr, **constants):
    return spin_loss(pr, ps, orr, orr).loss

def returns_a_float(pr, ps, orr, os_, **kwargs):
    return spin_loss(pr, ps, orr, os_, **kwargs).loss.item()

def per_pair_vector(pr, ps, orr, os_, *, beta, pair_weights=None):
    return F.softplus(-beta * ((pr - orr) - (ps - os_)))

def own_keyword(pr, ps, orr, os_, *, temperature=0.1):
    return spin_loss(pr, ps, orr, os_, beta=temperature).loss
'''


@pytest.mark.parametrize(
    "function,fragment",
    [
        ("three_arguments", "takes 3 positional arguments but 4 were given"),
        ("returns_a_float", "returned float"),
        ("per_pair_vector", "the loss has shape"),
        ("own_keyword", "unexpected keyword argument 'beta'"),
    ],
)
def test_the_same_contract_error_in_every_case_is_printed_once_and_exits_2(function, fragment, tmp_path, capsys):
    """A wrong signature, a float or a per-pair vector returned, or an unknown keyword fails every
    case the same way: the error is printed once (not once per case) and the exit status is 2."""
    module = tmp_path / "contract_breakers.py"
    module.write_text(CONTRACT_BREAKERS)
    status = main(["--impl", f"{module}:{function}", "--objective", "spin"])
    out = capsys.readouterr().out
    assert status == 2, out
    assert out.count(fragment) == 1, out
    assert not any(line.startswith("FAIL spin/") for line in out.splitlines()), out


def test_exit_status_separates_adapter_problems_from_mathematical_ones():
    """exit_status: 0 for the reference, 1 for wrong mathematics or code that crashes, 2 when every
    failing case failed on the calling convention (here: no loss tensor returned)."""

    def raises(*args, **kwargs):
        raise RuntimeError("boom")

    assert audit(OBJECTIVES["spin"], "spin").exit_status == 0
    assert audit(spin_sign_error, "spin").exit_status == 1
    assert audit(raises, "spin").exit_status == 1
    report = audit(lambda *a, **k: None, "spin")
    assert report.exit_status == 2 and report.to_dict()["exit_status"] == 2
    assert all(r.contract for r in report.results)
    assert report.format().count("returned NoneType") == 1


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--impl", "no_such_module_xyz:loss", "--objective", "iris"], "cannot import 'no_such_module_xyz'"),
        (["--impl", "iris_ref.objectives", "--objective", "iris"], "module:function"),
        (["--impl", "iris_ref.objectives:no_such_fn", "--objective", "iris"], "no attribute"),
        (["--impl", "iris_ref.objectives:iris_loss", "--objective", "iris", "--alpha", "0.7"], "no golden iris case matches alpha=0.7"),
        (["--impl", "iris_ref.objectives:spin_loss", "--objective", "spin", "--alpha", "0.5"], "spin has no constant alpha"),
        (["--impl", "iris_ref.objectives:iris_loss", "--objective", "iris", "--golden", "/nonexistent"], "golden file not found"),
        (["--impl", "iris_ref.objectives:iris_loss", "--objective", "iris", "--arg-map", "alpha"], "--arg-map"),
        (["--impl", "iris_ref.objectives:iris_loss", "--objective", "iris", "--rtol", "-1"], "tolerances"),
        (["--impl", "iris_ref.objectives:iris_loss", "--objective", "nope"], "invalid choice"),
        (["--objective", "iris"], "--impl"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, fragment, capsys):
    """Usage errors (unimportable or malformed --impl, no matching case, bad options) exit 2 with one line on stderr, no traceback."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out


def test_help_documents_the_calling_convention(capsys):
    """`--help` exits 0 and explains the positional tensors, the keyword constants and --arg-map."""
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for fragment in ("policy_real_logps", "reward_bound", "pair_weights", "--arg-map", "exit status"):
        assert fragment in text
    assert "weighted MEANS" in text and "1/N" in text and "needs --weights uniform" in text
    text = " ".join(text.split())
    assert "2 the adapter is wrong" in text and "3 the mathematics is right" in text
    assert "'float32 rounding'" in text and "'the softplus threshold'" in text


def test_the_docs_say_means_not_sums_and_give_the_exit_codes():
    """docs/audit.md states that SPIN, SPACE and SPIF are weighted means (1/N), that code without
    sample weights needs --weights uniform, and what exit statuses 0, 1, 2 and 3 mean."""
    text = " ".join((REPO_ROOT / "docs" / "audit.md").read_text(encoding="utf-8").split())
    assert "SPIN, SPACE and SPIF are weighted means, not sums" in text and "1/N" in text
    assert "Paired DPO-style code takes no sample weights" in text and "--weights uniform" in text
    rows = ("| 0 | pass | every selected case passes", "| 1 | wrong mathematics (or: the audited code raised) | the mathematics is wrong",
            "| 2 | adapter problem | an adapter or usage problem",
            "| 3 | matches up to float32 rounding / the softplus threshold (…) | the mathematics is right, every failing case "
            "matches only up to a named numerical cause")
    for row in rows:
        assert row in text
    assert "theory_tests/golden/*.json" not in text and "iris_ref/golden/" in text


def test_python_api_rejects_bad_arguments():
    """The Python API raises a ValueError subclass naming the problem."""
    with pytest.raises(AuditUsageError, match="unknown objective"):
        audit(iris_loss, "dpo")
    with pytest.raises(AuditUsageError, match="dtype"):
        audit(iris_loss, "iris", dtype="float16")
    with pytest.raises(ValueError, match="weights must be"):
        audit(iris_loss, "iris", weights="some")
