"""nfnets.runtime: the glibc malloc and dispatch settings for XLA:CPU (fresh
processes)."""
import json
import platform
import statistics
import sys
import textwrap

import pytest

import background
from nfnets import runtime

_PROBE = textwrap.dedent('''
    import json, resource
    from nfnets import runtime
    status = runtime.configure_cpu_runtime()
    import jax, jax.numpy as jnp
    x = jnp.ones((2048, 4096), jnp.float32)
    # ~100 MB of XLA temporaries and a 16 MB output per call.
    f = jax.jit(lambda x: jnp.sort(jnp.sin(x) * 2.0, axis=0)[::2]
                + jnp.cos(x)[::2])
    jax.block_until_ready(f(x)); jax.block_until_ready(f(x))
    faults = []
    for _ in range(8):
      r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(f(x))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    print(json.dumps({'status': status, 'faults': faults,
                      'async': jax.config.values['jax_cpu_enable_async_dispatch']}))
''')


def _probe(**env):
  full = {k: v for k, v in background.env().items()
          if k not in ('XLA_FLAGS', runtime.ENV_SWITCH)}
  full.update(JAX_PLATFORMS='cpu', **env)
  out = background.run([sys.executable, '-c', _PROBE], env=full, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@background.job
def malloc_probes(tmp):
  """The probe's report in a fresh process with nfnets.runtime's settings,
  and in one with them switched off."""
  del tmp
  return _probe(), _probe(**{runtime.ENV_SWITCH: '0'})


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_malloc_setting_removes_per_execution_page_faults(malloc_probes):
  tuned, plain = malloc_probes
  assert tuned['status'] == {'status': 'on', 'malloc': 'no mmap, no trim',
                             'dispatch': 'synchronous'}
  assert tuned['async'] is False
  assert plain['status']['status'].startswith('off')
  assert plain['async'] is True
  # Without it every execution faults its temporaries back in (4 KiB pages;
  # ~12k pages per call here).
  assert min(plain['faults'][-3:]) > 5000, plain
  # With it a typical execution reuses the heap: no page faults. (A call
  # may still fault once in a while, when a worker thread's arena grows.)
  assert statistics.median(tuned['faults']) < 100, tuned
  assert sum(tuned['faults']) < sum(plain['faults']) / 4, (tuned, plain)


def test_off_when_backend_running_or_accelerator_or_switched_off(monkeypatch):
  import jax
  jax.numpy.zeros(1).block_until_ready()  # this process's backend is up
  assert runtime.configure_cpu_runtime()['status'].startswith(
      'off (JAX backend already initialised')
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert not runtime.cpu_only()
  assert runtime.configure_cpu_runtime()['status'] == (
      'off (accelerator platform)')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert runtime.cpu_only()
  monkeypatch.setenv(runtime.ENV_SWITCH, '0')
  assert runtime.configure_cpu_runtime()['status'].startswith('off (')
