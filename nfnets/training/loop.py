"""The experiment loop: train_and_evaluate(config, workdir)."""
import math
import os
import signal
import time
from typing import Dict

from absl import logging
import jax
import jax.numpy as jnp
import optax

from nfnets import config as config_lib
from nfnets import data
from nfnets import models
from nfnets.checkpoints.run import RunCheckpointer
from nfnets import optim
from nfnets.training import hardware
from nfnets.training import parallel
from nfnets.training import state as state_lib
from nfnets.training import step as step_lib
from nfnets.training.logger import MetricWriter, format_duration


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


def resolve_compute_dtype(name: str):
  if name == 'auto':
    return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  return jnp.dtype(name)


def _freeze_body(tx, regex: str):
  """Trains only the classifier (paths matching regex); the body gets zero
  updates and keeps no optimizer state."""
  def labels(params):
    return jax.tree.map(
        lambda path: 'train' if optim.is_classifier(path, regex) else 'frozen',
        optim.tree_paths(params))
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()},
                               labels)


def _init_params(config, forward, rng):
  size = config.data.image_size
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  params = jax.jit(lambda r: forward.init(r, dummy, True))(rng)
  params = jax.device_get(params)
  if config.init.checkpoint:
    from nfnets import checkpoints  # only needed for fine-tuning
    # num_classes is left to the file: a new task re-initialises the head.
    loaded = checkpoints.load_pretrained(
        config.init.checkpoint, variant=config.model.name,
        which=config.init.params, model_kwargs=config.model.kwargs)
    # The classifier module (e.g. 'NFNet/~/linear') keeps its fresh init.
    reset = checkpoints.CLASSIFIER if config.init.reset_classifier else None
    params = checkpoints.merge_into(params, loaded, reset=reset)
    logging.info('Initialised from %s (%s params%s).', config.init.checkpoint,
                 config.init.params,
                 ', classifier re-initialised' if reset else '')
  return params


def evaluate(eval_fn, params, config, global_batch_size: int
             ) -> Dict[str, float]:
  """Top-1/top-5/loss over the whole eval split (padded, masked)."""
  totals = None
  for batch in data.create_eval_iterator(config.data,
                                         global_batch_size=global_batch_size):
    sums = eval_fn(params, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.tree.map(float, parallel.unreplicate(totals))
  count = totals['count']
  return {'top1': totals['top1'] / count, 'top5': totals['top5'] / count,
          'loss': totals['loss'] / count, 'count': count}


class _Preemption:
  """Turns SIGTERM into a flag so the loop can checkpoint and exit cleanly."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def train_and_evaluate(config, workdir: str) -> Dict[str, float]:
  """Trains and evaluates a model; resumes from WORKDIR's latest checkpoint.

  Returns the final evaluation metrics ('eval/top1', 'eval_ema/top1', ...).
  """
  maybe_initialize_distributed(config.distributed)
  config_lib.validate(config, num_devices=jax.device_count())
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  compute_dtype = resolve_compute_dtype(config.model.compute_dtype)
  model_kwargs = dict(config.model.kwargs)
  forward = models.forward_fn(config.model.name, config.model.num_classes,
                              **model_kwargs)
  batch_size = config.train.batch_size
  n_train = data.num_examples(config.data, config.data.train_split)
  steps_per_epoch = max(1, n_train // batch_size)
  total_steps = config.train.num_steps or int(
      math.ceil(config.train.num_epochs * steps_per_epoch))
  tx, lr_fn = optim.make_optimizer(config.optim, batch_size=batch_size,
                                   steps_per_epoch=steps_per_epoch,
                                   total_steps=total_steps)
  if config.train.freeze_body:
    tx = _freeze_body(tx, config.optim.classifier_regex)

  rng = jax.random.PRNGKey(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  state = state_lib.create(_init_params(config, forward, init_rng), tx)
  meta = {'model': config.model.name, 'num_classes': config.model.num_classes}
  ckpt = RunCheckpointer(workdir, max_to_keep=config.train.keep_checkpoints,
                         async_save=config.train.async_checkpointing)
  start_step = 0
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state, meta)
    start_step = int(state.step)
    logging.info('Resumed from %s at step %d.', ckpt.directory, start_step)
  p_state = parallel.replicate(state)
  del state

  p_train = parallel.pmap_train_step(step_lib.make_train_step(
      forward, tx, compute_dtype=compute_dtype,
      ema_decay=config.optim.ema_decay, sam_rho=config.optim.sam_rho))
  p_eval = parallel.pmap_eval_step(step_lib.make_eval_step(forward,
                                                           compute_dtype))
  train_iter = data.create_train_iterator(
      config.data, global_batch_size=batch_size, seed=config.seed,
      start_step=start_step)
  train_iter = data.prefetch_to_device(train_iter, size=config.train.prefetch)

  writer = MetricWriter(workdir, enabled=is_main)
  macs = models.count_flops(config.model.name, config.data.image_size,
                            config.model.num_classes, **model_kwargs)
  flops_per_image = hardware.train_flops_per_image(macs)
  peak = hardware.peak_tflops_for(jax.devices()[0].device_kind,
                                  jnp.dtype(compute_dtype).name)
  log_every = config.train.log_every_steps
  sync_every = min(config.train.sync_every_steps, log_every)
  preempt = _Preemption()
  if is_main:
    logging.info('Training %s for %d steps (%d/epoch), global batch %d on %d '
                 'devices (%d hosts), compute %s.', config.model.name,
                 total_steps, steps_per_epoch, batch_size, jax.device_count(),
                 jax.process_count(), jnp.dtype(compute_dtype).name)

  def run_eval(step):
    results = {}
    for prefix, params in (('eval', p_state.params),
                           ('eval_ema', p_state.ema_params)):
      for k, v in evaluate(p_eval, params, config,
                           config.train.eval_batch_size).items():
        results[f'{prefix}/{k}'] = v
    writer.write(step, results)
    if is_main:
      logging.info('[%d] eval top1 %.4f top5 %.4f | ema top1 %.4f top5 %.4f '
                   '(%d examples)', step, results['eval/top1'],
                   results['eval/top5'], results['eval_ema/top1'],
                   results['eval_ema/top5'], results['eval/count'])
    return results

  results = {}
  t_start = time.time()
  t_window, window_start = time.time(), start_step
  step = start_step
  try:
    while step < total_steps:
      batch = next(train_iter)
      p_state, metrics = p_train(p_state, batch, step_rng)
      step += 1
      last = step == total_steps
      if step % sync_every == 0 or last or preempt.requested:
        nonfinite = int(parallel.unreplicate(p_state.nonfinite))
        if nonfinite >= config.train.max_nonfinite_steps:
          raise NonFiniteError(
              f'{nonfinite} consecutive steps (up to step {step}) had '
              'non-finite loss or gradients and were skipped. Lower the '
              'learning rate (config.optim.lr_per_256), check AGC '
              '(config.optim.use_agc / agc_clipping) and the input data.')
      if step % log_every == 0 or last:
        m = {f'train/{k}': float(v)
             for k, v in parallel.unreplicate(metrics).items()}
        now = time.time()
        img_s = (step - window_start) * batch_size / max(now - t_window, 1e-9)
        t_window, window_start = now, step
        m['lr'] = float(lr_fn(step - 1))
        m['throughput'] = img_s
        m['train/tflops_per_device'] = (img_s * flops_per_image / 1e12 /
                                        jax.device_count())
        if peak:
          m['train/mfu'] = m['train/tflops_per_device'] / peak
        writer.write(step, m)
        if is_main:
          eta = (total_steps - step) * batch_size / img_s if img_s else None
          logging.info('[%d/%d] loss %.4f top1 %.3f lr %.4g | %.1f img/s | '
                       'ETA %s', step, total_steps, m['train/loss'],
                       m['train/top1'], m['lr'], img_s, format_duration(eta))
      eval_every = config.train.eval_every_steps
      if eval_every and step % eval_every == 0 and not last:
        results = run_eval(step)
      ckpt_every = config.train.checkpoint_every_steps
      if (ckpt_every and step % ckpt_every == 0) or last or preempt.requested:
        ckpt.save(step, parallel.unreplicate(p_state), meta)
      if preempt.requested and not last:
        logging.warning('SIGTERM: checkpointed step %d; exiting. Rerun the '
                        'same command to resume.', step)
        ckpt.close()
        writer.close()
        return results
    results = run_eval(step)
    if is_main:
      logging.info('Done: %d steps in %s.', step,
                   format_duration(time.time() - t_start))
  finally:
    preempt.restore()
    ckpt.close()
    writer.close()
  return results
