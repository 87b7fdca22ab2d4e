"""The training loop: build, resume, step, log, validate, checkpoint, stop cleanly.

    lmx train --config=experiments/default.py [--config.train.steps=200 ...]

A run directory holds everything: config.json (the experiment, for `--run RUN_DIR`),
checkpoints/ (latest N, incl. the data iterator), best/ (best validation loss),
metrics.jsonl, tensorboard/, loss_curve.png. Rerunning the same
command resumes from the newest checkpoint -- model, optimizer, step, RNG, loss scale and
data position -- and continues bitwise identically to an uninterrupted run (fp32, same
devices). SIGTERM / SIGINT (preemption, Ctrl-C) save a checkpoint and return normally; in
a multi-process run a signal to any one process stops them all at the same step (the next
log or checkpoint step), where the processes agree on it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmx.config import Experiment
from lmx.data.pipeline import make_dataset
from lmx.data.tokenizer import load_or_train_tokenizer
from lmx.eval.perplexity import (UNIGRAM_TRAIN_BATCHES, count_targets, masked_targets,
                                 unigram_perplexity, validation_loss)
from lmx.model import Transformer
from lmx.peft import apply_peft, new_token_count, peft_counts
from lmx.parallel.distributed import any_process, is_primary, primary_first
from lmx.parallel.mesh import make_mesh, make_rules, use_mesh
from lmx.runtime import release_free_memory
from lmx.train.checkpoint import Checkpointer
from lmx.train.early_stopping import EarlyStopping
from lmx.train.metrics import MetricsLogger, plot_loss_curve
from lmx.train.optimizer import make_optimizer
from lmx.train.state import plan_train_state
from lmx.train.init_from import base_params, grown_rows
from lmx.train.objectives import make_objective
from lmx.train.sources import make_sources
from lmx.train.step import (batch_spec_for, jit_eval_step, jit_train_step, make_eval_step,
                            make_train_step, put_batch)
from lmx.train.trainable import count as trainable_count
from lmx.train.trainable import join, saved_view, split_trainable


class _SignalFlag:
  """Records SIGTERM/SIGINT instead of dying, so the loop can save and return."""

  def __init__(self):
    self.signum: int | None = None
    self._old: dict[int, Any] = {}

  def __enter__(self):
    try:
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handle)
    except ValueError:  # not the main thread: signals stay with the caller
      pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def _validation_batches(exp: Experiment, tok, limit: int | None) -> list[dict[str, np.ndarray]]:
  """The first `limit` validation batches (periodic evals), or all of them (limit=None)."""
  if not exp.train.eval_batches:
    return []
  return make_sources(exp, tok, jax.process_index(), jax.process_count(), limit).validation


def _teacher_experiment(exp: Experiment) -> Experiment:
  """The distillation teacher's experiment: distill.teacher_config, else the one
  distill.teacher_run records (ConfigError if it records none)."""
  from lmx.config import ConfigError
  from lmx.experiment import load_experiment, load_run_config
  d = exp.distill
  if d.teacher_config:
    return load_experiment([f"--config={d.teacher_config}"])[0]
  teacher = load_run_config(d.teacher_run)
  if teacher is None:
    raise ConfigError(f"Invalid config: `distill.teacher_run` is {d.teacher_run!r}, which records "
                      "no experiment (no config.json or experiment.py there); set "
                      "distill.teacher_config to the teacher's experiment file.")
  return teacher


def _model_parts(exp: Experiment):
  """(make_model, finish, base, extra): the model; what is attached to it after loading
  (PEFT modules, a distillation teacher); the base weights `train.init_from` names (None:
  random init); the teacher's weights (None without distillation)."""
  make_model = lambda rngs: Transformer(exp.model, rngs=rngs)
  abstract_params = lambda cfg: nnx.state(
      nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0))), nnx.Param)
  base = extra = teacher_cfg = None
  if exp.train.init_from:
    base, source = base_params(exp.train.init_from, abstract_params(exp.model), grown_rows(exp))
    print(f"lmx train: initialized from {source}", file=sys.stderr)
  if exp.train.objective == "distill":
    teacher = _teacher_experiment(exp)
    teacher_cfg = dataclasses.replace(teacher.model, dtype=exp.model.dtype)
    if teacher_cfg.vocab_size != exp.model.vocab_size:
      raise ValueError(f"distill: the teacher's vocab_size {teacher_cfg.vocab_size} differs "
                       f"from the student's {exp.model.vocab_size}; they must share a tokenizer")
    extra, source = base_params(exp.distill.teacher_run or exp.distill.teacher_config,
                                abstract_params(teacher_cfg))
    print(f"lmx train: distilling from the teacher {source}", file=sys.stderr)

  def finish(model, rngs, teacher_params):
    if exp.peft.method:
      apply_peft(model, exp.peft, rngs, new_token_count(exp))
    if teacher_cfg is not None:
      model.teacher = Transformer(teacher_cfg, rngs=rngs)
      if teacher_params is not None:  # None when only the structure is traced
        nnx.update(model.teacher, teacher_params)

  needs = exp.peft.method or teacher_cfg is not None
  return make_model, finish if needs else None, base, extra


def _record_config(exp: Experiment) -> None:
  """RUN_DIR/config.json: the experiment, for `--run RUN_DIR` and `lmx convert --from`."""
  from lmx.experiment import RUN_CONFIG, record_run_config
  try:
    changed = record_run_config(exp)
  except ValueError as e:  # the run itself is fine; tools then need --config
    print(f"lmx train: not writing {RUN_CONFIG}: {e}", file=sys.stderr)
    return
  if changed:  # a resumed run with new settings: say what changed, then run with them
    print(f"lmx train: {exp.run_dir}/{RUN_CONFIG} recorded other settings; this run uses "
          f"(and records) the new ones: {'; '.join(changed)}", file=sys.stderr)


def train(exp: Experiment, *, max_steps: int | None = None,
          stop_after: int | None = None) -> dict[str, Any]:
  """Train (or resume) `exp` in `exp.run_dir`; returns the final metrics.

  max_steps: loop bound instead of train.steps (the LR schedule still spans train.steps).
  stop_after: stop once this many steps are done, saving a checkpoint exactly as a SIGTERM
    would (for tests and for chopping a run into time-limited jobs).
  """
  cfg = exp.train
  total = max_steps if max_steps is not None else cfg.steps
  run_dir = pathlib.Path(exp.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  if is_primary():
    _record_config(exp)
  mesh = make_mesh(exp.mesh)
  rules = make_rules(exp.mesh)
  # Process 0 fills the shared cache (tokenizer, shards) first; the others then load it.
  base_tok = primary_first(lambda: load_or_train_tokenizer(exp), "lmx_tokenizer")
  optimizer = make_optimizer(cfg)
  ckpt = Checkpointer(run_dir, exp.checkpoint)
  stopper = EarlyStopping(cfg.early_stopping_patience)
  sources = primary_first(
      lambda: make_sources(exp, base_tok, jax.process_index(), jax.process_count(),
                           cfg.eval_batches if cfg.eval_batches else 0), "lmx_shards")
  tok, train_it, val_batches = sources.tokenizer, sources.train, sources.validation
  objective = make_objective(cfg, exp=exp)
  release_free_memory()  # what tokenizer training / sharding freed (lmx/runtime.py)

  with use_mesh(mesh, rules):
    make_model, finish, base, extra = _model_parts(exp)
    graphdef, abstract, shardings, init = plan_train_state(
        make_model, optimizer, cfg, exp.seed, mesh, base=base, finish=finish, extra=extra)
    n_train, n_all = trainable_count(abstract[0].params, cfg.trainable)
    if exp.peft.method:  # weights, not storage: an NF4 base counts its float elements
      counts = peft_counts(exp)
      n_train, n_all = counts["trainable_params"], counts["total_params"]
    if cfg.objective == "distill":
      print(f"lmx train: student {n_train:,} parameters, frozen teacher "
            f"{n_all - n_train:,}", file=sys.stderr)
      n_all = n_train
    elif cfg.trainable:
      print(f"lmx train: training {n_train:,} of {n_all:,} parameters "
            f"({n_train / n_all:.4%}; train.trainable={cfg.trainable!r})", file=sys.stderr)
    # A run that trains a part saves that part alone (adapters); the rest is rebuilt from
    # train.init_from on resume.
    view = lambda st: saved_view(st, cfg.trainable)
    step, resumed_from = 0, None
    restored = ckpt.restore_latest(view(abstract[0]), view(shardings[0]))
    if restored is not None and cfg.trainable:
      fresh = init()[0]
      frozen = split_trainable(fresh.params, cfg.trainable)[1]
      restored = (restored[0].replace(params=join(restored[0].params, frozen)), *restored[1:])
    if restored is not None and jax.tree.leaves(abstract[1]):
      rest = init()[1]  # non-Param model state is not checkpointed: rebuild it
    else:
      rest = abstract[1]  # empty: the abstract one serves
    if restored is None:
      state, rest = init()
    else:
      state, data_state, step = restored
      train_it.set_state(data_state["iterator"])
      stopper.load_state_dict(data_state["early_stopping"])
      resumed_from = step
      print(f"lmx train: resumed from {ckpt.path(step)}", file=sys.stderr)
    sample = val_batches[0] if val_batches else None
    spec = batch_spec_for(objective, sample) if objective.batch_names and sample else None
    train_step = jit_train_step(make_train_step(graphdef, rest, optimizer, cfg, objective),
                                abstract[0], mesh, cfg, spec)
    eval_fn = jit_eval_step(make_eval_step(graphdef, rest, cfg.loss_chunk_tokens, objective),
                            abstract[0].params, mesh, spec)

    def evaluate(params) -> dict[str, float]:
      out = validation_loss(lambda p, b: eval_fn(p, put_batch(b, mesh, spec)), params,
                            val_batches)
      return {**out, "val_batches": len(val_batches)}

    def save(at: int) -> None:
      ckpt.save(at, view(state), {"iterator": train_it.get_state(), "step": at,
                                  "early_stopping": stopper.state_dict()})

    # Process 0 owns run_dir's metrics; the others log to their own folder (no interleaving).
    log_dir = run_dir if is_primary() else run_dir / f"process_{jax.process_index()}"
    logger = MetricsLogger(log_dir, total, step, cfg.progress_bar and is_primary())
    result: dict[str, Any] = {"stopped_by_signal": False, "early_stopped": False,
                              "stopped_by_bad_steps": False, "resumed_from": resumed_from}
    losses: list[tuple[int, float]] = []
    last_eval: tuple[int, dict] | None = None
    # The logged train loss is the mean over the steps since the last log (finite steps
    # only), kept on device so that adding it up never waits for a step to finish.
    loss_sum, loss_n = jnp.float32(0), jnp.float32(0)
    # A process that left the loop alone on its own signal would leave the others waiting in
    # the next step's all-reduce: with several processes the stop is agreed (one tiny
    # all-gather) at the steps where the host syncs anyway, a log or a save, so that every
    # process stops after the same step and saves the same checkpoint.
    alone = jax.process_count() == 1
    stop = False  # agreed by every process
    with _SignalFlag() as sig:
      while step < total:
        if stop or (alone and sig.signum is not None):
          result["stopped_by_signal"] = True
          break
        if stop_after is not None and step >= stop_after:
          break
        batch = next(train_it)
        state, m = train_step(state, put_batch(batch, mesh, spec))
        step += 1
        logger.count_tokens(float(batch["loss_mask"].sum()) * jax.process_count())
        logger.advance()
        finite = ~m["skipped"]
        loss_sum = loss_sum + jnp.where(finite, m["loss"], 0.0)
        loss_n = loss_n + finite.astype(jnp.float32)
        logging = step % cfg.log_every == 0 or step == total
        if logging:
          mean = {"loss": loss_sum / loss_n, "loss_step": m["loss"], "loss_steps": loss_n}
          rec = logger.log(step, {**m, **mean})
          losses.append((step, rec["loss"]))
          loss_sum, loss_n = jnp.float32(0), jnp.float32(0)
        # Reading the counter waits for the step to finish, so it is read only where the
        # host syncs anyway (a log or a save): dispatch runs ahead between them. A streak
        # of non-finite steps (which change nothing) may run up to log_every - 1 steps
        # past max_bad_steps before the stop.
        saving = ckpt.should_save(step)
        if not alone and (logging or saving):
          stop = any_process(sig.signum is not None)
        bad = int(state.consecutive_bad_steps) if logging or saving else 0
        if bad >= cfg.max_bad_steps:
          last = ckpt.latest_step()
          msg = (f"lmx train: stopping at step {step}: {bad} consecutive non-finite steps "
                 f"(loss or gradient norm NaN/inf; train.max_bad_steps={cfg.max_bad_steps}). "
                 f"The last good checkpoint is {ckpt.path(last)}"
                 + (f" (step {last})." if last is not None else "."))
          print(msg, file=sys.stderr)
          result.update(stopped_by_bad_steps=True, message=msg, last_good_checkpoint=last)
          break
        if val_batches and cfg.eval_every and step % cfg.eval_every == 0:
          val = evaluate(state.params)
          last_eval = (step, val)
          logger.log(step, val, kind="eval")
          if stopper.update(step, val["val_loss"]):
            ckpt.save_best(step, view(state).params, val["val_loss"])
          if stopper.should_stop:
            result["early_stopped"] = True
            save(step)
            break
        if saving and bad == 0:  # no saves mid-streak: keep "last good" exact
          save(step)

    if not result["stopped_by_bad_steps"]:
      save(step)  # end of run, signal, stop_after (a no-op if this step is already saved)
    # On a signal (preemption) leave fast: the checkpoint is what matters.
    if val_batches and not result["stopped_by_signal"]:
      if last_eval is None or last_eval[0] != step:
        last = evaluate(state.params)
        logger.log(step, last, kind="eval")
        if stopper.update(step, last["val_loss"]):
          ckpt.save_best(step, view(state).params, last["val_loss"])
      # The reported figures use the WHOLE validation split, not the periodic subset.
      val_batches = _validation_batches(exp, base_tok, None)
      final = evaluate(state.params)
      logger.log(step, final, kind="final_eval")
      result.update(final)
    if val_batches and not result["stopped_by_signal"] and exp.data.format == "text":
      # Unigram counts: targets of the first min(step, cap) train batches -- the batches this
      # run trained on, regenerated from a fresh iterator (the pipeline is deterministic).
      n_train = max(1, min(step, UNIGRAM_TRAIN_BATCHES))
      counts = count_targets(iter(make_dataset(exp, tok, "train", jax.process_index(),
                                               jax.process_count())),
                             exp.model.vocab_size, n_train)
      valid = np.concatenate([masked_targets(b) for b in val_batches])
      if jax.process_count() > 1:  # each host saw its slice only: add up the histograms
        counts, valid = _sum_over_processes(counts, valid, exp.model.vocab_size)
      result["unigram_ppl"] = unigram_perplexity(counts, valid, exp.model.vocab_size)
    result.update(sources.report, trainable_params=n_train, total_params=n_all)
    logger.close()
    ckpt.wait()
    ckpt.close()

  curve = plot_loss_curve(run_dir) if is_primary() else None
  # Periodic validation (early stopping, best/) uses the first eval_batches batches; the
  # final val_loss uses the whole split. The names say which is which.
  best = None if math.isinf(stopper.best) else stopper.best
  result.update(step=step, train_loss=losses[-1][1] if losses else math.nan,
                losses=losses, best_subset_val_loss=best, subset_val_batches=cfg.eval_batches,
                best_step=stopper.best_step, total_bad_steps=int(state.total_bad_steps),
                loss_scale=float(state.loss_scale), run_dir=str(run_dir),
                loss_curve=str(curve) if curve else None,
                process_index=jax.process_index(), process_count=jax.process_count())
  _print_summary(result)
  return result


def _sum_over_processes(counts: np.ndarray, valid: np.ndarray,
                        vocab: int) -> tuple[np.ndarray, np.ndarray]:
  """Global train-target counts and validation targets from every host's share. The
  validation ids come back sorted (a histogram), which a mean log-probability ignores."""
  from jax.experimental import multihost_utils
  hist = np.bincount(valid, minlength=vocab)[:vocab]
  # int32 on the wire (x64 is off): fine below 2**31 tokens per id.
  both = np.stack([counts, hist]).astype(np.int32)  # (2, V)
  total = np.asarray(multihost_utils.process_allgather(both)).astype(np.int64).sum(0)
  return total[0], np.repeat(np.arange(vocab), total[1])


def _print_summary(r: dict[str, Any]) -> None:
  how = ("stopped by signal" if r["stopped_by_signal"] else "early-stopped" if r["early_stopped"]
         else "stopped: too many non-finite steps" if r["stopped_by_bad_steps"] else "done")
  parts = [f"step {r['step']} ({how})", f"train loss {r['train_loss']:.4f}"]
  if r.get("best_subset_val_loss") is not None:
    parts.append(f"best val loss on the first {r['subset_val_batches']} validation batches "
                 f"{r['best_subset_val_loss']:.4f} (step {r['best_step']})")
  if "val_loss" in r:
    parts += [f"val loss {r['val_loss']:.4f} (whole split)", f"val ppl {r['val_ppl']:.2f}"]
  if "unigram_ppl" in r:
    parts += [f"unigram ppl {r['unigram_ppl']:.2f}",
              f"unigram/model ppl ratio {r['unigram_ppl'] / r['val_ppl']:.1f}"]
  print("lmx train: " + ", ".join(parts), file=sys.stderr)


def cli_main(argv: list[str]) -> int:
  """`lmx train --config=...`: run, then print the final metrics as one JSON line."""
  from lmx.experiment import load_experiment
  exp, _ = load_experiment(argv)
  result = train(exp)
  result.pop("losses", None)
  print(json.dumps(result))
  return 1 if result["stopped_by_bad_steps"] else 0
