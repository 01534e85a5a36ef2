"""Generate the golden vectors of the four objectives in 60-digit arithmetic.

Run ``python theory_tests/golden/make_golden.py`` (optionally ``--out DIR``) to regenerate
``iris.json``, ``spin.json``, ``space.json`` and ``spif.json`` in ``iris_ref/golden/``: they are
package data of iris_ref (the audit tool reads them from an installed package), while this
generator stays with the tests, outside the package it must not depend on.

Independence: this file never imports ``iris_ref``. The formulas of THEORY.md §2 are written
out again here, directly in mpmath, in their plainest textbook form (no log-sum-exp shift, no
series near alpha = 1), because at 60 significant digits the plain formulas are exact enough:
the worst cancellation, (1/t)·log Σ π e^{t z} at |t| = 1e-9, loses about 9 of the 60 digits.
The only concession: log Σ π e^{t z} is evaluated with -log10|t| extra digits, so the same
functions stay exact for tilts as small as 1e-300 (the theory tests reuse them for alpha -> 0).
Every value is computed twice, at 60 and at 90 digits, and the two must agree to 1e-40, which
shows the stored digits do not depend on the working precision.

Inputs are float64 numbers (stored with ``repr``, so they round-trip exactly), and the expected
values are computed from their *exact* binary values: rewards r = β·(policy − opponent) with
β itself the float64 nearest to 0.1, probability weights normalised exactly (a float64 weight
vector need not sum to exactly 1, and near alpha = 1 that matters at the 1e-9 level). Expected
values are stored as decimal strings with 20 significant digits.

Determinism: every case draws its numbers from ``random.Random(<case name>)`` (string seeds are
hashed with SHA-512, stable across Python versions and platforms) and uses only
``Random.random()``, whose stream Python guarantees; no numpy, whose Generator streams may change
between releases. The output is byte-identical from run to run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import mpmath

WORKING_DIGITS = 60
CHECK_DIGITS = 90
AGREEMENT = mpmath.mpf("1e-40")
STORED_DIGITS = 20

ALPHAS = (0.05, 0.5, 1.0, 1.0 - 1e-7, 1.0 + 1e-7, 2.0, 10.0)
BETAS = (0.1, 1.0)
MUS = (1.0, 4.0)
# Reward scales: "small" |r| ~ 1e-3 (the series regime), "large" |r| ~ 50 (log-sum-exp regime),
# "zero" r = 0 exactly (policy = opponent, the start of every iteration), and for the
# softplus-based objectives (SPIN, SPACE) "switch": softplus arguments of magnitude 18 to 24,
# where float64 code often switches formulas (torch.nn.functional.softplus becomes the
# identity above 20, an error of e^{-20} = 2e-9).
REWARD_SCALES = {"zero": 0.0, "small": 1e-3, "large": 50.0, "switch": None}
SWITCH_RANGE = (18.0, 24.0)
SWITCH_OBJECTIVES = ("spin", "space")
# SPIF bound per scale: some rewards fall inside and some outside, never within 1e-6 of it.
SPIF_BOUNDS = {"zero": 1.0, "small": 5e-4, "large": 25.0}

OBJECTIVES = ("iris", "spin", "space", "spif")
FILE_FORMAT_VERSION = 1
# Where the vectors live: inside the package, beside the audit that reads them.
DEFAULT_OUT = Path(__file__).resolve().parent.parent.parent / "iris_ref" / "golden"

FORMULAS = {
    "iris": "L = -1/(alpha-1) * log sum_i pi_i exp((alpha-1) r_i) + 1/alpha * log sum_j rho_j exp(alpha r'_j); "
    "alpha = 1: L = -sum_i pi_i r_i + log sum_j rho_j exp(r'_j); "
    "a = softmax((alpha-1) r + log pi), b = softmax(alpha r' + log rho)",
    "spin": "L = sum_i pi_i softplus(-(r_i - r'_i)); a_i = b_i = pi_i sigmoid(r'_i - r_i) (pi = pair_weights)",
    "space": "L = sum_i pi_i softplus(log mu - r_i) + mu sum_j rho_j softplus(r'_j - log mu); "
    "a_i = pi_i sigmoid(log mu - r_i), b_j = mu rho_j sigmoid(r'_j - log mu)",
    "spif": "c = clamp(r, -B, B) (no clamp without reward_bound B); "
    "L = -sum_i pi_i c_i + sum_j rho_j (c'_j + c'_j^2/4); "
    "a_i = pi_i [|r_i| < B], b_j = rho_j (1 + c'_j/2) [|r'_j| < B]",
}


# --------------------------------------------------------------------------------------------
# Exact formulas (THEORY.md §2), on lists of mpf. Weights are already exactly normalised.
# --------------------------------------------------------------------------------------------


def exact_rewards(policy, opponent, beta):
    """r = beta * (policy - opponent), computed exactly from the float64 inputs."""
    b = mpmath.mpf(beta)
    return [b * (mpmath.mpf(p) - mpmath.mpf(o)) for p, o in zip(policy, opponent)]


def exact_normalised(weights, n):
    """Uniform 1/n when ``weights`` is None, else weights / sum(weights) exactly."""
    if weights is None:
        return [mpmath.mpf(1) / n] * n
    ws = [mpmath.mpf(w) for w in weights]
    total = mpmath.fsum(ws)
    return [w / total for w in ws]


def _softplus(x):
    return mpmath.log(1 + mpmath.exp(x))


def _sigmoid(x):
    return 1 / (1 + mpmath.exp(-x))


def _tilted_log_sum(weights, values, t):
    """log Σ w e^{t z}, with enough extra digits that dividing it by a tiny t loses nothing.

    For tiny t the sum is 1 + O(t), so log of it cancels about -log10|t| digits; the working
    precision is raised by that much (at 60 digits, 1 + 1e-300 would round to 1). Dividing by
    Σ w removes the last-digit deficit of weights normalised at the working precision.
    """
    extra = 10 + max(0, int(-mpmath.log10(abs(t)))) if t != 0 else 0
    with mpmath.extradps(extra):
        total = mpmath.fsum(w * mpmath.exp(t * z) for w, z in zip(weights, values))
        return +mpmath.log(total / mpmath.fsum(weights))


def iris_exact(r, rp, pi, rho, alpha):
    """IRIS loss and weights; alpha = 1 exactly uses the Donsker–Varadhan limit."""
    alpha = mpmath.mpf(alpha)
    t = alpha - 1
    if t == 0:
        real_part = -mpmath.fsum(p * x for p, x in zip(pi, r))
    else:
        real_part = -_tilted_log_sum(pi, r, t) / t
    loss = real_part + _tilted_log_sum(rho, rp, alpha) / alpha
    real_terms = [p * mpmath.exp(t * x) for p, x in zip(pi, r)]
    synth_terms = [q * mpmath.exp(alpha * x) for q, x in zip(rho, rp)]
    a = [term / mpmath.fsum(real_terms) for term in real_terms]
    b = [term / mpmath.fsum(synth_terms) for term in synth_terms]
    return loss, a, b


def spin_exact(r, rp, pi, _rho):
    """SPIN logistic loss over pairs (pi = pair weights)."""
    loss = mpmath.fsum(p * _softplus(-(x - y)) for p, x, y in zip(pi, r, rp))
    a = [p * _sigmoid(y - x) for p, x, y in zip(pi, r, rp)]
    return loss, a, list(a)


def space_exact(r, rp, pi, rho, mu):
    """SPACE noise-contrastive loss with mu synthetic samples per annotated one."""
    mu = mpmath.mpf(mu)
    log_mu = mpmath.log(mu)
    loss = mpmath.fsum(p * _softplus(log_mu - x) for p, x in zip(pi, r)) + mu * mpmath.fsum(
        q * _softplus(y - log_mu) for q, y in zip(rho, rp)
    )
    a = [p * _sigmoid(log_mu - x) for p, x in zip(pi, r)]
    b = [mu * q * _sigmoid(y - log_mu) for q, y in zip(rho, rp)]
    return loss, a, b


def spif_exact(r, rp, pi, rho, reward_bound):
    """SPIF Pearson-chi^2 loss; with a bound B both reward vectors are clamped to [-B, B]."""
    if reward_bound is None:
        inside_r = [True] * len(r)
        inside_rp = [True] * len(rp)
        c, cp = list(r), list(rp)
    else:
        bound = mpmath.mpf(reward_bound)
        inside_r = [abs(x) < bound for x in r]
        inside_rp = [abs(y) < bound for y in rp]
        c = [max(-bound, min(bound, x)) for x in r]
        cp = [max(-bound, min(bound, y)) for y in rp]
    loss = -mpmath.fsum(p * x for p, x in zip(pi, c)) + mpmath.fsum(
        q * (y + y * y / 4) for q, y in zip(rho, cp)
    )
    a = [p if inside else mpmath.mpf(0) for p, inside in zip(pi, inside_r)]
    b = [q * (1 + y / 2) if inside else mpmath.mpf(0) for q, y, inside in zip(rho, cp, inside_rp)]
    return loss, a, b


def exact_objective(objective, inputs, constants, weights):
    """Expected loss, weights and rewards of one case, as mpf, at the current precision."""
    beta = constants["beta"]
    r = exact_rewards(inputs["policy_real_logps"], inputs["opponent_real_logps"], beta)
    rp = exact_rewards(inputs["policy_synthetic_logps"], inputs["opponent_synthetic_logps"], beta)
    if objective == "spin":
        pi = exact_normalised(weights.get("pair_weights"), len(r))
        rho = pi
    else:
        pi = exact_normalised(weights.get("real_weights"), len(r))
        rho = exact_normalised(weights.get("synthetic_weights"), len(rp))
    if objective == "iris":
        loss, a, b = iris_exact(r, rp, pi, rho, constants["alpha"])
    elif objective == "spin":
        loss, a, b = spin_exact(r, rp, pi, rho)
    elif objective == "space":
        loss, a, b = space_exact(r, rp, pi, rho, constants["mu"])
    elif objective == "spif":
        loss, a, b = spif_exact(r, rp, pi, rho, constants.get("reward_bound"))
    else:
        raise ValueError(f"unknown objective {objective!r}")
    return {"loss": loss, "real_weights": a, "synthetic_weights": b, "real_rewards": r, "synthetic_rewards": rp}


def expected_values(objective, inputs, constants, weights):
    """Expected values as decimal strings, cross-checked at two working precisions."""
    with mpmath.workdps(CHECK_DIGITS):
        check = exact_objective(objective, inputs, constants, weights)
    with mpmath.workdps(WORKING_DIGITS):
        result = exact_objective(objective, inputs, constants, weights)
        out = {}
        for key, value in result.items():
            values = value if isinstance(value, list) else [value]
            checks = check[key] if isinstance(value, list) else [check[key]]
            for v, c in zip(values, checks):
                if abs(v - c) > AGREEMENT * max(1, abs(c)):
                    raise AssertionError(f"{key}: 60-digit and 90-digit values disagree")
            strings = [mpmath.nstr(v, STORED_DIGITS) for v in values]
            out[key] = strings if isinstance(value, list) else strings[0]
    return out


# --------------------------------------------------------------------------------------------
# Deterministic inputs
# --------------------------------------------------------------------------------------------


def _draw_rewards(rng, n, scale):
    return [scale * (2.0 * rng.random() - 1.0) for _ in range(n)]


def _draw_switch_rewards(rng, n, offset):
    """offset ± U[18, 24]: softplus arguments (offset − r or r − offset) of magnitude 18 to 24."""
    low, high = SWITCH_RANGE
    return [offset + (1.0 if rng.random() < 0.5 else -1.0) * (low + (high - low) * rng.random()) for _ in range(n)]


def _draw_weights(rng, n):
    raw = [0.05 + rng.random() for _ in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def _logps_for_rewards(rng, rewards, beta):
    """Opponent log-probs in [-1000, -600] and policy log-probs giving the wanted rewards.

    Summed sequence log-probs of long responses are hundreds of nats; with beta = 0.1 a reward
    of 50 needs a log-ratio of 500, so the policy stays negative too.
    """
    opponent = [-600.0 - 400.0 * rng.random() for _ in rewards]
    policy = [o + r / beta for o, r in zip(opponent, rewards)]
    return policy, opponent


def _away_from_bound(rewards, bound):
    return all(abs(abs(x) - bound) > 1e-6 * bound for x in rewards)


def make_case(objective, constants, scale_name, weighted):
    """One golden case: float64 inputs, constants, optional weights and exact expectations."""
    parts = [objective] + [f"{k}={v!r}" for k, v in constants.items()] + [scale_name]
    parts.append("weighted" if weighted else "uniform")
    name = "/".join(parts)
    rng = random.Random(name)
    scale = REWARD_SCALES[scale_name]
    n = 3 + int(rng.random() * 4)
    m = n if objective == "spin" else 3 + int(rng.random() * 4)
    while True:
        if scale_name != "switch":
            real_rewards = _draw_rewards(rng, n, scale)
            synthetic_rewards = _draw_rewards(rng, m, scale)
        elif objective == "spin":
            # SPIN's softplus argument is the margin r - r': keep r' near 0, put r in the range.
            real_rewards = _draw_switch_rewards(rng, n, 0.0)
            synthetic_rewards = _draw_rewards(rng, m, 1e-3)
        else:
            # SPACE's arguments are log(mu) - r and r' - log(mu).
            log_mu = float(mpmath.log(constants["mu"]))
            real_rewards = _draw_switch_rewards(rng, n, log_mu)
            synthetic_rewards = _draw_switch_rewards(rng, m, log_mu)
        bound = constants.get("reward_bound")
        if bound is None or _away_from_bound(real_rewards + synthetic_rewards, bound):
            break
    beta = constants["beta"]
    pr, orr = _logps_for_rewards(rng, real_rewards, beta)
    ps, os_ = _logps_for_rewards(rng, synthetic_rewards, beta)
    inputs = {
        "policy_real_logps": pr,
        "policy_synthetic_logps": ps,
        "opponent_real_logps": orr,
        "opponent_synthetic_logps": os_,
    }
    weights = {}
    if weighted:
        if objective == "spin":
            weights["pair_weights"] = _draw_weights(rng, n)
        else:
            weights["real_weights"] = _draw_weights(rng, n)
            weights["synthetic_weights"] = _draw_weights(rng, m)
    expected = expected_values(objective, inputs, constants, weights)
    return {"name": name, "constants": constants, "weights": weights, "inputs": inputs, "expected": expected}


def constant_grid(objective):
    """Constants of every case of one objective (dicts in the reference's keyword names)."""
    if objective == "iris":
        return [{"alpha": a, "beta": b} for a in ALPHAS for b in BETAS]
    if objective == "spin":
        return [{"beta": b} for b in BETAS]
    if objective == "space":
        return [{"mu": mu, "beta": b} for mu in MUS for b in BETAS]
    if objective == "spif":
        return [{"beta": b, "reward_bound": bound} for bound in (None, "scale") for b in BETAS]
    raise ValueError(f"unknown objective {objective!r}")


def build_cases(objective):
    """All cases of one objective: every constant combination x {small, large} x {uniform,
    weighted}, plus the zero-reward case (policy = opponent) for every combination with uniform
    weights, plus for SPIN and SPACE the "switch" scale."""
    scales = ("zero", "small", "large") + (("switch",) if objective in SWITCH_OBJECTIVES else ())
    cases = []
    for constants in constant_grid(objective):
        for scale_name in scales:
            for weighted in (False, True):
                if scale_name == "zero" and weighted:
                    continue
                c = dict(constants)
                if c.get("reward_bound") == "scale":
                    c["reward_bound"] = SPIF_BOUNDS[scale_name]
                cases.append(make_case(objective, c, scale_name, weighted))
    return cases


def golden_document(objective):
    return {
        "format_version": FILE_FORMAT_VERSION,
        "objective": objective,
        "generator": "theory_tests/golden/make_golden.py (mpmath, independent of iris_ref)",
        "mpmath_digits": WORKING_DIGITS,
        "rewards": "r = beta*(policy_real_logps - opponent_real_logps), r' likewise for synthetic",
        "formula": FORMULAS[objective],
        "gradients": "dL/dpolicy_real_logps = -beta*real_weights, dL/dpolicy_synthetic_logps = +beta*synthetic_weights",
        "cases": build_cases(objective),
    }


def write_golden(out_dir: Path, objectives=OBJECTIVES) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for objective in objectives:
        path = out_dir / f"{objective}.json"
        text = json.dumps(golden_document(objective), indent=1) + "\n"
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: iris_ref/golden of this checkout)")
    args = parser.parse_args(argv)
    for path in write_golden(args.out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
