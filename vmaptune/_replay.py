"""Replaying a trial exactly, re-training configs with other seeds, and a
lane's parameters on the host."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ._placement import lane_params, to_host
from ._plan import Plan
from ._population import Chunk, Population, ProgramRef, Slot
from ._strategy import Cadence, NewTrial
from ._trial import Run, Stats, Trial

__all__ = ["Replay"]


class Replay:
  """What a result needs to rebuild a model and replay a trial exactly."""

  def __init__(self, plan: Plan, population: Population):
    self.plan = plan
    self.population = population

  def model(self, trial: Trial, params, model_state):
    ref = self.population.refs[trial.id]
    return self.plan.spec(ref.signature).adapter.build(params, model_state)

  def run(self, trial: Trial, metric: str, maximize: bool, stats: Stats | None = None,
          steps: int | None = None, alone: bool = True) -> Run:
    """Trains ``trial`` again in its own program, at its own lane, every other
    lane idle (with its inputs; a CPU skips it) or, with ``alone=False``, a
    copy of it: the same numbers bit for bit either way, as no lane depends
    on another (its time and lane-steps count in ``stats`` if given).
    ``steps`` (default: the trial's own) trains a stopped trial on past where
    it stopped: its first steps as before."""
    ref = self.population.refs[trial.id]
    steps = trial.steps if steps is None else steps
    cadence = Cadence(ref.eval_every, ref.evals_per_call, steps)
    replay = Population(self.plan, lambda sig: cadence, stats if stats is not None else Stats(),
                        lambda wanted: ref.lanes)
    replay.start_tier = ref.start_tier
    replay._data = self.population.data
    program = self.plan.program(ref.signature, ref.lanes, ref.evals_per_call)
    evals = -(-steps // ref.eval_every)
    new = NewTrial(trial.id, trial.config, trial.seed, trial.round)
    slots = [Slot(new, 0, lane, 0, steps, evals) if lane == trial.lane or not alone
             else Slot(new, 0, lane, 0, 0, 0, idle=True) for lane in range(ref.lanes)]
    replay.slots = slots
    replay.chunks = [Chunk(ref.signature, program, ref.lanes, list(range(ref.lanes)), cadence,
                           fresh=np.ones(ref.lanes, bool), tier=ref.tier)]
    while replay.chunks[0].calls < replay.chunks[0].calls_needed:
      replay._record(0, to_host(replay._call(0)))
    s = slots[trial.lane]
    r = s.to_trial("ok", maximize)
    params, model_state = lane_params(replay.chunks[0].state, trial.lane)
    return Run(config=trial.config, seed=trial.seed, score=r.score, curve=r.curve, curve_steps=r.curve_steps,
               train_curve=r.train_curve, status=r.status, diverged_at=r.diverged_at, steps=r.steps,
               params=params, model_state=model_state, adapter=program.spec.adapter, metric_name=metric,
               maximize=maximize)

  def finish(self, trial: Trial, metric: str, maximize: bool, stats: Stats) -> tuple[Trial, tuple]:
    """``trial`` (stopped) trained on to its full budget by :meth:`run`: the
    finished trial (``result.retrain`` replays it exactly) and its
    ``(params, model_state)``."""
    t0 = time.perf_counter()
    ref = self.population.refs[trial.id]
    run = self.run(trial, metric, maximize, stats, steps=self.plan.trial_steps(ref.signature))
    done = dataclasses.replace(trial, status=run.status, score=run.score, curve=run.curve,
                               curve_steps=run.curve_steps, train_curve=run.train_curve,
                               diverged_at=run.diverged_at, steps=run.steps,
                               seconds=trial.seconds + time.perf_counter() - t0)
    return done, (run.params, run.model_state)

  def scores(self, trials: list[Trial], seeds: list[int], maximize: bool,
             stats: Stats | None = None) -> tuple[np.ndarray, int]:
    """Each trial's config trained from scratch with each seed, for the
    search's full budget: final scores, shape ``(len(trials), len(seeds))``,
    and the lane-steps spent.

    The pairs of a trial's program run in that program (same signature, lane
    count and compile tier: already compiled), as many chunks of its width
    as they need, on the search's data. Their time and lane-steps count in
    ``stats`` if given.
    """
    stats = stats if stats is not None else Stats()
    before = stats.lane_steps + stats.idle_lane_steps
    out = np.full((len(trials), len(seeds)), np.nan)
    groups: dict[ProgramRef, list[int]] = {}
    for row, t in enumerate(trials):
      groups.setdefault(self.population.refs[t.id], []).append(row)
    for ref, rows in groups.items():
      budget = self.plan.trial_steps(ref.signature)
      cadence = Cadence(ref.eval_every, ref.evals_per_call, budget)
      population = Population(self.plan, lambda sig: cadence, stats, lambda wanted: ref.lanes)
      population.start_tier = ref.start_tier
      population._data = self.population.data
      pairs = [(row, k) for row in rows for k in range(len(seeds))]
      population.start([NewTrial(i, trials[row].config, seeds[k], trials[row].round)
                        for i, (row, k) in enumerate(pairs)], lanes=ref.lanes)
      for chunk in population.chunks:
        chunk.tier = ref.tier
      population.advance(sequential=True)
      for i, (row, k) in enumerate(pairs):
        out[row, k] = population.finish(i, {"status": "ok"}, maximize).score
    return out, stats.lane_steps + stats.idle_lane_steps - before
