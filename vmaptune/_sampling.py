"""How configs are drawn: a round's batch, a refill, the seeds they train with.

Shared by the strategies. Every draw is deterministic given the search seed
and named random streams (:class:`Stream`), so a resumed search draws the
same configs as an uninterrupted one.
"""

from __future__ import annotations

import collections
import enum
import itertools
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import _space
from ._region import Region, coords, grid_values, sample_values
from ._space import Choice, Distribution, Integer
from ._trial import Trial

__all__ = ["Stream", "trial_seed", "Drawer", "check_enqueued", "nearest_finder"]


class Stream(enum.IntEnum):
  """Named random streams: each decision draws from its own, so adding a draw
  to one never shifts another."""

  TRIAL = 0x7A11        # a trial's seed (init, data order, dropout)
  SPLIT = 0x5EED        # the train/validation split (_data)
  REFILL = 0x4A11       # halving: refill configs and the seeds of refilled trials
  TPE_ROUND = 0x7E      # TPE's seed for a zoom round's batch
  TPE_REFILL = 0xB0B    # TPE's seed for a halving segment's refills
  PBT = 0x9B7           # PBT: sources, perturbations, redraws
  ADAPTIVE = 0xADA      # adaptive: a decision's refills
  RECHECK = 0x2EC4      # the fresh seeds of SearchResult.recheck


def trial_seed(seed: int, round_index: int, position: int) -> int:
  """The seed of the trial at ``position`` in round ``round_index``.

  Derived from the position alone (not from how many configs the round has),
  so a config keeps its seed, and its numbers, in a population of any size.
  """
  state = np.random.SeedSequence([seed, round_index, position, Stream.TRIAL]).generate_state(1)
  return int(state[0] & 0x7FFFFFFF)


def check_enqueued(space: Mapping[str, Any], enqueue: Any) -> list[dict]:
  """Validates configs to train first (as Optuna's ``enqueue_trial``)."""
  if enqueue is None:
    return []
  if isinstance(enqueue, Mapping) or not isinstance(enqueue, Sequence):
    raise TypeError("`enqueue` must be a list of config dicts.")
  searched = _space.searched(space)
  out = []
  for j, c in enumerate(enqueue):
    if not isinstance(c, Mapping):
      raise TypeError(f"enqueue[{j}] must be a dict, got {type(c).__name__}.")
    missing = [k for k in searched if k not in c]
    extra = [k for k in c if k not in space]
    if missing or extra:
      raise ValueError(f"enqueue[{j}] must set exactly the searched keys; missing {missing}, unknown {extra}.")
    full = {}
    for k, v in space.items():
      if k not in searched:
        if k in c and c[k] != v:
          raise ValueError(f"enqueue[{j}][{k!r}]={c[k]!r} differs from the space's constant {v!r}.")
        full[k] = v
        continue
      d = searched[k]
      val = c[k]
      if isinstance(d, Choice):
        if val not in d.values:
          raise ValueError(f"enqueue[{j}][{k!r}]={val!r} is not one of {list(d.values)}.")
        val = list(d.values)[list(d.values).index(val)]  # the space's own value (np.int64(32) -> 32)
      else:
        if isinstance(val, bool) or not isinstance(val, numbers.Real) or not math.isfinite(val):
          raise ValueError(f"enqueue[{j}][{k!r}] must be a finite number, got {val!r}.")
        # A value rounded to float32 may land a hair outside: clip within 1e-6.
        slack = 1e-6 * max(abs(d.low), abs(d.high), 1e-30)
        if not d.low - slack <= val <= d.high + slack:
          raise ValueError(f"enqueue[{j}][{k!r}]={val!r} is outside [{d.low}, {d.high}].")
        val = int(val) if isinstance(d, Integer) else float(min(max(val, d.low), d.high))
      full[k] = val
    out.append(full)
  return out


def nearest_finder(space, top: Sequence[Trial]) -> Callable[[Mapping[str, Any]], int | None]:
  """``config -> id`` of the closest of the ``top`` trials: squared distance in
  sampling coordinates plus one per differing choice; ties go to the lower id.

  Choice values (hashable) become integer codes, so each query is one
  vectorised comparison against all of ``top``, not a Python loop.
  """
  if not top:
    return lambda config: None
  dists = _space.searched(space)
  numeric = [k for k, d in dists.items() if not isinstance(d, Choice)]
  cats = [k for k, d in dists.items() if isinstance(d, Choice)]
  points = np.asarray([coords(space, t.config, numeric) for t in top], np.float64).reshape(len(top), -1)
  codes: dict[str, dict] = {k: {} for k in cats}
  labels = np.asarray([[codes[k].setdefault(t.config[k], len(codes[k])) for k in cats] for t in top],
                      np.int64).reshape(len(top), len(cats))
  ids = np.asarray([t.id for t in top])

  def nearest(config: Mapping[str, Any]) -> int:
    x = coords(space, config, numeric)
    d = np.sum((points - x) ** 2, axis=1)
    d += np.sum(labels != np.asarray([codes[k].get(config[k], -1) for k in cats], np.int64), axis=1)
    return int(ids[np.lexsort((ids, d))[0]])

  return nearest


# --------------------------------------------------------------------------
# Static signatures: how many compiled programs a round needs
# --------------------------------------------------------------------------


def _finite_values(d: Distribution, region) -> list | None:
  if isinstance(d, Choice):
    return list(d.values if region is None else region)
  if isinstance(d, Integer):
    lo, hi = d.bounds() if region is None else region
    a, b = d.from_coord(lo + 1e-9), d.from_coord(hi - 1e-9)
    if b - a > 10_000:
      return None
    return list(range(a, b + 1))
  return None


def draw_signatures(dists: Mapping[str, Distribution], region: Region, rng, k: int) -> list[dict]:
  """Up to ``k`` distinct values of the structural keys, drawn at random
  (all of them when there are at most ``k``)."""
  if not dists:
    return [{}]
  finite = {name: _finite_values(d, region.get(name)) for name, d in dists.items()}
  if all(v is not None for v in finite.values()):
    size = math.prod(len(v) for v in finite.values())
    if size <= k:
      names = list(dists)
      return [dict(zip(names, combo)) for combo in itertools.product(*(finite[n] for n in names))]
  out, seen = [], set()
  for _ in range(50 * k):
    cand = sample_values(dists, rng, 1, region)[0]
    sig = tuple(cand.items())
    if sig not in seen:
      seen.add(sig)
      out.append(cand)
      if len(out) == k:
        break
  return out


def cap_signatures(configs: list[dict], keys: Sequence[str], cap: int) -> list[dict]:
  """Keeps at most ``cap`` distinct values of ``keys``: lanes proposing others
  take the most proposed ones in turn (each a compiled program)."""
  if not keys:
    return configs
  sig = lambda c: tuple(c[k] for k in keys)
  counts = collections.Counter(sig(c) for c in configs)
  if len(counts) <= cap:
    return configs
  kept = [s for s, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:cap]]
  out, j = [], 0
  for c in configs:
    if sig(c) not in kept:
      c = dict(c, **dict(zip(keys, kept[j % cap])))
      j += 1
    out.append(c)
  return out


def lane_counts(k: int, n: int, lanes_per_program: int) -> list[int]:
  """Spreads ``n`` lanes over ``k`` signatures in whole programs where possible."""
  chunks = max(k, -(-n // lanes_per_program))
  per = [chunks // k + (1 if j < chunks % k else 0) for j in range(k)]
  counts = [min(n * c // chunks, c * lanes_per_program) for c in per]
  j = 0
  while sum(counts) < n:
    if counts[j % k] < per[j % k] * lanes_per_program:
      counts[j % k] += 1
    j += 1
  for j in range(k):  # every signature drawn gets at least one lane
    if counts[j] == 0:
      donor = int(np.argmax(counts))
      counts[donor] -= 1
      counts[j] = 1
  return counts


# --------------------------------------------------------------------------
# Drawing configs
# --------------------------------------------------------------------------


class Drawer:
  """Draws batches and refills with the search's sampler.

  Args:
    space: the validated space.
    sampler: ``"random"``, ``"sobol"``, ``"halton"``, ``"grid"`` or ``"tpe"``.
    seed: the search seed.
    maximize: the metric's direction (TPE).
    signature_keys: the keys that decide a config's compiled program.
    max_buckets: the most distinct signatures per batch.
    capacity: ``capacity(wanted) -> lanes per program``: the search's
      program size, fixed by its first call (so later rounds reuse programs).
  """

  def __init__(self, space: Mapping[str, Any], *, sampler: str, seed: int, maximize: bool,
               signature_keys: Sequence[str], max_buckets: int, capacity: Callable[[int], int]):
    self.space = space
    self.sampler = sampler
    self.seed = seed
    self.maximize = maximize
    self.max_buckets = max_buckets
    self.capacity = capacity
    dists = _space.searched(space)
    keys = set(signature_keys)
    self.structural = {k: d for k, d in dists.items() if k in keys}
    self.rest = {k: d for k, d in dists.items() if k not in keys}

  def batch(self, r: int, n: int, region: Region, history: Sequence[Trial] = (), sampler: str | None = None
            ) -> list[dict]:
    """Round ``r``'s ``n`` configs inside ``region`` (TPE: from ``history``),
    drawn by the search's sampler or by ``sampler``."""
    rng = np.random.default_rng([self.seed, r, 0])
    sampler = sampler or self.sampler
    if sampler == "grid":
      return [_space.complete(self.space, c) for c in grid_values(_space.searched(self.space), n, region)]
    cap = min(self.max_buckets, n)
    if sampler == "tpe":
      from ._samplers import TPEProposer

      # A fresh sampler seeded by (seed, round) and rebuilt from the history:
      # round r's proposals depend on the finished trials alone (resumable).
      proposer = TPEProposer(self.space, seed=trial_seed(self.seed, r, Stream.TPE_ROUND), maximize=self.maximize)
      proposer.tell([t.config for t in history], [t.score for t in history], [t.status == "ok" for t in history])
      proposals = cap_signatures(proposer.ask(n), list(self.structural), cap)
      k = len({tuple(c[name] for name in self.structural) for c in proposals})
      self.capacity(-(-n // k))
      return [_space.complete(self.space, c) for c in proposals]
    sigs = draw_signatures(self.structural, region, rng, cap)
    per_program = self.capacity(-(-n // len(sigs)))
    counts = lane_counts(len(sigs), n, per_program)
    lane_sigs = [s for s, c in zip(sigs, counts) for _ in range(c)]
    if sampler in ("sobol", "halton"):
      from ._samplers import qmc_values

      values = qmc_values(self.rest, n, region, sampler, (self.seed, r))
    else:
      values = sample_values(self.rest, rng, n, region)
    return [_space.complete(self.space, lane_sigs[i], values[i]) for i in range(n)]

  def refill(self, signature: tuple, region: Region, rng: np.random.Generator) -> dict:
    """One config inside ``region`` that keeps ``signature`` (its lane's program)."""
    fixed = dict(signature)
    rest = {k: d for k, d in _space.searched(self.space).items() if k not in fixed}
    values = sample_values(rest, rng, 1, region)[0]
    return _space.complete(self.space, fixed, values)

  def tpe_refills(self, observations: Sequence[tuple[dict, float]], signatures: Sequence[tuple],
                  seed: int) -> list[dict]:
    """Configs proposed by TPE fitted on ``observations`` ``(config, score)``,
    each keeping the structural keys of its ``signatures`` entry; the whole
    batch is asked at once with the constant liar so it spreads out."""
    from ._samplers import TPEProposer

    proposer = TPEProposer(self.space, seed=seed, maximize=self.maximize)
    proposer.tell([c for c, _ in observations], [s for _, s in observations], [True] * len(observations))
    fixed = [{k: v for k, v in sig if k in self.space} for sig in signatures]
    return [_space.complete(self.space, c) for c in proposer.ask(len(signatures), fixed)]
