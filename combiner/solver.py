"""The combiner's solver (DESIGN.md, "5. combiner"): the distribution q that agrees best with the generalist and
the active specialists, per example, as in Hinton, Vinyals & Dean (2015), section 5, Eq. 5.

For example b with generalist probabilities p^g over C classes and active specialists A_b, q minimises

    f(q) = KL(p^g ‖ q) + Σ_{m∈A_b} KL(p^m ‖ q^m),

where q^m is q collapsed onto specialist m's classes S_m plus a dustbin holding Q_m = Σ_{c∉S_m} q_c.
Specialist m is active for b iff S_m holds one of the `top_n` most probable classes of p^g_b.

Up to the constant Σ p log p of the inputs, f(q) = -Σ_c k_c log q_c - Σ_{m∈A} p^m_⊥ log Q_m with
k_c = p^g_c + Σ_{m∈A, c∈S_m} p^m_c: the log-likelihood of partly aggregated observations, convex in q,
and strictly so because p^g > 0 wherever it matters. Two solvers:

- `"fixed_point"`: the EM update F, monotone and free of step sizes, started at q = p^g:

      q_c ← [ k_c + q_c · Σ_{m∈A, c∉S_m} p^m_⊥ / Q_m ] / (1 + |A|).

  An example with one active specialist gets the closed form below, without iterating. Classes that
  lie in the same subsets form a cell and get the same factor in every update, so EM runs on the cell
  masses (merged further into the 2^|A| patterns of an example's own active subsets where those are
  fewer), and q shares each one's mass in proportion to k_c at the end: an iteration costs
  O(B·M·K) or O(B·|A|·2^|A|), not O(B·C), and Q_m and Σ_{m∌c} p^m_⊥/Q_m are sums of non-negative terms
  (never Σq - Σ_{S_m} q, which cancels where q puts all but a sliver of its mass inside S_m). With
  several active specialists EM can converge linearly at a rate near 1: after its plain steps a
  Newton step on the dual (`_newton`) takes the example to the minimum where it lowers f, and the
  solver extrapolates along EM's path with SQUAREM (Varadhan & Roland 2008), guarded so that f never
  rises. Only the examples with active specialists, and each specialist's outputs on its own examples
  (`combine_active`), are ever worked on.
- `"gradient"`: the paper's gradient descent on logits z, q = softmax(z), started at z = log p^g, the
  gradient from autograd; it equals (1 + |A|)·(q - EM(q)), so both solvers stop at the same point. The
  optimiser is Adam with a per-example learning rate halved on plateaus: plain descent's step is
  bounded by the curvature along the large classes, while along a small class's logit the curvature
  is about q_c, so plain descent crawls on thousands of classes sharing a dustbin's mass.

`"within_subset"` is not a solver of f but a simpler rule, for specialists whose dustbins are not to be
trusted (too small to tell their subset from all the other classes): on each active subset the
generalist's mass p^g(S_m) is shared out as the specialist's distribution within S_m,
p^m_c / (1 - p^m_⊥); the mean over several active specialists; p^g elsewhere.

With one active specialist the minimiser has a closed form, which EM reaches in one iteration:
q_c = (p^g_c + p^m_c)/2 on S_m and q_c = p^g_c·(P_out + p^m_⊥)/(2·P_out) off S_m, P_out = Σ_{c∉S_m} p^g_c.

Internally every (classes × examples) tensor is class-major, (C, B): gathers and scatters along
dim 0 of a contiguous tensor are several times faster on a CPU than along dim 1.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ensemble.metrics import active_table

Method = Literal["fixed_point", "gradient", "within_subset"]
METHODS = ("fixed_point", "gradient", "within_subset")
SUM_TOLERANCE = 1e-3  # rows of probabilities must sum to 1 within this: catches logits and log-probs
ADAM_RATE, ADAM_BETAS, PATIENCE = 0.1, (0.9, 0.999), 20  # the gradient method's optimiser
MIN_GAIN = 1e-12  # a relative decrease of the objective smaller than this (or 16 eps) is no progress
MAX_ITER = 1000  # fixed_point's and gradient's default bound on iterations
PLAIN_STEPS = 10  # fixed_point's first iterations are plain EM steps: see _fixed_point
NEWTON_STEPS, NEWTON_PATTERNS = 50, 1024  # then Newton on the dual (`_newton`), on at most max(1024, K) patterns
STEP_TOL, FLAT = 1e-13, 1e6  # Newton stops when its step in r is below STEP_TOL·r; FLAT: see _newton_cells
MAX_HALVINGS = 20  # SQUAREM halves an infeasible extrapolation this often, then takes the plain double step


@dataclass(frozen=True)
class _Weights:
    """One batch's objective up to a constant, f(q) = -Σ_c k_c log q_c - Σ_m p^m_⊥ log Q_m, class-major:
    all the EM iterations need."""

    k: Tensor  # (C, B) p^g_c + Σ_{m∈A, c∈S_m} p^m_c: the weight of log q_c
    dustbin: Tensor  # (M, B) p^m_⊥ where m is active, else 0: the weight of log Q_m
    num_active: Tensor  # (B,) |A_b|
    cell: Tensor  # (C,) each class's cell: classes in the same subsets share one
    outside: Tensor  # (M, K) 1 where cell k lies outside S_m, else 0

    def columns(self, keep: Tensor) -> _Weights:
        """The weights of the examples `keep` (a (B,) mask, or their indices) alone."""
        return _Weights(k=self.k[:, keep], dustbin=self.dustbin[:, keep], num_active=self.num_active[keep],
                        cell=self.cell, outside=self.outside)


@dataclass(frozen=True)
class _Problem:
    """One batch: the objective's weights, and what it was made of (the objective's constant, the
    solvers' start)."""

    weights: _Weights
    general: Tensor  # (C, B) p^g
    inside: Tensor  # (L, B) p^m_c at each subset entry (the subsets' ids one after another) where m is active, else 0


Outputs = Sequence[tuple[Tensor, Tensor]]  # per specialist: the examples it ran on, its probabilities there


def combine(p_general: Tensor, specialist_probs: Sequence[Tensor], subsets: Sequence[Sequence[int] | Tensor],
            top_n: int | None = 1, method: Method = "fixed_point", tol: float | None = None,
            max_iter: int = MAX_ITER) -> Tensor:
    """The combined distribution q (B, C) minimising KL(p^g ‖ q) + Σ_{m∈A_b} KL(p^m ‖ q^m) per example.

    p_general: (B, C) generalist probabilities; its dtype and device are the computation's.
    specialist_probs[m]: (B, |S_m| + 1) probabilities of specialist m over S_m, dustbin last.
    subsets[m]: the class ids S_m (a sequence or 1-D integer tensor); subsets may overlap.
    top_n: specialist m is active for example b iff S_m holds one of p^g_b's top_n classes; None: all are.
    The other arguments are `combine_active`'s, which this calls with each specialist's active rows.
    """
    _check_probs(p_general, "p_general")
    ids = _check_subsets(subsets, p_general)
    return _combine(p_general, active_outputs(p_general, specialist_probs, ids, top_n), ids, method, tol, max_iter)


def active_outputs(p_general: Tensor, specialist_probs: Sequence[Tensor], subsets: Sequence[Sequence[int] | Tensor],
                   top_n: int | None = 1) -> list[tuple[Tensor, Tensor]]:
    """Specialists' probabilities on every example (`combine`'s inputs) as `combine_active` takes them:
    per specialist the examples it is active for at `top_n` and its probabilities there."""
    _check_probs(p_general, "p_general")
    ids = _check_subsets(subsets, p_general)
    if len(specialist_probs) != len(ids):
        raise ValueError(f"len(specialist_probs) = {len(specialist_probs)} but len(subsets) = {len(ids)}: "
                         "one probability tensor per subset")
    outputs = []
    for m, (p, s, a) in enumerate(zip(specialist_probs, ids, active_table(p_general, ids, top_n).bool())):
        p = _check_probs(torch.as_tensor(p).to(p_general), f"specialist_probs[{m}]", (len(p_general), len(s) + 1))
        outputs.append((a.nonzero()[:, 0], p[a]))
    return outputs


def combine_active(p_general: Tensor, outputs: Outputs, subsets: Sequence[Sequence[int] | Tensor],
                   method: Method = "fixed_point", tol: float | None = None, max_iter: int = MAX_ITER,
                   overwrite: bool = False) -> Tensor:
    """`combine` where each specialist ran only on the examples it is active for: outputs[m] is
    (rows, probs), the example indices (ascending) and specialist m's (len(rows), |S_m| + 1)
    probabilities on them. This is what the ensemble costs at inference (`Combiner`): a specialist's
    work, and the combiner's, grow with the examples it is active for.

    method: "fixed_point" (EM) or "gradient" (Adam on logits, the slow reference); "within_subset"
        (not a minimiser of the KL objective: the rule in the module's docstring) ignores tol and max_iter.
    tol: fixed_point stops an example when one plain EM step moves the mass of every cell (the classes
        in the same subsets) by less than tol (default: the dtype's eps, at least 1e-10); gradient when
        every example's learning rate, halved each time its objective stalls, is below tol (in logit
        units; default 1e-6).
    max_iter: at most this many iterations (fixed_point: evaluations of the EM update, three per
        SQUAREM cycle; gradient: Adam steps); reaching it with tol > 0 unmet gives a RuntimeWarning
        (tol=0 runs exactly max_iter iterations).
    overwrite: q may be written into p_general's memory (for a caller done with it, as the `Combiner`):
        saves a copy of B × C numbers.
    Examples with no active specialist get q = p^g exactly; with one, fixed_point gives the closed form
    (the module's docstring) without iterating.
    """
    _check_probs(p_general, "p_general")
    ids = _check_subsets(subsets, p_general)
    if len(outputs) != len(ids):
        raise ValueError(f"len(outputs) = {len(outputs)} but len(subsets) = {len(ids)}: one (rows, probs) per subset")
    checked = []
    for m, (rows, p) in enumerate(outputs):
        rows = torch.as_tensor(rows, device=p_general.device)
        if rows.dim() != 1 or rows.is_floating_point() or (len(rows) and (
                rows.min() < 0 or rows.max() >= len(p_general) or (rows[1:] <= rows[:-1]).any())):
            raise ValueError(f"outputs[{m}]'s rows must be ascending example indices in [0, {len(p_general)})")
        p = _check_probs(torch.as_tensor(p).to(p_general), f"outputs[{m}] probabilities", (len(rows), len(ids[m]) + 1))
        checked.append((rows.long(), p))
    return _combine(p_general, checked, ids, method, tol, max_iter, overwrite)


def _combine(p_general: Tensor, outputs: Outputs, ids: list[Tensor], method: Method, tol: float | None,
             max_iter: int, overwrite: bool = False, cells: Cells | None = None) -> Tensor:
    """`combine_active` on checked inputs (`cells`: `_cells(ids)`, where the caller keeps it): the
    examples with no active specialist keep p^g; the others are solved as one smaller problem
    (fixed_point: those with one active specialist in closed form)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    q = p_general if overwrite else p_general.clone()
    if method == "within_subset":
        return _within_subset(q, p_general, outputs, ids)
    num_active = _num_active(outputs, len(p_general), p_general.device)
    if method == "fixed_point":
        _closed_form(q, p_general, outputs, ids, num_active == 1)
    todo = (num_active > (1 if method == "fixed_point" else 0)).nonzero()[:, 0]
    if len(todo):
        rows, outputs = p_general[todo], _restricted(outputs, todo, len(p_general))
        if method == "fixed_point":
            tol = max(torch.finfo(p_general.dtype).eps, 1e-10) if tol is None else tol
            q[todo] = _fixed_point(rows, outputs, ids, cells or _cells(ids, p_general), tol, max_iter)
        else:
            q[todo] = _gradient(_prepare(rows, outputs, ids), 1e-6 if tol is None else tol, max_iter).t()
    return q


def _num_active(outputs: Outputs, num_examples: int, device: torch.device) -> Tensor:
    """(B,) |A_b|: how many specialists ran on each example."""
    count = torch.zeros(num_examples, dtype=torch.long, device=device)
    for rows, _ in outputs:
        count[rows] += 1
    return count


def _restricted(outputs: Outputs, keep: Tensor, num_examples: int) -> list[tuple[Tensor, Tensor]]:
    """`outputs` for the examples `keep` (ascending indices) alone, their rows renumbered 0..len(keep)-1."""
    position = torch.full((num_examples,), -1, dtype=torch.long, device=keep.device)
    position[keep] = torch.arange(len(keep), device=keep.device)
    restricted = []
    for rows, p in outputs:
        new = position[rows]
        kept = new >= 0
        restricted.append((new[kept], p[kept]))
    return restricted


def _closed_form(q: Tensor, p_general: Tensor, outputs: Outputs, ids: list[Tensor], alone: Tensor) -> None:
    """Into q's rows where one specialist is active (`alone`), the minimiser: q_c = (p^g_c + p^m_c)/2 on
    S_m and p^g_c·(P_out + p^m_⊥)/(2·P_out) off it, P_out summed over the classes outside (only
    non-negative terms: never 1 - p^g(S_m), which cancels). O(C) per example, as the softmax."""
    tiny = torch.finfo(p_general.dtype).tiny
    for (rows, p), s in zip(outputs, ids):
        mine = alone[rows]
        rows, p = rows[mine], p[mine]
        if not len(rows):
            continue
        g = p_general[rows]
        inside = g[:, s]
        g[:, s] = 0
        outside = g.sum(dim=1, keepdim=True)
        g *= (outside + p[:, -1:]) / (2 * outside.clamp_min(tiny))
        g[:, s] = (inside + p[:, :-1]) / 2
        q[rows] = g


def _within_subset(q: Tensor, p_general: Tensor, outputs: Outputs, ids: list[Tensor]) -> Tensor:
    """Into q (p^g, or p_general itself), on each active S_m, p^g(S_m) · p^m_c / Σ_{S_m} p^m, p^g
    elsewhere; the mean over the active specialists, built as p^g plus each active one's change on its
    own subset divided by |A| (all changes computed before any is added: q may be p_general):
    O(Σ_m rows_m·|S_m|). Where the specialist's mass on S_m underflowed to 0, the generalist's
    distribution within S_m."""
    tiny = torch.finfo(p_general.dtype).tiny
    num_active = _num_active(outputs, len(p_general), p_general.device).to(p_general.dtype)
    changes = []
    for (rows, p), s in zip(outputs, ids):
        general = p_general[rows[:, None], s]  # (rows, |S_m|) p^g on the subset
        general_mass = general.sum(dim=1, keepdim=True)  # p^g(S_m)
        inside = p[:, :-1]
        mass = inside.sum(dim=1, keepdim=True)  # Σ_{S_m} p^m: not 1 - p^m_⊥, which cancels
        within = torch.where(mass > 0, inside / mass.clamp_min(tiny), general / general_mass.clamp_min(tiny))
        changes.append((general_mass * within - general) / num_active[rows, None])
    for (rows, _), s, change in zip(outputs, ids, changes):
        q.index_put_((rows[:, None], s), change, accumulate=True)
    return q


def objective(p_general: Tensor, specialist_probs: Sequence[Tensor], subsets: Sequence[Sequence[int] | Tensor],
              q: Tensor, top_n: int | None = 1) -> Tensor:
    """(B,) KL(p^g ‖ q) + Σ_{m∈A_b} KL(p^m ‖ q^m) per example, with 0·log 0 = 0 and log q clamped at
    the dtype's smallest normal number (so a q of 0 where p > 0 costs a large, finite penalty)."""
    ids = _check_subsets(subsets, p_general)
    problem = _prepare(p_general, active_outputs(p_general, specialist_probs, ids, top_n), ids)
    if not isinstance(q, Tensor) or q.shape != p_general.shape:
        raise ValueError(f"q must be a tensor of p_general's shape {tuple(p_general.shape)}")
    q = q.to(p_general).t()
    return _objective(problem, _safe_log(q), _outside_mass(problem.weights, q))


def em_step(weights: _Weights, q: Tensor) -> Tensor:
    """One EM update of every column of q (DESIGN.md):

        q_c ← [ k_c + q_c · Σ_{m∈A, c∉S_m} p^m_⊥ / Q_m ] / (1 + |A|),  k_c = p^g_c + Σ_{m∈A, c∈S_m} p^m_c.

    The sum over the active specialists whose subset leaves out c is the same for every class of a
    cell: a (K, B) product of non-negative terms, gathered to the classes. One (C, B) tensor is made
    and worked on in place: at thousands of classes and examples a fresh tensor costs as much as a
    pass of arithmetic."""
    share = 1 / (1 + weights.num_active)
    ratio = weights.dustbin * share / _outside_mass(weights, q)  # (M, B) p^m_⊥ / Q_m / (1 + |A|)
    spread = (weights.outside.t() @ ratio).index_select(0, weights.cell)  # (C, B) the sum above / (1 + |A|)
    return spread.mul_(q).addcmul_(weights.k, share)


def _fixed_point(p_general: Tensor, outputs: Outputs, ids: list[Tensor], cells: Cells, tol: float,
                 max_iter: int) -> Tensor:
    """q (B, C) for examples with active specialists (outputs), by EM on the masses of the cells, then
    each cell's mass shared out in proportion to k_c.

    Classes of one cell get the same factor in every EM update, so the cell masses Q_j follow EM on the
    same objective over cells (k summed per cell) whatever happens inside a cell, and for given cell
    masses f is least with q_c = Q_j·k_c/K_j inside each: the fixed point itself, and at any iterate
    an objective no higher than the class-level EM iterate's. Only which active subsets a cell lies
    outside matters to an example, so where its active specialists' 2^|A| patterns are fewer than the
    cells its cells are merged into them (`_cell_shares`: an example's answer depends on its own
    inputs alone). An iteration costs O(B·|A|·2^|A|), or O(B·M·K), instead of O(B·(C + M·K)).
    Nothing of size C × B is made but p^g's rows and q. A RuntimeWarning if max_iter stopped it before
    tol."""
    num_examples, num_cells = len(p_general), cells.outside.shape[1]
    start = p_general.new_zeros(num_examples, num_cells).index_add_(1, cells.cell, p_general)  # EM's start: p^g
    weight = start.clone()  # K_j = Σ_{c in j} k_c
    dustbin = p_general.new_zeros(len(ids), num_examples)
    for m, ((rows, p), s) in enumerate(zip(outputs, ids)):
        weight[rows] += p.new_zeros(len(rows), num_cells).index_add_(1, cells.cell[s], p[:, :-1])
        dustbin[m, rows] = p[:, -1]
    num_active = _num_active(outputs, num_examples, p_general.device).to(p_general.dtype)
    slots = (dustbin > 0).sum(0)
    share, converged = torch.empty_like(weight), True
    for group in (slots <= math.log2(num_cells), slots > math.log2(num_cells)):  # patterns fewer than cells, or not
        if group.any():
            share[group], done = _cell_shares(weight[group], start[group], dustbin[:, group], num_active[group],
                                              cells.outside, tol, max_iter)
            converged &= done
    if not converged:
        _warn_unconverged("fixed_point", max_iter, tol)
    q = p_general * share.index_select(1, cells.cell)
    for (rows, p), s in zip(outputs, ids):
        q.index_put_((rows[:, None], s), p[:, :-1] * share[rows][:, cells.cell[s]], accumulate=True)
    return q


def _cell_shares(weight: Tensor, start: Tensor, dustbin: Tensor, num_active: Tensor, outside: Tensor, tol: float,
                 max_iter: int) -> tuple[Tensor, bool]:
    """EM (`_em`) on examples' cell weights K_j (B, K), from their masses under p^g `start`, merged into
    the patterns of their active subsets where `_patterns` can: each cell's share Q_j/K_j (B, K) at the
    end (a pattern's share for each of its cells), and whether every example converged."""
    num_examples, num_cells = weight.shape
    patterns = _patterns(outside, dustbin, num_cells)  # only where it makes the problem smaller
    if patterns is None:
        group = torch.arange(num_cells, device=weight.device).expand(num_examples, num_cells)
        reduced = _Weights(k=weight.t().contiguous(), dustbin=dustbin, num_active=num_active, cell=group[0],
                           outside=outside)
    else:  # each cell to its pattern: (B, K) -> (B, 2^A)
        order, valid, group, table = patterns
        def merge(x: Tensor) -> Tensor:
            return x.new_zeros(num_examples, table.shape[1]).scatter_add_(1, group, x)
        weight, start = merge(weight), merge(start)
        reduced = _Weights(k=weight.t().contiguous(), dustbin=(dustbin.t().gather(1, order) * valid).t().contiguous(),
                           num_active=num_active, cell=torch.arange(table.shape[1], device=weight.device),
                           outside=table)
    masses, converged = _em(reduced, start.t().contiguous(), tol, max_iter)
    share = torch.where(weight > 0, masses.t() / weight.clamp_min(torch.finfo(weight.dtype).tiny), 0)
    return share.gather(1, group), converged


def _patterns(outside: Tensor, dustbin: Tensor, most: int) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Each example's active specialists (with a dustbin mass) as slots, and each cell's pattern: which
    slots' subsets it lies outside, as the bits of a number below 2^A. Returns the slots' specialists
    (B, A) and which slots hold one (B, A), the cells' patterns (B, K), and the (A, 2^A) table, 1 where
    pattern p lies outside slot a's subset; None where 2^A (A the most slots of any example) exceeds
    `most`."""
    free = dustbin > 0
    width = max(1, int(free.sum(0).max()))
    if 2**width > most:
        return None
    order = free.t().to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]  # (B, A)
    valid = free.t().gather(1, order)
    bits = 2 ** torch.arange(width, device=outside.device)
    outside_bits = outside.to(torch.uint8)
    pattern = torch.zeros(len(order), outside.shape[1], dtype=torch.long, device=outside.device)
    for a in range(width):  # slot a's bit: the cell lies outside the subset of the example's a-th specialist
        pattern += (outside_bits[order[:, a]] * valid[:, a, None]).long() << a
    table = (torch.arange(2**width, device=outside.device)[None] // bits[:, None] % 2).to(outside.dtype)
    return order, valid, pattern, table


def _em(weights: _Weights, q: Tensor, tol: float, max_iter: int) -> tuple[Tensor, bool]:
    """EM from q (p^g), each example until one of its plain EM steps moves it by max |Δq| < tol; one
    iteration is one evaluation of `em_step`. The first PLAIN_STEPS iterations are plain steps q ← F(q):
    the first solves an example with one active specialist exactly (the closed form), so it stops
    there; examples that converge fast stop within them. Then each `_squarem` step costs three
    iterations; a max_iter ending inside one ends with plain steps instead. Between the plain steps and
    SQUAREM, `_newton` jumps each example still moving to the minimum, where that lowers f (it does but
    for the rare example whose minimum lies beyond float precision in Newton's variables): EM's own
    steps then confirm convergence, or go on. f never increases from one iterate to the next. Once a
    quarter of the examples still iterating have converged, the rest go on as a smaller problem.
    Returns each example's last iterate (in q's memory: q is used up) and whether every example
    converged."""
    result, todo = q, torch.arange(q.shape[1], device=q.device)  # the examples still iterating
    q, step_max = q.clone(), torch.ones_like(weights.num_active)  # SQUAREM's β_max per example
    iterations, converged = 0, False
    while iterations < max_iter and not converged:
        if iterations < PLAIN_STEPS or max_iter - iterations < 3:
            new = em_step(weights, q)
            moving = _max_abs(q.sub_(new)) >= tol  # q is spent: it holds q - new
            iterations += 1
        else:
            new, moving, step_max = _squarem(weights, q, step_max, tol)
            iterations += 3
        q, converged, newton = new, not moving.any(), iterations == PLAIN_STEPS
        if newton and not converged:  # Newton's answer where it lowers f
            jumped = _newton(weights, q)
            q = torch.where(_gain(weights, q, jumped) >= 0, jumped, q)
        if not converged and (newton or 4 * int(moving.sum()) <= 3 * len(todo)):
            result[:, todo] = q
            todo, q, weights, step_max = todo[moving], q[:, moving], weights.columns(moving), step_max[moving]
    result[:, todo] = q
    return result, converged


def _newton(weights: _Weights, q: Tensor) -> Tensor:
    """The minimiser of f for each example (column of q), by Newton's method on the dual, from q.

    With r_a = p^a_⊥ / Q_a for the active specialists a, the minimum has q_j = K_j / t_j on each cell,
    t_j = 1 + |A| - Σ_{a: j outside S_a} r_a, and r is the minimum of the convex function
    φ(r) = -Σ_j K_j log t_j - Σ_a p^a_⊥ log r_a, whose gradient is Q_a(r) - p^a_⊥/r_a: |A| unknowns
    per example, not C. Only which active subsets a cell lies outside matters, so cells are merged
    into the 2^|A| possible patterns (each pattern's mass shared out in proportion to K_j, as at the
    minimum). Damped Newton (backtracking until φ falls and r, t stay positive; near the minimum,
    where φ cannot resolve the decrease any more, full steps until r stops moving) converges
    quadratically where EM crawls; t_j is a difference of numbers of order 1 + |A|, so where q_j is
    far above K_j the answer is exact only to about eps·(1 + |A|)/t_j relatively (1e-9 in the tests'
    slow case): EM's steps after it finish the job. Where the patterns would be more than
    NEWTON_PATTERNS and the cells (over 10 active specialists), EM alone goes on."""
    patterns = _patterns(weights.outside, weights.dustbin, max(NEWTON_PATTERNS, weights.outside.shape[1]))
    if patterns is None:
        return q
    order, valid, pattern, merged = patterns
    k = weights.k.t()
    cells_k = k.new_zeros(len(k), merged.shape[1]).scatter_add_(1, pattern, k)
    cells_q = k.new_zeros(len(k), merged.shape[1]).scatter_add_(1, pattern, q.t())
    d = weights.dustbin.t().gather(1, order) * valid
    r = torch.where(valid, d / (cells_q @ merged.t()).clamp_min(torch.finfo(q.dtype).tiny), 0)
    masses = _newton_cells(cells_k, d, valid, merged, 1 + weights.num_active, r)
    share = torch.where(cells_k > 0, masses / cells_k.clamp_min(torch.finfo(q.dtype).tiny), 0)
    return (k * share.gather(1, pattern)).t()


def _newton_cells(k: Tensor, d: Tensor, valid: Tensor, outside: Tensor, total: Tensor, r: Tensor) -> Tensor:
    """`_newton` on merged cells, example-major: k (B, P) the patterns' weights, d (B, A) dustbin masses,
    valid (B, A) which of the A slots hold an active specialist, outside (A, P) 1 where pattern p lies
    outside slot a's subset, total (B,) 1 + |A|, r (B, A) the start. Returns the masses K_p / t_p (B, P),
    renormalised, and which examples converged."""
    live, tiny, out = k > 0, torch.finfo(k.dtype).tiny, outside

    def phi(r: Tensor) -> tuple[Tensor, Tensor]:
        t = total[:, None] - r @ out
        feasible = ((t > 0) | ~live).all(1) & ((r > 0) | ~valid).all(1)
        value = -(k * torch.where(live, t, 1).log()).sum(1) - (d * torch.where(valid, r, 1).log()).sum(1)
        return torch.where(feasible, value, torch.inf), t

    value, t = phi(r)
    start = value.isinf()  # q's r leaves the domain: start where every t_p ≥ 1 instead
    r = torch.where(start[:, None], d, r)
    value, t = phi(r)
    done = torch.zeros_like(valid[:, 0])
    for _ in range(NEWTON_STEPS):
        mass = torch.where(live, k / t, 0)  # q_p at r
        inverse = torch.where(valid, 1 / r.clamp_min(tiny), 0)
        grad = torch.where(valid, mass @ out.t() - d * inverse, 0)
        curvature = mass / torch.where(live, t, 1)  # K_p / t_p²
        hessian = torch.einsum("ap,cp,bp->bac", out, out, curvature) + torch.diag_embed(
            torch.where(valid, d * inverse**2, 1))
        hessian = torch.where(valid[:, :, None] & valid[:, None, :], hessian, torch.diag_embed(
            torch.where(valid, 0.0, 1.0).to(k.dtype)) + hessian * torch.eye(len(out), dtype=k.dtype, device=k.device))
        step = -torch.linalg.solve(hessian, grad.unsqueeze(-1)).squeeze(-1)
        decrement = -(grad * step).sum(1)  # the decrease Newton's model predicts, twice
        done |= ~(decrement > 0) | (step.abs() <= STEP_TOL * r).all(1)  # r converged to its precision
        if done.all():
            break
        # Below what φ can resolve (a few eps of its value) a decrease cannot be checked: near the
        # minimum the full step is taken where it stays feasible (a small dustbin makes its r tiny,
        # and φ's terms in it far below φ's rounding)
        unresolved = decrement <= FLAT * torch.finfo(k.dtype).eps * value.abs().clamp_min(1)
        alpha = torch.where(done, 0.0, 1.0).to(k.dtype)
        for _ in range(60):  # backtracking: φ falls by at least a quarter of the predicted decrease
            trial, trial_t = phi(r + alpha[:, None] * step)
            good = done | (trial <= value - alpha * decrement / 4) | (unresolved & trial.isfinite())
            if good.all():
                break
            alpha = torch.where(good, alpha, alpha / 2)
        take = ~done & good
        r = torch.where(take[:, None], r + alpha[:, None] * step, r)
        value, t = torch.where(take, trial, value), torch.where(take[:, None], trial_t, t)
        done |= ~good  # no step lowers φ beyond rounding: as close as its variables allow
    mass = torch.where(live, k / t, 0)
    return mass / mass.sum(1, keepdim=True)


def _squarem(weights: _Weights, q: Tensor, step_max: Tensor, tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """One SQUAREM step from q (Varadhan & Roland 2008, scheme S3): three EM evaluations that go as far as
    many plain EM steps where EM crawls. It does with several active specialists whose subsets overlap,
    converging linearly at a rate near 1: in the tests' slow case plain EM takes over 500 iterations and
    this a quarter of them. Per example:

        q1 = F(q), q2 = F(q1), r = q1 - q, v = q2 - 2·q1 + q, β = min(max(1, ‖r‖/‖v‖), β_max),
        q' = q + 2β·r + β²·v,  and the new iterate is F(q') if f(F(q')) ≤ f(q2), else q2.

    β = 1 (q' = q2) is two plain steps, so every iterate is an EM image and f never rises. The bound
    β_max starts at 1 and, as in the authors' SQUAREM software (step.max0 = 1, mstep = 4), is multiplied
    by 4 when a step at the bound is accepted and divided by 4 (down to 1) when one is rejected: along a
    slow, curved EM path a long extrapolation overshoots. Returns the new iterate, which examples moved
    by at least tol in both plain steps, and the new β_max. q's values are used up."""
    q1 = em_step(weights, q)
    q2 = em_step(weights, q1)
    back, step = q.sub_(q1), q1.sub_(q2)  # q - q1 = -r and q1 - q2 = r - v, in the memory of q and q1
    moving = (_max_abs(back) >= tol) & (_max_abs(step) >= tol)
    ratio = (back.square().sum(0) / (back - step).square_().sum(0)).sqrt_()  # ‖r‖/‖v‖
    at_max = ratio >= step_max  # ‖v‖ = 0 gives inf (at the bound) or, with r = 0 too, NaN (β = 1)
    beta = torch.minimum(ratio.nan_to_num(1.0), step_max).clamp_min(1)
    candidate = em_step(weights, _extrapolate(q2, back, step, beta - 1))
    accepted = _gain(weights, q2, candidate) >= 0
    step_max = torch.where(at_max, torch.where(accepted, 4 * step_max, (step_max / 4).clamp_min(1)), step_max)
    return torch.where(accepted, candidate, q2, out=candidate), moving, step_max


def _extrapolate(q2: Tensor, back: Tensor, step: Tensor, gamma: Tensor) -> Tensor:
    """SQUAREM's q' = q + 2β·r + β²·v written around q2: q2 + γ²·back - γ(γ + 2)·step, with back = q - q1,
    step = q1 - q2 and γ = β - 1 ≥ 0 per example, so that γ = 0 gives q2 exactly. Where q' has an entry
    that is not finite, or ≤ 0 unlike q2's, γ is halved; after MAX_HALVINGS halvings it is 0."""
    for halvings in range(MAX_HALVINGS + 2):
        extrapolated = torch.addcmul(q2, back, gamma * gamma).addcmul_(step, -gamma * (gamma + 2))
        bad = ~(((extrapolated > 0) | (extrapolated == q2)).all(0) & extrapolated.sum(0).isfinite())
        if not bad.any():
            break
        gamma = torch.where(bad, gamma / 2 if halvings < MAX_HALVINGS else 0, gamma)
    return extrapolated


def _max_abs(x: Tensor) -> Tensor:
    """(B,) max_c |x_c| per example."""
    return torch.maximum(x.amax(0), x.amin(0).neg_())


def _gain(weights: _Weights, q: Tensor, new: Tensor) -> Tensor:
    """(B,) f(q) - f(new) = Σ_c k_c log(new_c/q_c) + Σ_m p^m_⊥ log(Q_m(new)/Q_m(q)), each log ratio the
    log1p of a relative change. Near the minimum f(q) and f(new) agree to within their rounding, and
    their difference would be noise; this sum keeps the sign of the change (NaN, so never ≥ 0, should
    rounding put a relative change below -1)."""
    change = new - q
    outside = weights.dustbin * torch.log1p(weights.outside @ _cell_sums(weights, change) / _outside_mass(weights, q))
    inside = change.div_(q.clamp_min(torch.finfo(q.dtype).tiny)).log1p_().mul_(weights.k)  # change no longer needed
    return inside.sum(0) + outside.sum(0)


def _gradient(problem: _Problem, tol: float, max_iter: int) -> Tensor:
    """Adam on z from z = log p^g, with a learning rate per example (in logit units) halved whenever
    that example's objective has gone PATIENCE steps without a new best (lower by a relative
    MIN_GAIN or 16 eps: less is rounding, or progress too slow to matter); an example has converged
    once its rate is below tol. Returns each example's best iterate.

    Plain or accelerated descent crawls here: the curvature along z_c scales with q_c, so the
    thousands of small classes that share a dustbin's mass move ~q_c per step; Adam's per-coordinate
    scaling moves them all alike. Its epsilon, √tiny, bounds every step by the rate even when
    the squared gradient underflows."""
    beta1, beta2 = ADAM_BETAS
    finfo = torch.finfo(problem.general.dtype)
    z = best = _safe_log(problem.general)
    best_f, grad = _value_and_grad(problem, z)
    rate = torch.full_like(best_f, ADAM_RATE)
    stale = torch.zeros_like(rate)  # steps since the example's last new best
    mean, square = torch.zeros_like(z), torch.zeros_like(z)
    for t in range(1, max_iter + 1):
        mean.lerp_(grad, 1 - beta1)
        square.lerp_(grad * grad, 1 - beta2)
        z = z - rate * (mean / (1 - beta1**t)) / ((square / (1 - beta2**t)).sqrt() + finfo.tiny**0.5)
        f, grad = _value_and_grad(problem, z)
        improved = f < best_f - max(MIN_GAIN, 16 * finfo.eps) * best_f.abs().clamp_min(1)
        best, best_f = torch.where(improved, z, best), torch.where(improved, f, best_f)
        stale = torch.where(improved, 0, stale + 1)
        rate, stale = torch.where(stale >= PATIENCE, rate / 2, rate), torch.where(stale >= PATIENCE, 0, stale)
        if (rate < tol).all():
            break
    else:
        _warn_unconverged("gradient", max_iter, tol)
    return _log_softmax(best).exp()


def _warn_unconverged(method: str, max_iter: int, tol: float) -> None:
    """A RuntimeWarning that max_iter, not tol, stopped the solver; tol=0 asks for exactly max_iter
    iterations and gets none."""
    if tol > 0:
        warnings.warn(f"combine: {method} stopped at max_iter={max_iter} before reaching tol={tol:g}",
                      RuntimeWarning, stacklevel=3)


def _value_and_grad(problem: _Problem, z: Tensor) -> tuple[Tensor, Tensor]:
    """f at q = softmax(z) per example, and its gradient in z, by autograd."""
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        log_q = _log_softmax(z)
        f = _objective(problem, log_q, _outside_mass(problem.weights, log_q.exp()))
        (grad,) = torch.autograd.grad(f.sum(), z)
    return f.detach(), grad


def _log_softmax(z: Tensor) -> Tensor:
    """log softmax over dim 0 as z - logsumexp(z): torch's own log_softmax along a dim that is not the
    last loses ~1e-4 of the normaliser over 15,000 float32 classes, and the objective multiplies
    that error by 1 + |A|."""
    return z - torch.logsumexp(z, dim=0)


def _objective(problem: _Problem, log_q: Tensor, outside: Tensor) -> Tensor:
    """f = Σ p log p - Σ_c k_c log q_c - Σ_m p^m_⊥ log Q_m per example: the KLs' entropy terms over
    p^g and the active specialists, minus the cross terms."""
    w = problem.weights
    entropy = _xlogx(problem.general) + _xlogx(problem.inside) + _xlogx(w.dustbin)
    return entropy - (w.k * log_q).sum(0) - (w.dustbin * _safe_log(outside)).sum(0)


def _outside_mass(weights: _Weights, q: Tensor) -> Tensor:
    """(M, B) Q_m = Σ_{c∉S_m} q_c, the mass of q outside each subset, at least the dtype's tiny: q
    summed per cell, then over the cells outside S_m. Only non-negative terms are added, so Q_m keeps
    its relative precision however small it is."""
    return (weights.outside @ _cell_sums(weights, q)).clamp_min_(torch.finfo(q.dtype).tiny)


def _cell_sums(weights: _Weights, x: Tensor) -> Tensor:
    """(K, B) Σ of x over the classes of each cell."""
    return x.new_zeros(weights.outside.shape[1], x.shape[1]).index_add_(0, weights.cell, x)


def _safe_log(x: Tensor) -> Tensor:
    """log x with x clamped at the dtype's tiny: finite, so 0·log 0 = 0."""
    return x.clamp_min(torch.finfo(x.dtype).tiny).log()


def _xlogx(p: Tensor) -> Tensor:
    """Σ p log p over dim 0, with 0 log 0 = 0."""
    return torch.special.xlogy(p, p).sum(0)


def _prepare(p_general: Tensor, outputs: Outputs, ids: list[Tensor]) -> _Problem:
    """The class-major tensors the iterative solvers and `objective` use, from checked inputs."""
    num_examples = len(p_general)
    sizes = torch.tensor([len(s) for s in ids], dtype=torch.long, device=p_general.device)
    index = torch.cat([sizes.new_zeros(0), *ids])
    inside = p_general.new_zeros(len(index), num_examples)  # p^m_c at each subset entry where m is active
    dustbin = p_general.new_zeros(len(ids), num_examples)
    num_active = p_general.new_zeros(num_examples)
    start = 0
    for m, ((rows, p), s) in enumerate(zip(outputs, ids)):
        inside[start:start + len(s), rows] = p[:, :-1].t()
        dustbin[m, rows] = p[:, -1]
        num_active[rows] += 1
        start += len(s)
    general = p_general.t().clone(memory_format=torch.contiguous_format)  # a copy even for one example: solved in place
    cells = _cells(ids, p_general)
    weights = _Weights(k=general.index_add(0, index, inside), dustbin=dustbin, num_active=num_active,
                       cell=cells.cell, outside=cells.outside)
    return _Problem(weights=weights, general=general, inside=inside)


@dataclass(frozen=True)
class Cells:
    """The classes grouped by the subsets they lie in: what EM needs of the subsets."""

    cell: Tensor  # (C,) each class's cell: classes in exactly the same subsets share one
    outside: Tensor  # (M, K) 1 where cell k lies outside S_m, else 0, in the probabilities' dtype


def _cells(ids: list[Tensor], like: Tensor) -> Cells:
    """The `Cells` of the subsets `ids` over like's C classes (like: (B, C) probabilities)."""
    num_classes, num_subsets = like.shape[1], len(ids)
    if num_subsets == 0:
        return Cells(torch.zeros(num_classes, dtype=torch.long, device=like.device), like.new_zeros(0, 1))
    member = torch.zeros(num_classes, num_subsets, dtype=torch.bool, device=like.device)
    for m, s in enumerate(ids):
        member[s, m] = True
    signatures, cell = torch.unique(member, dim=0, return_inverse=True)
    return Cells(cell, (~signatures).t().to(like.dtype).contiguous())


def _check_probs(p: Tensor, name: str, shape: tuple[int, int] | None = None) -> Tensor:
    """`p` if it is a 2-D floating tensor of the expected shape whose rows are probability
    distributions, else a ValueError naming what is wrong. Two passes over p: its minimum (NaN
    propagates) and its row sums (which catch inf and logits)."""
    if not isinstance(p, Tensor) or not p.is_floating_point() or p.dim() != 2:
        raise ValueError(f"{name} must be a 2-D floating-point tensor (examples × classes)")
    if shape is not None and tuple(p.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(p.shape)}, expected {shape} "
                         "(the batch size, and the subset's size + 1 for the dustbin)")
    if p.numel() and not p.min() >= 0:
        raise ValueError(f"{name} holds negative or NaN values: it must hold probabilities")
    if p.numel() and not ((p.sum(1) - 1).abs() <= SUM_TOLERANCE).all():
        raise ValueError(f"{name}'s rows must sum to 1 (within {SUM_TOLERANCE}): pass probabilities, not logits")
    return p


def _check_subsets(subsets: Sequence[Sequence[int] | Tensor], p_general: Tensor) -> list[Tensor]:
    """Each subset checked by `_check_subset`, on p_general's device."""
    return [_check_subset(s, m, p_general.shape[1], p_general.device) for m, s in enumerate(subsets)]


def _check_subset(subset: Sequence[int] | Tensor, m: int, num_classes: int, device: torch.device) -> Tensor:
    """Subset m as a 1-D long tensor of distinct class ids in [0, num_classes), or a ValueError."""
    ids = torch.as_tensor(subset, device=device)
    if ids.numel() == 0:
        return ids.long().reshape(0)
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"subsets[{m}] must be a 1-D sequence of integer class ids")
    ids = ids.long()
    if ids.min() < 0 or ids.max() >= num_classes:
        raise ValueError(f"subsets[{m}] holds class ids outside [0, {num_classes}): "
                         f"{ids[(ids < 0) | (ids >= num_classes)].tolist()[:5]}")
    if len(ids.unique()) != len(ids):
        raise ValueError(f"subsets[{m}] repeats a class id")
    return ids


def active_specialists(p_general: Tensor, subsets: Sequence[Sequence[int] | Tensor], top_n: int | None = 1) -> Tensor:
    """(M, B) bool: specialist m is active for example b, its subset holding one of p^g_b's top_n classes
    (all are for top_n=None). The rule `combine` applies; `Combiner` uses it to run only those."""
    _check_probs(p_general, "p_general")
    return active_table(p_general, _check_subsets(subsets, p_general), top_n).bool()
