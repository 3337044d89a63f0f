"""The experiment loop: train_and_evaluate(config, workdir).

The dataset is read and the config resolved and checked once, before
anything compiles (`prepare`, nfnets.training.setup); the model, optimizer
and steps are `build(config)`; devices are the seam
`parallel.make(config.parallel)`; the loop is "one step, then the periodic
actions that are due".
"""
import os
import time
from typing import Dict

from absl import logging
import jax
import jax.numpy as jnp

from nfnets import checkpoints
from nfnets import config as config_lib
from nfnets import data
from nfnets.training import hardware
from nfnets.training import parallel
from nfnets.training.logger import MetricWriter, format_duration
from nfnets.training.setup import add_trees, build, due, evaluate, prepare


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had non-finite loss or gradients."""


def maybe_initialize_distributed(cfg) -> None:
  """jax.distributed.initialize() for multi-host runs (see config.distributed)."""
  mode = cfg.initialize
  if mode is False or mode == 'false' or mode == 'never':
    return
  explicit = cfg.coordinator_address is not None
  env = any(k in os.environ for k in ('JAX_COORDINATOR_ADDRESS',
                                      'SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES'))
  if mode == 'auto' and not (explicit or env):
    return
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=cfg.coordinator_address,
                  num_processes=cfg.num_processes, process_id=cfg.process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    if 'already initialized' not in str(e).lower():
      raise


def _check_nonfinite(nonfinite: int, step: int, limit: int) -> None:
  if nonfinite >= limit:
    raise NonFiniteError(
        f'{nonfinite} consecutive steps (up to step {step}) had non-finite '
        'loss or gradients and were skipped. Lower the learning rate '
        '(config.optim.lr), check AGC (config.optim.use_agc / '
        'agc_clipping) and the input data.')


def _start(config, workdir: str, is_main: bool):
  """The dataset (read once), resolved config and Setup of a run."""
  # Every mistake a user can fix surfaces here, before anything compiles.
  config_lib.validate(config, num_devices=jax.device_count())
  prepared = prepare(config)
  config = prepared.config  # resolved: sizes, RandAugment, recipe, classes
  config_lib.validate(config, num_devices=jax.device_count())
  run = build(config, num_train_examples=prepared.num_train_examples,
              data_num_classes=config.model.num_classes)
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    logging.info('%s', config_lib.describe(config))
  return prepared.source, run


def _resume(ckpt, dp, run):
  """(state, start step): the newest checkpoint's, or the initial state."""
  if ckpt.latest_step() is None:
    return run.state, 0
  try:
    state = ckpt.restore(dp.target_for_restore(run.state), run.meta)
  except BaseException:
    ckpt.close()  # orbax's threads end before the error reaches the user
    raise
  logging.info('Resumed from %s at step %d.', ckpt.directory, int(state.step))
  return state, int(state.step)


def _eval_results(dp, eval_step, state, eval_batches) -> Dict[str, float]:
  """Top-1/5, loss and count of the raw and the EMA params."""
  results = {}
  for prefix, params in (('eval', state.params), ('eval_ema', state.ema_params)):
    totals = evaluate(dp, eval_step, params, eval_batches)
    count = totals['count']
    results.update({f'{prefix}/top1': totals['top1'] / count,
                    f'{prefix}/top5': totals['top5'] / count,
                    f'{prefix}/loss': totals['loss'] / count,
                    f'{prefix}/count': count})
  return results


def _log_eval(step, results, num_skipped) -> None:
  logging.info('[%d] eval top1 %.4f top5 %.4f | ema top1 %.4f top5 %.4f '
               '(%d examples%s)', step, results['eval/top1'],
               results['eval/top5'], results['eval_ema/top1'],
               results['eval_ema/top5'], results['eval/count'],
               f'; {num_skipped} undecodable image(s) skipped on host 0'
               if num_skipped else '')


def _train_metrics(dp, run, window_sums, window_steps, step, seconds, peak):
  """The window's mean train metrics, lr, throughput, TFLOPs and MFU."""
  m = {f'train/{k}': float(v) / window_steps
       for k, v in dp.fetch(window_sums).items()}
  img_s = window_steps * run.batch_size / max(seconds, 1e-9)
  m['train/lr'] = float(run.lr_fn(step - 1))
  m['train/throughput'] = img_s
  m['train/tflops_per_device'] = (img_s * run.flops_per_image / 1e12 /
                                  dp.num_devices)
  if peak:
    m['train/mfu'] = m['train/tflops_per_device'] / peak
  return m


def train_and_evaluate(config, workdir: str) -> Dict[str, float]:
  """Trains and evaluates a model; resumes from WORKDIR's latest checkpoint.

  Returns the final evaluation metrics ('eval/top1', 'eval_ema/top1', ...).
  Train metrics are logged every train.log_every_steps as the mean over the
  steps since the previous log ('train/loss', ..., 'train/lr').
  """
  maybe_initialize_distributed(config.distributed)
  is_main = jax.process_index() == 0
  source, run = _start(config, workdir, is_main)
  config, cfg = run.config, run.config.train
  dp = parallel.make(config.parallel)
  ckpt = checkpoints.RunCheckpointer(workdir, max_to_keep=cfg.keep_checkpoints,
                                     async_save=cfg.async_checkpointing)
  state, start_step = _resume(ckpt, dp, run)
  state = dp.put_state(state)
  train_step = dp.train_step(run.train_step)
  eval_step = dp.eval_step(run.eval_step)
  batches = dp.put_batch(data.create_train_iterator(
      config.data, global_batch_size=run.batch_size, seed=config.seed,
      start_step=start_step, source=source), cfg.prefetch)
  # One eval iterator for the run: each pass re-reads the split, and
  # undecodable images are warned about once.
  eval_batches = data.create_eval_iterator(
      config.data, global_batch_size=cfg.eval_batch_size, source=source)
  writer = MetricWriter(workdir, enabled=is_main)
  peak = hardware.peak_tflops_for(jax.devices()[0].device_kind,
                                  jnp.dtype(run.compute_dtype).name)
  total = run.total_steps
  # Block on a result at least this often (fake CPU devices deadlock when
  # too many steps are in flight).
  sync_every = min(cfg.sync_every_steps, cfg.log_every_steps)
  if is_main:
    logging.info('Training %s for %d steps (%.1f/epoch), global batch %d on %d '
                 'devices (%d hosts, %s), compute %s.', config.model.name,
                 total, run.steps_per_epoch, run.batch_size, dp.num_devices,
                 jax.process_count(), type(dp).__name__,
                 jnp.dtype(run.compute_dtype).name)

  def run_eval(step):
    results = _eval_results(dp, eval_step, state, eval_batches)
    writer.write(step, results)
    if is_main:
      _log_eval(step, results, eval_batches.num_skipped)
    return results

  # SIGTERM on any host -> every host saves the same step and exits.
  preempt = checkpoints.PreemptionWatcher()
  results, preempted = {}, False
  t_start = t_window = time.time()
  window_sums, window_steps = None, 0  # train metrics since the last log
  step = start_step
  try:
    while step < total and not preempted:
      state, metrics = train_step(state, next(batches), run.rng)
      window_sums = (metrics if window_sums is None
                     else add_trees(window_sums, metrics))
      window_steps += 1
      step += 1
      last = step == total
      preempted = preempt.should_stop(step) and not last
      if due(step, sync_every) or last or preempted:
        _check_nonfinite(int(dp.fetch(state.nonfinite)), step,
                         cfg.max_nonfinite_steps)
      if due(step, cfg.log_every_steps) or last:
        now = time.time()
        m = _train_metrics(dp, run, window_sums, window_steps, step,
                           now - t_window, peak)
        writer.write(step, m)
        if is_main:
          logging.info(
              '[%d/%d] loss %.4f top1 %.3f lr %.4g | %.1f img/s | ETA %s',
              step, total, m['train/loss'], m['train/top1'], m['train/lr'],
              m['train/throughput'], format_duration(
                  (total - step) * run.batch_size / m['train/throughput']))
        t_window, window_sums, window_steps = now, None, 0
      if due(step, cfg.eval_every_steps) and not last:
        results = run_eval(step)
      if due(step, cfg.checkpoint_every_steps) or last or preempted:
        ckpt.save(step, dp.state_for_checkpoint(state), run.meta)
    if preempted:
      logging.warning('SIGTERM: checkpointed step %d; exiting. Rerun the '
                      'same command to resume.', step)
    else:
      results = run_eval(step)
      if is_main:
        logging.info('Done: %d steps in %s.', step,
                     format_duration(time.time() - t_start))
  finally:
    preempt.close()
    ckpt.close()
    writer.close()
  return results
