"""Speed and memory benchmark of the nfnets training step.

Compiles and times the real training step (nfnets.training: forward, loss,
backward, cross-device pmean, AGC, weight decay, Nesterov SGD, EMA), built by
the training loop's `build(config)` and wrapped by its device seam
(--backend pmap | jit, --fsdp), on fake device-resident data, after warm-up,
and reports:

  img/s and step time (median of several timed windows), compile time, peak
  device memory, model FLOPs per image, achieved TFLOP/s and MFU.

  python scripts/benchmark.py --model F0 --batch_size 8 --image_size 192 \
      --dtype f32 --compare_timm
  python scripts/benchmark.py --model F0 --batch_size 256 --dtype bf16   # GPU
  python scripts/benchmark.py --model F7 --image_size 608 --devices 8 \
      --batch_size 8 --backend jit --fsdp --compile_only   # memory only
  (--fsdp --compile_only also compiles the replicated step and reports the
  ratio of the two per-device peaks)

Definitions
  * fwd FLOPs/image = 2 x the forward multiply-adds of every conv and dense
    layer (nfnets.models.count_flops, the paper's 'FLOPs' convention counts
    multiply-adds; we count a multiply-add as 2 FLOPs).
  * train FLOPs/image = 3 x fwd FLOPs (backward = 2 x forward: gradients
    w.r.t. activations and w.r.t. weights). Weight standardisation,
    activations, AGC, the optimizer and EMA are not counted (they are small).
  * achieved TFLOP/s = train FLOPs/image x img/s; MFU = achieved / (peak per
    device x devices). The peak comes from --peak_tflops or a table of known
    devices (dense, no sparsity): bf16 = tensor-core bf16, f32 = the
    non-tensor-core float32 rate (XLA may use TF32 for f32 convs on NVIDIA
    GPUs, so f32 MFU can exceed what the f32 peak suggests).
  * peak memory: the backend's runtime peak (device.memory_stats()
    'peak_bytes_in_use', GPU/TPU) when available, else XLA's static estimate
    from compiled.memory_analysis(): arguments + outputs + temporaries -
    aliased (donated) bytes, per device. On CPU only the estimate exists.
  * --batch_size is the global batch, split over --devices.
  * state / device: bytes of params + optimizer state + EMA on one device
    (replicated: all of it; --fsdp: about 1/devices of it).

Output: a table on stderr and one JSON line per run on stdout (and appended
to --json_out). --compare_timm also runs scripts/bench_timm.py with the
optional torch venv (.venv-torch, see scripts/setup_torch_env.sh) with the
same batch, resolution and threads, and prints ours/timm step time.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'scripts'))  # its sibling timing.py
from timing import timed_windows  # noqa: E402

def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description='Times the nfnets training step.',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--model', default='F0')
  p.add_argument('--batch_size', type=int, default=8, help='global batch')
  p.add_argument('--image_size', type=int, default=None,
                 help='default: the variant\'s train size')
  p.add_argument('--dtype', choices=['bf16', 'f32'], default='f32',
                 help='compute dtype (images; params stay float32)')
  p.add_argument('--devices', type=int, default=1,
                 help='devices to run on (on CPU, fake host devices)')
  p.add_argument('--backend', choices=['pmap', 'jit'], default='pmap',
                 help='device layout (config.parallel.backend)')
  p.add_argument('--fsdp', action='store_true',
                 help='jit only: shard params, optimizer state and EMA')
  p.add_argument('--compile_only', action='store_true',
                 help='lower and compile with abstract inputs (nothing '
                 'allocated), report XLA\'s memory analysis and the state '
                 'bytes per device; no timing')
  p.add_argument('--steps', type=int, default=5, help='timed steps')
  p.add_argument('--warmup', type=int, default=2,
                 help='untimed steps after compilation')
  p.add_argument('--windows', type=int, default=None,
                 help='timing windows (default min(steps, 5)); the median '
                 'window\'s mean step time is reported')
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--peak_tflops', type=float, default=None,
                 help='peak dense TFLOP/s per device for MFU')
  p.add_argument('--threads', type=int, default=None,
                 help='CPU cores to use (sets this process\'s affinity '
                 'before jax starts; also passed to timm). Default: all '
                 'schedulable cores')
  p.add_argument('--json_out', default=None, help='append JSON lines here')
  p.add_argument('--compare_timm', action='store_true',
                 help='also time timm dm_nfnet_f0 with the torch venv')
  p.add_argument('--timm_python', default=None,
                 help='python of the torch venv (default .venv-torch)')
  p.add_argument('--timm_model', default=None,
                 help='timm model (default dm_nfnet_<model lower-case>)')
  # Model overrides (for tiny smoke runs and ablations).
  p.add_argument('--width', type=float, default=None)
  p.add_argument('--depth', default=None, help='e.g. 1,1,1,1')
  p.add_argument('--group_size', type=int, default=None)
  p.add_argument('--conv_lowering', choices=['xla', 'cpu'],
                 default=None, help='how convolutions are lowered '
                 '(nfnets.models.cpu_conv); default: the backend\'s')
  p.add_argument('--remat', action='store_true',
                 help='hk.remat per block (if the model supports it)')
  p.add_argument('--profile_steps', type=int, default=0,
                 help='after timing, trace this many steps with '
                 'jax.profiler and print the ops that took longest')
  p.add_argument('--timm_same_malloc', action='store_true',
                 help='give the timm process the same glibc malloc setting '
                 '(MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...) that '
                 'nfnets.runtime applies to ours, for a like-for-like '
                 'allocator (PyTorch already runs on the calling thread)')
  p.add_argument('--no_cpu_tuning', action='store_true',
                 help='do not apply nfnets.runtime.configure_cpu_runtime() '
                 '(glibc keeps and reuses XLA:CPU\'s temporaries; '
                 'synchronous dispatch)')
  p.add_argument('--profile_out', default=None,
                 help='copy the trace (.xplane.pb) to this file')
  return p.parse_args(argv)


def _setup_env(args):
  """Process-level settings that must precede `import jax`."""
  if args.threads:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:args.threads])
  # Exactly --devices host (CPU) devices: the training wrapper pmaps over all
  # local devices. (Overrides a count inherited from e.g. the test setup;
  # GPUs/TPUs are unaffected.)
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  flags.append(f'--xla_force_host_platform_device_count={args.devices}')
  os.environ['XLA_FLAGS'] = ' '.join(flags)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  if args.no_cpu_tuning:
    return {'status': 'off (--no_cpu_tuning)'}
  from nfnets import runtime  # pylint: disable=g-import-not-at-top
  return runtime.configure_cpu_runtime()


def _git_commit():
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO,
                          capture_output=True, text=True,
                          timeout=10).stdout.strip() or None
  except Exception:  # pylint: disable=broad-except
    return None


def model_overrides(args):
  o = {}
  if args.width is not None:
    o['width'] = args.width
  if args.depth:
    o['depth'] = tuple(int(d) for d in args.depth.split(','))
  if args.group_size is not None:
    o['group_size'] = args.group_size
  if args.conv_lowering is not None:
    o['conv_lowering'] = args.conv_lowering
  if args.remat:
    o['remat'] = True
  return o


def make_config(args, image_size):
  """The experiment config of this benchmark (nfnets.config.base_config with
  the command line's model, batch, resolution, dtype and backend)."""
  from nfnets import config as config_lib
  config = config_lib.base_config(args.model)
  config.model.num_classes = args.num_classes
  config.model.kwargs.update(model_overrides(args))
  config.model.compute_dtype = 'bfloat16' if args.dtype == 'bf16' else 'float32'
  config.data.image_size = image_size
  config.train.batch_size = args.batch_size
  config.train.num_steps = 10_000
  config.parallel.backend = args.backend
  config.parallel.fsdp = args.fsdp
  return config


def state_bytes_per_device(abstract_state):
  """Bytes of the train state on one device, from the state's shardings."""
  import numpy as np
  return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                 for x in __import__('jax').tree.leaves(abstract_state)))


def build_step(args, image_size):
  """(setup, dp, step, state, batch) of nfnets.training: the loop's build()
  and device seam. With --compile_only, state and batch are abstract
  (jax.ShapeDtypeStruct), nothing is allocated."""
  import jax
  import numpy as np
  from nfnets.training import parallel, setup
  config = make_config(args, image_size)
  dp = parallel.make(config.parallel,
                     devices=jax.local_devices()[:args.devices])
  # 100 steps/epoch, 10k steps: the schedule's values do not affect speed.
  run = setup.build(config, num_train_examples=100 * args.batch_size,
                    abstract=args.compile_only)
  step = dp.train_step(run.train_step)
  rng_np = np.random.RandomState(0)
  shape = (args.batch_size, image_size, image_size, 3)
  if args.compile_only:
    batch = {'images': jax.ShapeDtypeStruct(shape, run.compute_dtype),
             'labels': jax.ShapeDtypeStruct((args.batch_size,
                                             args.num_classes), np.float32)}
    return run, dp, step, dp.abstract_state(run.state), dp.abstract_batch(batch)
  images = rng_np.standard_normal(shape).astype(np.float32)
  labels = np.eye(args.num_classes, dtype=np.float32)[
      rng_np.randint(0, args.num_classes, args.batch_size)]
  batch = {'images': images.astype(run.compute_dtype), 'labels': labels}
  return run, dp, step, dp.put_state(run.state), dp.put_batch_now(batch)


def memory_report(compiled, device):
  """(peak bytes per device, source, details dict)."""
  details = {}
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    ma = None
  if ma is not None:
    for k in ('argument_size_in_bytes', 'output_size_in_bytes',
              'temp_size_in_bytes', 'alias_size_in_bytes',
              'generated_code_size_in_bytes'):
      v = getattr(ma, k, None)
      if v is not None:
        details[k] = int(v)
  est = None
  if details:
    est = (details.get('argument_size_in_bytes', 0) +
           details.get('output_size_in_bytes', 0) +
           details.get('temp_size_in_bytes', 0) -
           details.get('alias_size_in_bytes', 0))
  runtime = None
  try:
    stats = device.memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
      runtime = int(stats['peak_bytes_in_use'])
  except Exception:  # pylint: disable=broad-except
    pass
  if runtime is not None:
    details['xla_estimate_bytes'] = est
    return runtime, 'runtime_peak', details
  return est, 'xla_memory_analysis', details


def compile_only_report(args, compiled, state, compile_s, state_bytes,
                        image_size, per_device_batch, n_params):
  """The --compile_only result: XLA's per-device peak (arguments + outputs +
  temporaries - aliased) and, with --fsdp, the replicated step's peak
  (compiled the same way), their ratio and the state bytes FSDP leaves
  replicated (leaves it cannot shard on their unit axis)."""
  import jax
  from nfnets.training import fsdp as fsdp_lib
  device = jax.local_devices()[0]
  peak, _, mem_details = memory_report(compiled, device)
  res = {'model': args.model, 'batch_size': args.batch_size,
         'per_device_batch': per_device_batch, 'devices': args.devices,
         'image_size': image_size, 'dtype': args.dtype,
         'parallel_backend': args.backend, 'fsdp': args.fsdp,
         'compile_s': round(compile_s, 3),
         'state_bytes_per_device': state_bytes, 'memory': mem_details,
         'peak_bytes_per_device': peak,
         'params': n_params, 'jax_version': jax.__version__,
         'load_avg_1m': round(os.getloadavg()[0], 2)}
  if args.fsdp:
    specs = jax.tree.map(lambda x: x.sharding.spec, state)
    res['state_bytes_replicated_under_fsdp'] = fsdp_lib.replicated_bytes(
        state, specs)
    replicated = argparse.Namespace(**dict(vars(args), fsdp=False))
    rep_run, _, rep_step, rep_state, rep_batch = build_step(replicated,
                                                            image_size)
    t0 = time.perf_counter()
    rep_compiled = rep_step.lower(rep_state, rep_batch, rep_run.rng).compile()
    rep_peak, _, rep_details = memory_report(rep_compiled, device)
    res['replicated'] = {'peak_bytes_per_device': rep_peak,
                         'memory': rep_details,
                         'compile_s': round(time.perf_counter() - t0, 3)}
    res['peak_ratio_fsdp_over_replicated'] = round(peak / rep_peak, 4)
  print(f"peak / device: {_fmt_bytes(peak)}" + (
      f"; replicated {_fmt_bytes(res['replicated']['peak_bytes_per_device'])}"
      f"; ratio {res['peak_ratio_fsdp_over_replicated']:.3f}; state left "
      f"replicated {_fmt_bytes(res['state_bytes_replicated_under_fsdp'])}"
      if args.fsdp else ''), file=sys.stderr, flush=True)
  return res


def profile_ops(run_fn, state, out_file=None, top=25):
  """Traces run_fn(state) with jax.profiler; returns (state, top ops).

  Ops are the events of the device planes (GPU/TPU), or of XLA:CPU's worker
  threads on the CPU, summed by name; durations in ms over all traced steps.
  """
  import collections
  import glob
  import shutil
  import tempfile
  import jax
  trace_dir = tempfile.mkdtemp(prefix='nfnets_bench_trace_')
  jax.profiler.start_trace(trace_dir)
  try:
    state = run_fn(state)
  finally:
    jax.profiler.stop_trace()
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'),
                           recursive=True))
  if not files:
    return state, None
  if out_file:
    shutil.copyfile(files[-1], out_file)
  try:
    from jax._src.lib import _profile_data  # pylint: disable=g-import-not-at-top
    data = _profile_data.ProfileData.from_file(files[-1])
  except Exception as e:  # pylint: disable=broad-except
    print(f'benchmark: could not read the trace ({e})', file=sys.stderr)
    return state, None
  device_planes = [p for p in data.planes if p.name.startswith('/device:')]
  agg, count = collections.Counter(), collections.Counter()
  for plane in device_planes or data.planes:
    for line in plane.lines:
      if device_planes:
        if line.name not in ('XLA Ops', 'Ops') and 'Ops' not in line.name:
          continue
      elif not line.name.startswith('tf_XLAEigen'):
        continue
      for ev in line.events:
        if ev.name.startswith(('ThunkExecutor', 'Slinky', 'Threadpool')):
          continue
        agg[ev.name] += ev.duration_ns
        count[ev.name] += 1
  total = sum(agg.values())
  ops = [{'name': k, 'ms': round(v / 1e6, 3), 'count': count[k],
          'share': round(v / total, 4) if total else None}
         for k, v in agg.most_common(top)]
  print(f'profile: {len(agg)} ops, {total / 1e6:.1f} ms traced; top:',
        file=sys.stderr)
  for o in ops:
    print(f"  {o['ms']:10.2f} ms  {100 * (o['share'] or 0):5.1f}%  "
          f"x{o['count']:<4d} {o['name'][:100]}", file=sys.stderr)
  return state, ops


def run_timm(args, image_size, threads):
  py = args.timm_python or os.path.join(REPO, '.venv-torch', 'bin', 'python')
  if not os.path.exists(py):
    print(f'benchmark: no torch venv python at {py} (run '
          'scripts/setup_torch_env.sh); skipping --compare_timm',
          file=sys.stderr)
    return None
  model = args.timm_model or f'dm_nfnet_{args.model.lower()}'
  cmd = [py, os.path.join(REPO, 'scripts', 'bench_timm.py'), '--model', model,
         '--batch_size', str(args.batch_size), '--image_size',
         str(image_size), '--threads', str(threads), '--steps',
         str(args.steps), '--warmup', str(max(1, args.warmup)),
         '--num_classes', str(args.num_classes)]
  if args.windows:
    cmd += ['--windows', str(args.windows)]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  if args.timm_same_malloc:
    from nfnets import runtime  # pylint: disable=g-import-not-at-top
    env.update(runtime.MALLOC_ENV)
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    print(f'benchmark: bench_timm failed:\n{proc.stderr[-3000:]}',
          file=sys.stderr)
    return None
  for line in reversed(proc.stdout.strip().splitlines()):
    if line.startswith('{'):
      res = json.loads(line)
      res['malloc_tuned'] = bool(args.timm_same_malloc)
      return res
  return None


def main(argv=None):
  args = parse_args(argv)
  cpu_runtime = _setup_env(args)
  threads = len(os.sched_getaffinity(0))

  import jax
  import nfnets.models as M

  if args.batch_size % args.devices:
    raise SystemExit(f'--batch_size {args.batch_size} is not divisible by '
                     f'--devices {args.devices}')
  if len(jax.local_devices()) < args.devices:
    raise SystemExit(f'asked for {args.devices} devices, jax sees '
                     f'{len(jax.local_devices())}')
  per_device_batch = args.batch_size // args.devices
  image_size = args.image_size or M.get_variant(args.model).train_size
  overrides = model_overrides(args)
  # count_flops traces the plain lowering (no extra products of the CPU one).
  macs = M.count_flops(args.model, image_size, num_classes=args.num_classes,
                       **overrides)
  fwd_flops = 2 * macs
  train_flops = 3 * fwd_flops
  n_params = M.count_params(args.model, args.num_classes, **{
      k: v for k, v in overrides.items()
      if k not in ('remat', 'conv_lowering')})

  run_setup, dp, train_step, state, batch = build_step(args, image_size)
  rng = run_setup.rng
  impl = 'nfnets.training'
  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  state_bytes = state_bytes_per_device(
      state if args.compile_only else jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                         sharding=x.sharding), state))
  device = jax.local_devices()[0]
  if args.compile_only:
    res = compile_only_report(args, compiled, state, compile_s, state_bytes,
                              image_size, per_device_batch, n_params)
    print(json.dumps(res), flush=True)
    if args.json_out:
      with open(args.json_out, 'a') as f:
        f.write(json.dumps(res) + '\n')
    return res
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    xla_flops = float(cost['flops']) if cost and 'flops' in cost else None
  except Exception:  # pylint: disable=broad-except
    xla_flops = None

  def run(state, n):
    for _ in range(n):
      state, metrics = compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    return state, metrics

  t0 = time.perf_counter()
  state, metrics = run(state, max(1, args.warmup))
  warmup_s = time.perf_counter() - t0
  last = {}

  def run_window(n):
    last['state'], last['metrics'] = run(last.get('state', state), n)

  times, cpu_times = timed_windows(run_window, args.steps, args.windows)
  state, metrics = last['state'], last['metrics']
  step_s = statistics.median(times)
  loss = float(dp.fetch(metrics)['loss'])

  device = jax.local_devices()[0]
  peak_mem, mem_source, mem_details = memory_report(compiled, device)
  top_ops = None
  if args.profile_steps:
    try:
      state, top_ops = profile_ops(lambda s: run(s, args.profile_steps)[0],
                                   state, args.profile_out)
    except Exception as e:  # pylint: disable=broad-except
      print(f'benchmark: profiling failed ({e!r}); results above stand',
            file=sys.stderr)
  img_per_s = args.batch_size / step_s
  achieved = train_flops * img_per_s / 1e12
  from nfnets.training.hardware import peak_tflops_for
  peak = args.peak_tflops or peak_tflops_for(device.device_kind, args.dtype)
  mfu = achieved / (peak * args.devices) if peak else None
  res = {
      'framework': 'jax', 'model': args.model, 'step_impl': impl,
      'batch_size': args.batch_size, 'per_device_batch': per_device_batch,
      'devices': args.devices, 'image_size': image_size, 'dtype': args.dtype,
      'device_kind': device.device_kind, 'backend': jax.default_backend(),
      'parallel_backend': args.backend, 'fsdp': args.fsdp,
      'state_bytes_per_device': state_bytes,
      'img_per_s': round(img_per_s, 4), 'step_ms': round(step_s * 1e3, 3),
      'step_ms_windows': [round(t * 1e3, 3) for t in times],
      # Host CPU time of this process (all threads) per step: on a CPU
      # backend, less sensitive to other processes' load than wall time.
      'step_cpu_ms': round(statistics.median(cpu_times) * 1e3, 3),
      'compile_s': round(compile_s, 3), 'warmup_s': round(warmup_s, 3),
      'peak_mem_bytes': peak_mem, 'peak_mem_source': mem_source,
      'memory': mem_details,
      'params': n_params, 'fwd_macs_per_image': macs,
      'fwd_flops_per_image': fwd_flops,
      'train_flops_per_image': train_flops,
      'xla_flops_per_step_per_device': xla_flops,
      'achieved_tflops': round(achieved, 6), 'peak_tflops': peak,
      'mfu': round(mfu, 6) if mfu is not None else None,
      'threads': threads, 'steps': args.steps, 'warmup': args.warmup,
      'overrides': {k: list(v) if isinstance(v, tuple) else v
                    for k, v in overrides.items()},
      'loss': loss, 'load_avg_1m': round(os.getloadavg()[0], 2),
      'cpu_runtime': cpu_runtime, 'top_ops': top_ops,
      'jax_version': jax.__version__, 'commit': _git_commit(),
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
  }
  if args.compare_timm:
    timm_res = run_timm(args, image_size, threads)
    res['timm'] = timm_res
    if timm_res:
      res['timm_step_ms'] = timm_res['step_ms']
      res['ratio_step_time_ours_over_timm'] = round(
          res['step_ms'] / timm_res['step_ms'], 4)
      res['ratio_cpu_time_ours_over_timm'] = round(
          res['step_cpu_ms'] / timm_res['step_cpu_ms'], 4)
      res['load_avg_1m_after_timm'] = round(os.getloadavg()[0], 2)

  _print_table(res)
  line = json.dumps(res)
  print(line, flush=True)
  if args.json_out:
    with open(args.json_out, 'a') as f:
      f.write(line + '\n')
  return res


def _fmt_bytes(b):
  if b is None:
    return 'n/a'
  return f'{b / 2**30:.2f} GiB' if b >= 2**30 else f'{b / 2**20:.1f} MiB'


def _print_table(r):
  rows = [
      ('model', f"{r['model']} {r['overrides'] or ''}".strip()),
      ('step', f"{r['step_impl']} ({r['parallel_backend']}"
               f"{' + FSDP' if r['fsdp'] else ''})"),
      ('state / device', _fmt_bytes(r['state_bytes_per_device'])),
      ('device', f"{r['device_kind']} x{r['devices']} ({r['backend']}, "
                 f"{r['threads']} CPU threads)"),
      ('batch / image / dtype', f"{r['batch_size']} ({r['per_device_batch']}"
                                f"/device) / {r['image_size']}px / "
                                f"{r['dtype']}"),
      ('img/s', f"{r['img_per_s']:.2f}"),
      ('step time (median)', f"{r['step_ms']:.1f} ms  windows "
                             f"{r['step_ms_windows']}"),
      ('CPU time / step', f"{r['step_cpu_ms']:.1f} ms (host process, all "
                          'threads)'),
      ('compile time', f"{r['compile_s']:.1f} s"),
      ('peak memory / device', f"{_fmt_bytes(r['peak_mem_bytes'])} "
                               f"({r['peak_mem_source']})"),
      ('fwd GFLOPs / image', f"{r['fwd_flops_per_image'] / 1e9:.2f} "
                             f"(= 2 x {r['fwd_macs_per_image'] / 1e9:.2f} "
                             'G multiply-adds)'),
      ('train GFLOPs / image', f"{r['train_flops_per_image'] / 1e9:.2f} "
                               '(3 x fwd)'),
      ('achieved TFLOP/s', f"{r['achieved_tflops']:.4f}"),
      ('MFU', f"{100 * r['mfu']:.1f}% of {r['peak_tflops']} TFLOP/s/device"
              if r['mfu'] is not None else 'n/a (unknown peak; pass '
              '--peak_tflops)'),
      ('load average (1 min)', f"{r['load_avg_1m']}"),
      ('CPU runtime tuning', r['cpu_runtime']['status']),
  ]
  if r.get('timm'):
    t = r['timm']
    rows += [('timm step time', f"{t['step_ms']:.1f} ms ({t['img_per_s']:.2f}"
                                f" img/s, {t['threads']} threads, torch "
                                f"{t['torch_version']}, malloc "
                                f"{'tuned' if t.get('malloc_tuned') else 'default'}"
                                f", windows {t['step_ms_windows']})"),
             ('timm CPU time / step', f"{t['step_cpu_ms']:.1f} ms"),
             ('ours / timm step time',
              f"{r['ratio_step_time_ours_over_timm']:.3f} (CPU time: "
              f"{r['ratio_cpu_time_ours_over_timm']:.3f})")]
  width = max(len(k) for k, _ in rows)
  print('\n'.join(f'{k:<{width}}  {v}' for k, v in rows), file=sys.stderr,
        flush=True)


if __name__ == '__main__':
  main()
