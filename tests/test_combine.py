"""The combiner's solver (combiner/solver.py): both solvers reach the one minimum of
KL(p^g ‖ q) + Σ_{m∈A} KL(p^m ‖ q^m), checked against closed forms and plain per-example loops."""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from combiner.solver import _extrapolate, combine, objective


def random_case(seed: int, examples: int = 12, classes: int = 30, specialists: int = 6, size: int = 8,
                dtype: torch.dtype = torch.float64, sharpness: float = 2.0,
                dustbin_shift: float = 0.0) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """p^g, specialists' probabilities (dustbin last) and random overlapping subsets, all classes
    and dustbins with some mass; a few classes are in no subset, so top_n=1 leaves some examples
    with no active specialist and gives others one or two. Logits are N(0, 1) times `sharpness` for
    p^g, times 2 for the specialists, whose dustbin logit is raised by `dustbin_shift`."""
    g = torch.Generator().manual_seed(seed)
    p_general = torch.softmax(sharpness * torch.randn(examples, classes, generator=g, dtype=torch.float64), 1)
    subsets = [torch.randperm(classes, generator=g)[:size] for _ in range(specialists)]
    shift = torch.zeros(size + 1, dtype=torch.float64).index_fill_(0, torch.tensor([size]), dustbin_shift)
    probs = [torch.softmax(2 * torch.randn(examples, size + 1, generator=g, dtype=torch.float64) + shift, 1)
             for _ in range(specialists)]
    return p_general.to(dtype), [p.to(dtype) for p in probs], subsets


def slow_case(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A case where plain EM crawls (with top_n=None, 643 iterations to tol=1e-10): 8 overlapping subsets
    of 14 of 40 classes, a sharp p^g and specialists confident the example is not theirs, so q moves
    mass onto classes p^g finds unlikely, which only p^g's small weight pins down."""
    return random_case(13, classes=40, specialists=8, size=14, dtype=dtype, sharpness=3.0, dustbin_shift=6.0)


def loop_active(p_general: torch.Tensor, subsets: list, top_n: int | None) -> list[list[int]]:
    """For each example, the specialists whose subset holds one of its top_n classes, by plain loops."""
    active = []
    for row in p_general.tolist():
        top = sorted(range(len(row)), key=lambda c: -row[c])[:top_n] if top_n is not None else range(len(row))
        active.append([m for m, s in enumerate(subsets) if set(top) & {int(c) for c in s}])
    return active


def loop_objective(p_general: torch.Tensor, probs: list, subsets: list, q: torch.Tensor,
                   top_n: int | None) -> list[float]:
    """KL(p^g ‖ q) + Σ_{m∈A} KL(p^m ‖ q^m) written out with Python floats, one example at a time."""
    def kl(p: list[float], r: list[float]) -> float:
        return sum(pi * math.log(pi / ri) for pi, ri in zip(p, r) if pi > 0)

    values = []
    for b, active in enumerate(loop_active(p_general, subsets, top_n)):
        qb = q[b].tolist()
        value = kl(p_general[b].tolist(), qb)
        for m in active:
            ids = [int(c) for c in subsets[m]]
            collapsed = [qb[c] for c in ids] + [sum(qb) - sum(qb[c] for c in ids)]
            value += kl(probs[m][b].tolist(), collapsed)
        values.append(value)
    return values


def loop_fixed_point(p_general: torch.Tensor, probs: list, subsets: list, top_n: int | None,
                     iterations: int) -> torch.Tensor:
    """The EM update of DESIGN.md, one example and one specialist at a time, Q_m summed directly:
    q_c ← [p^g_c + Σ_{m∈A} ([c∈S_m] p^m_c + [c∉S_m] p^m_⊥ q_c / Q_m)] / (1 + |A|); then, as the solver
    returns it, each group's mass shared out in proportion to k_c = p^g_c + Σ_{m∈A, c∈S_m} p^m_c (the
    same q once EM has converged): a group is the classes lying in the same active subsets where those
    2^|A| patterns are no more than the cells (the classes lying in the same subsets), else a cell."""
    member = torch.zeros(p_general.shape[1], len(subsets), dtype=torch.bool)
    for m, s in enumerate(subsets):
        member[s, m] = True
    num_cells = len(torch.unique(member, dim=0))
    out = p_general.clone()
    for b, active in enumerate(loop_active(p_general, subsets, top_n)):
        q, k = p_general[b].clone(), p_general[b].clone()
        for m in active:
            k[subsets[m]] += probs[m][b, :-1]
        for _ in range(iterations):
            new = p_general[b].clone()
            for m in active:
                inside = torch.zeros_like(q, dtype=torch.bool)
                inside[subsets[m]] = True
                outside_mass = q[~inside].sum()
                new[subsets[m]] += probs[m][b, :-1]
                new[~inside] += probs[m][b, -1] * q[~inside] / outside_mass
            q = new / (1 + len(active))
        if len(active) < 2:
            out[b] = q
            continue
        key = member[:, active] if 2 ** len(active) <= num_cells else member
        groups = [[c for c in range(len(key)) if torch.equal(key[c], key[d])] for d in range(len(key))]
        out[b] = torch.stack([q[groups[c]].sum() * k[c] / k[groups[c]].sum() for c in range(len(q))])
    return out


def dense_plain_em(p_general: torch.Tensor, probs: list, subsets: list, tol: float,
                   max_iter: int) -> tuple[torch.Tensor, list[int | None]]:
    """Plain EM with every specialist active, written out with a dense (M, C) table of the classes
    outside each subset, all examples at once: q_c ← [p^g_c + Σ_m ([c∈S_m] p^m_c + [c∉S_m] p^m_⊥ q_c / Q_m)]
    / (1 + M), Q_m = Σ_{c∉S_m} q_c. Each example keeps the first iterate whose step has max |Δq| < tol.
    Returns q and, per example, the iterations that took (None: not within max_iter)."""
    outside = torch.ones(len(subsets), p_general.shape[1], dtype=torch.bool)
    observed = p_general.clone()  # p^g_c + Σ_{m: c∈S_m} p^m_c
    for m, (s, p) in enumerate(zip(subsets, probs)):
        outside[m, s] = False
        observed[:, s] += p[:, :-1]
    dustbin = torch.stack([p[:, -1] for p in probs], 1)  # (B, M)
    q, iterations = p_general.clone(), torch.zeros(len(p_general), dtype=torch.long)
    done = torch.zeros(len(p_general), dtype=torch.bool)
    for iteration in range(1, max_iter + 1):
        mass_outside = (q[:, None, :] * outside).sum(2)  # (B, M)
        new = (observed + q * ((dustbin / mass_outside)[:, :, None] * outside).sum(1)) / (1 + len(subsets))
        step = (new - q).abs().amax(1)
        q, iterations = torch.where(done[:, None], q, new), torch.where(done, iterations, iteration)
        done |= step < tol
        if done.all():
            break
    return q, [int(n) if stopped else None for n, stopped in zip(iterations, done)]


@pytest.mark.parametrize("top_n", [1, 2, None])
@pytest.mark.parametrize("seed", [0, 1])
def test_both_methods_reach_the_same_minimum(seed, top_n):
    case = random_case(seed)
    active = loop_active(case[0], case[2], top_n)
    if top_n == 1:  # the case exercises partial activity: none, one and several active specialists
        assert {0, 1} <= {len(a) for a in active} and max(len(a) for a in active) >= 2
    q_fixed = combine(*case, top_n=top_n)
    q_grad = combine(*case, top_n=top_n, method="gradient")
    f_fixed, f_grad = objective(*case, q_fixed, top_n=top_n), objective(*case, q_grad, top_n=top_n)
    torch.testing.assert_close(f_grad, f_fixed, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(q_grad, q_fixed, rtol=0, atol=1e-6)
    start = objective(*case, case[0], top_n=top_n)
    assert (f_fixed < start - 1e-3)[[len(a) > 0 for a in active]].all()  # the combiner did move q


def test_fixed_point_never_increases_the_objective():
    case = random_case(2, specialists=10)
    values = [objective(*case, combine(*case, top_n=None, max_iter=k, tol=0), top_n=None) for k in range(30)]
    for before, after in itertools.pairwise(values):
        assert (after <= before + 1e-12 * before.abs()).all()
    assert (values[-1] < values[1] - 1e-4).all()  # it went on improving after the first step


def test_no_active_specialist_leaves_the_generalist_exactly():
    p_general, probs, subsets = random_case(3)
    top = p_general.argmax(1)
    subsets = [torch.tensor([c for c in s.tolist() if c not in top[:6].tolist()]) for s in subsets]
    g = torch.Generator().manual_seed(3)
    probs = [torch.softmax(torch.randn(len(p_general), len(s) + 1, generator=g, dtype=torch.float64), 1)
             for s in subsets]
    active = torch.tensor([len(a) > 0 for a in loop_active(p_general, subsets, 1)])
    assert not active[:6].any() and active.any()
    q = combine(p_general, probs, subsets)
    assert torch.equal(q[:6], p_general[:6])
    assert not torch.equal(q[active], p_general[active])
    assert torch.equal(combine(p_general, [], []), p_general)


@pytest.mark.parametrize("shape", ["partition", "overlapping"])
def test_dustbin_free_specialists_give_the_arithmetic_mean(shape):
    """With every specialist active and p^m_⊥ = 0, the objective is -Σ_c (p^g_c + Σ_{m: c∈S_m} p^m_c) log q_c
    + const, minimised by q_c = (p^g_c + Σ_{m: c∈S_m} p^m_c) / (1 + M): the arithmetic mean of the 1 + M
    distributions over all C classes, each specialist's extended by zeros outside its subset (the
    normaliser is 1 + M because each specialist's mass on its subset is 1). For a class held by one
    specialist m, that is (p^g_c + p^m_c)/(1 + M), not the mean (p^g_c + p^m_c)/2 of the two opinions
    about c. A partition is not needed: overlapping subsets covering only some classes give the same."""
    g = torch.Generator().manual_seed(4)
    examples, classes = 7, 24
    p_general = torch.softmax(torch.randn(examples, classes, generator=g, dtype=torch.float64), 1)
    if shape == "partition":
        subsets = list(torch.randperm(classes, generator=g).split([5, 7, 3, 9]))
    else:
        subsets = [torch.randperm(classes, generator=g)[:6] for _ in range(5)]
    probs = [torch.cat([torch.softmax(torch.randn(examples, len(s), generator=g, dtype=torch.float64), 1),
                        torch.zeros(examples, 1, dtype=torch.float64)], 1) for s in subsets]
    mean = p_general.clone()
    for s, p in zip(subsets, probs):
        mean[:, s] += p[:, :-1]
    mean /= 1 + len(subsets)
    torch.testing.assert_close(combine(p_general, probs, subsets, top_n=None), mean, rtol=0, atol=1e-15)
    torch.testing.assert_close(combine(p_general, probs, subsets, top_n=None, method="gradient"), mean,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["fixed_point", "gradient"])
def test_one_active_specialist_matches_the_closed_form(method):
    """Disjoint subsets and each example's top class in one of them: exactly one specialist m is
    active, and q_c = (p^g_c + p^m_c)/2 on S_m, q_c = p^g_c (P_out + p^m_⊥)/(2 P_out) off it."""
    g = torch.Generator().manual_seed(5)
    examples, classes = 9, 20
    subsets = list(torch.randperm(classes, generator=g)[:12].split(4))
    logits = torch.randn(examples, classes, generator=g, dtype=torch.float64)
    owner = torch.arange(examples) % len(subsets)
    logits[torch.arange(examples), torch.stack([subsets[m][0] for m in owner])] += 5
    p_general = torch.softmax(logits, 1)
    probs = [torch.softmax(torch.randn(examples, len(s) + 1, generator=g, dtype=torch.float64), 1) for s in subsets]
    assert loop_active(p_general, subsets, 1) == [[int(m)] for m in owner]
    expected = torch.empty_like(p_general)
    for b, m in enumerate(owner.tolist()):
        out_mass = p_general[b].sum() - p_general[b, subsets[m]].sum()
        expected[b] = p_general[b] * (out_mass + probs[m][b, -1]) / (2 * out_mass)
        expected[b, subsets[m]] = (p_general[b, subsets[m]] + probs[m][b, :-1]) / 2
    q = combine(p_general, probs, subsets, method=method)
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-14 if method == "fixed_point" else 1e-6)
    if method == "fixed_point":  # one EM step from p^g lands on it
        torch.testing.assert_close(combine(p_general, probs, subsets, max_iter=1, tol=0), expected,
                                   rtol=0, atol=1e-15)


@pytest.mark.parametrize("top_n", [1, 2, None])
def test_objective_matches_a_per_example_loop(top_n):
    case = random_case(6)
    q = torch.softmax(torch.randn(case[0].shape, generator=torch.Generator().manual_seed(7),
                                  dtype=torch.float64), 1)
    for probe in (q, case[0], combine(*case, top_n=top_n)):
        expected = torch.tensor(loop_objective(*case, probe, top_n), dtype=torch.float64)
        torch.testing.assert_close(objective(*case, probe, top_n=top_n), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("top_n", [1, 2, None])
def test_fixed_point_matches_a_per_example_loop(top_n):
    case = random_case(8)
    for iterations in (1, 2, 7):
        batched = combine(*case, top_n=top_n, max_iter=iterations, tol=0)
        torch.testing.assert_close(batched, loop_fixed_point(*case, top_n, iterations), rtol=0, atol=1e-15)


def test_examples_stopping_one_by_one_agree_with_iterating_all():
    """fixed_point drops each example from the batch once its own step is below tol."""
    case = random_case(12, examples=40)
    iterated = combine(*case, top_n=2, max_iter=3000, tol=0)
    torch.testing.assert_close(combine(*case, top_n=2), iterated, rtol=0, atol=1e-8)
    with pytest.warns(RuntimeWarning, match="stopped at max_iter=3"):
        combine(*case, top_n=2, max_iter=3)


@pytest.mark.parametrize("top_n", [1, None])
def test_float32_agrees_with_float64(top_n):
    case64, case32 = random_case(9, classes=200, specialists=12, size=30), \
        random_case(9, classes=200, specialists=12, size=30, dtype=torch.float32)
    q32 = combine(*case32, top_n=top_n)
    assert q32.dtype == torch.float32
    torch.testing.assert_close(q32.double(), combine(*case64, top_n=top_n), rtol=0, atol=1e-5)
    f32 = objective(*case32, q32, top_n=top_n)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), objective(*case64, q32.double(), top_n=top_n), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["fixed_point", "gradient"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("top_n", [1, None])
def test_rows_are_distributions(method, dtype, top_n):
    case = random_case(10, dtype=dtype)
    q = combine(*case, top_n=top_n, method=method)
    assert q.dtype == dtype and q.device == case[0].device and q.shape == case[0].shape
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(len(q), dtype=dtype), rtol=0,
                               atol=10 * torch.finfo(dtype).eps)


def test_bad_inputs_raise_value_errors():
    p_general, probs, subsets = random_case(11)
    bad = {
        "one probability tensor per subset": (p_general, probs[:-1], subsets, {}),
        "expected .*the batch size": (p_general, [probs[0][:-1], *probs[1:]], subsets, {}),
        r"expected \(12, 9\)": (p_general, [probs[0][:, 1:], *probs[1:]], subsets, {}),
        r"outside \[0, 30\)": (p_general, probs, [subsets[0] + 30, *subsets[1:]], {}),
        r"outside \[0, 30\): \[-1\]": (p_general, probs, [[-1, *subsets[0][1:].tolist()], *subsets[1:]], {}),
        "repeats a class id": (p_general, probs, [subsets[0][[0, 0, 1, 2, 3, 4, 5, 6]], *subsets[1:]], {}),
        "integer class ids": (p_general, probs, [subsets[0].double(), *subsets[1:]], {}),
        "unknown method": (p_general, probs, subsets, {"method": "newton"}),
        "top_n must be": (p_general, probs, subsets, {"top_n": 0}),
        "2-D floating-point": (p_general[0], probs, subsets, {}),
        "p_general.s rows must sum to 1": (3 * p_general, probs, subsets, {}),
        "negative or NaN": (p_general.index_fill(1, torch.tensor([3]), float("nan")), probs, subsets, {}),
        "specialist_probs\\[2\\]'s rows": (p_general, [*probs[:2], probs[2] * 2, *probs[3:]], subsets, {}),
    }
    for message, (p, specialist_probs, ids, options) in bad.items():
        with pytest.raises(ValueError, match=message):
            combine(p, specialist_probs, ids, **options)
    with pytest.raises(ValueError, match="q must be a tensor of p_general's shape"):
        objective(p_general, probs, subsets, p_general[:, 1:])


def test_acceleration_needs_a_fraction_of_plain_em_iterations():
    """Where plain EM crawls, SQUAREM reaches the same tol, without a warning, in a quarter of its iterations."""
    case = slow_case()
    _, iterations = dense_plain_em(*case, tol=1e-10, max_iter=5000)
    needed = max(iterations)
    assert needed >= 500  # the case is one where EM crawls
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        combine(*case, top_n=None, tol=1e-10, max_iter=needed // 4)


def test_newton_takes_examples_where_em_crawls_to_the_minimum_within_a_few_dozen_iterations(monkeypatch):
    """Issue 25: at 15,000 classes EM reached max_iter=1,000 with a warning. After its plain steps, Newton
    on the dual (`_newton`, |A| unknowns per example) lands at the minimum: the slow case (over 500 plain
    EM iterations) converges, to plain EM's answer, within 30 iterations and without a warning; without
    Newton it does not."""
    import combiner.solver as solver

    case = slow_case()
    converged, _ = dense_plain_em(*case, tol=1e-14, max_iter=20000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = combine(*case, top_n=None, tol=1e-10, max_iter=30)
    torch.testing.assert_close(q, converged, rtol=0, atol=1e-9)
    monkeypatch.setattr(solver, "_newton", lambda weights, q: q)
    with pytest.warns(RuntimeWarning, match="stopped at max_iter=30"):
        combine(*case, top_n=None, tol=1e-10, max_iter=30)


def test_accelerated_iterates_never_increase_the_objective():
    """max_iter = k returns the solver's k-th iterate (inside a SQUAREM cycle, a plain EM one): f never
    rises from one to the next, and the extrapolations leave it far closer to the minimum than plain EM."""
    case = slow_case()
    values = [objective(*case, combine(*case, top_n=None, max_iter=k, tol=0), top_n=None) for k in range(46)]
    for before, after in itertools.pairwise(values):
        assert (after <= before + 1e-12 * before.abs()).all()
    least = objective(*case, dense_plain_em(*case, tol=1e-14, max_iter=20000)[0], top_n=None)
    gap, plain_gap = values[-1] - least, objective(*case, dense_plain_em(*case, 0, 45)[0], top_n=None) - least
    assert (gap <= plain_gap + 1e-12).all() and gap.max() < plain_gap.max() / 100


def test_accelerated_answer_is_plain_em_run_to_convergence():
    """tol bounds a plain EM step, and where EM crawls q's error is many such steps (plain EM stopped at
    tol=1e-10 is ~1e-9 off here), so both run to a tighter tol: they agree with each other."""
    case = slow_case()
    converged, iterations = dense_plain_em(*case, tol=1e-14, max_iter=20000)
    assert None not in iterations
    torch.testing.assert_close(combine(*case, top_n=None, tol=1e-12), converged, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype, sliver, dustbin", [(torch.float32, 1e-11, 0.3), (torch.float32, 1e-11, 1e-8),
                                                     (torch.float64, 1e-51, 0.3), (torch.float64, 1e-21, 1e-15)])
def test_a_sliver_of_mass_outside_a_subset_keeps_its_precision(dtype, sliver, dustbin):
    """The generalist puts all but 10 slivers inside S = {0..9}: Σq - Σ_S q would be 1 - 1 = 0 (or
    rounding noise) in this dtype. The closed form (one active specialist): q_c = (p^g_c + p^m_c)/2 on S,
    q_c = p^g_c·(P_out + p_⊥)/(2·P_out) off S."""
    f64 = torch.float64
    p_general = torch.cat([torch.full((1, 10), (1 - 10 * sliver) / 10, dtype=f64), torch.full((1, 10), sliver,
                                                                                              dtype=f64)], 1).to(dtype)
    p_special = torch.cat([torch.full((1, 10), (1 - dustbin) / 10, dtype=f64), torch.tensor([[dustbin]], dtype=f64)],
                          1).to(dtype)
    pg, ps = p_general.double()[0], p_special.double()[0]
    p_out = pg[10:].sum()
    expected = torch.cat([(pg[:10] + ps[:10]) / 2, pg[10:] * (p_out + ps[10]) / (2 * p_out)])
    q = combine(p_general, [p_special], [list(range(10))])
    assert q.dtype == dtype
    torch.testing.assert_close(q[0].double(), expected, rtol=10 * torch.finfo(dtype).eps, atol=0)


def test_accelerated_float32_agrees_with_float64():
    q32 = combine(*slow_case(torch.float32), top_n=None)
    torch.testing.assert_close(q32.double(), combine(*slow_case(), top_n=None), rtol=0, atol=1e-5)


def test_extrapolations_leaving_the_simplex_fall_back_toward_the_double_em_step():
    """SQUAREM's q' = q2 + γ²·back - γ(γ + 2)·step, per example (column): γ = 10 takes column 0's second
    class below 0, so γ halves to 5; column 1 stays at γ = 10; column 2's γ overflows (NaN), so after the
    halvings γ = 0 and q' = q2 exactly. The class with q2 = 0 (and no movement) stays at 0 throughout."""
    q2 = torch.tensor([[0.5, 0.5, 0.5], [0.3, 0.3, 0.3], [0.2, 0.2, 0.2], [0.0, 0.0, 0.0]], dtype=torch.float64)
    back = torch.tensor([[1e-2, 1e-3, 1e-2], [-1e-2, -1e-3, -1e-2], [0, 0, 0], [0, 0, 0]], dtype=torch.float64)
    step = back / 2
    gamma = torch.tensor([10.0, 10.0, 1e200], dtype=torch.float64)
    q = _extrapolate(q2, back, step, gamma)
    used = torch.tensor([5.0, 10.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(q, q2 + used**2 * back - used * (used + 2) * step, rtol=0, atol=1e-15)
    assert torch.equal(q[:, 2], q2[:, 2]) and (q[:3] > 0).all() and torch.equal(q[3], q2[3])


@pytest.mark.parametrize("examples", [1, 3])
def test_combine_leaves_its_inputs_as_they_were(examples):
    """The fixed point solves in place in its own copy of p^g: with one example the transposed p^g was
    already contiguous, so it was solved in the caller's tensor (the evaluation stage's last row of a
    test set of ROWS·k + 1 examples)."""
    gen = torch.Generator().manual_seed(0)
    p_general = torch.softmax(torch.randn(examples, 6, generator=gen, dtype=torch.float64), 1)
    probs = [torch.softmax(torch.randn(examples, n + 1, generator=gen, dtype=torch.float64), 1) for n in (3, 2)]
    inputs = [p_general.clone(), *(p.clone() for p in probs)]
    combine(p_general, probs, [[0, 1, 2], [2, 3]], top_n=None)
    assert all(torch.equal(a, b) for a, b in zip([p_general, *probs], inputs))


def test_newton_finishes_where_a_confident_specialists_terms_are_below_the_duals_rounding():
    """The default's test image 6572 (`bench/scale.py --config configs/default.yaml`): four active
    specialists, two of them with dustbins of 7e-5 and 3e-5, as the 16 patterns of their subsets.
    Newton stopped once φ could no longer tell its steps' decrease from rounding, 1e-4 from the minimum,
    and EM then crawled past max_iter = 1,000 with a warning; now it takes full steps there and
    lands within 1e-8, and EM confirms within max_iter."""
    from combiner.solver import _em, _Weights

    k = torch.tensor([3.00119, 2.92119e-10, 0.00199655, 3.04596e-07, 0.070487, 8.49292e-06, 0.0242346, 0.000763638,
                      0.00169829, 0.0, 0.000421716, 1.01859e-05, 6.11816e-07, 1.8476e-17, 7.67052e-05, 2.34359e-09],
                     dtype=torch.float64)
    start = torch.tensor([0.9192, 2.91655e-10, 0.00199374, 3.03129e-07, 0.0573538, 2.36058e-06, 0.0202158,
                          0.000681255, 4.72803e-05, 0.0, 0.000420319, 1.01858e-05, 2.21915e-10, 1.0818e-17,
                          7.50755e-05, 2.34359e-09], dtype=torch.float64)
    outside = ((torch.arange(16)[None] >> torch.arange(4)[:, None]) & 1).double()  # pattern j lies outside S_a: bit a
    weights = _Weights(k=k[:, None], dustbin=torch.tensor([[7.185460e-05], [3.061054e-05], [0.9916008], [0.9074096]],
                                                           dtype=torch.float64),
                       num_active=torch.tensor([4.0], dtype=torch.float64), cell=torch.arange(16), outside=outside)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, converged = _em(weights, start[:, None].clone(), 1e-10, 1000)
    reference, _ = _em(weights, start[:, None].clone(), 1e-13, 200_000)
    assert converged
    torch.testing.assert_close(q, reference, rtol=0, atol=1e-9)
