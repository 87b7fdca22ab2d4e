"""Checkpoints: kill -9 during a save, restore_params, the best-checkpoint slot."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmx.config import CheckpointConfig, MeshConfig, ModelConfig, base_config, from_config_dict
from lmx.model import Transformer
from lmx.parallel.mesh import make_mesh, state_shardings
from lmx.train.checkpoint import Checkpointer, restore_params

N = 16 << 20  # float32 elements per save: 64 MB, so a save takes a while

WRITER = textwrap.dedent(f"""
  import sys
  import jax.numpy as jnp
  from lmx.config import CheckpointConfig
  from lmx.train.checkpoint import Checkpointer
  ck = Checkpointer(sys.argv[1], CheckpointConfig(every=1, keep=100, async_save=True))
  step = 1
  while True:
    ck.save(step, {{"w": jnp.full(({N},), float(step), jnp.float32)}}, {{"iterator": {{"s": step}}}})
    ck.wait()
    print("saved", step, flush=True)
    step += 1
""")


def _tmp_dirs(path):
  return [d for d in os.listdir(path) if "tmp" in d] if os.path.isdir(path) else []


@pytest.mark.slow  # subprocess writing 64 MB saves until killed
def test_kill9_during_save_leaves_previous_checkpoint(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  ckdir = tmp_path / "checkpoints"
  seen_tmp = []
  try:
    assert proc.stdout.readline().split() == ["saved", "1"]
    deadline = time.time() + 120
    while time.time() < deadline and not seen_tmp:  # a later step is being written
      seen_tmp = _tmp_dirs(ckdir)
      time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert seen_tmp, "never observed a save in progress"
  assert proc.returncode == -signal.SIGKILL
  ck = Checkpointer(tmp_path, CheckpointConfig(keep=100, async_save=False))
  step = ck.latest_step()
  assert step is not None and step >= 1
  # Only complete steps are listed; the half-written one (left as *-tmp) is not.
  finished = {int(d) for d in os.listdir(ckdir) if d.isdigit()}
  assert set(ck.latest.all_steps()) == finished
  for d in _tmp_dirs(ckdir):
    assert int(d.split(".")[0]) not in finished
  abstract = {"w": jax.ShapeDtypeStruct((N,), jnp.float32)}
  mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
  state, data, got = ck.restore_latest(abstract, state_shardings(abstract, mesh))
  assert got == step and data == {"iterator": {"s": step}}
  w = np.asarray(state["w"])
  assert w.shape == (N,) and np.all(w == float(step))
  ck.close()


CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)


def _exp(run_dir):
  c = base_config()
  for k in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
    c.model[k] = getattr(CFG, k)
  c.run_dir = str(run_dir)
  return from_config_dict(c)


def _assert_same_params(a, b):
  """Every parameter leaf of modules a and b is bitwise equal (same tree, same values)."""
  la = jax.tree_util.tree_flatten_with_path(nnx.state(a, nnx.Param))[0]
  lb = jax.tree_util.tree_flatten_with_path(nnx.state(b, nnx.Param))[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  assert len(la) > 5  # embed, norms, attention and MLP weights
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_restore_params_prefers_best_then_latest(tmp_path):
  from lmx.train.optimizer import make_optimizer
  from lmx.train.state import create_train_state
  exp = _exp(tmp_path)
  src = [Transformer(CFG, rngs=nnx.Rngs(s)) for s in (1, 2, 3)]
  ck = Checkpointer(tmp_path, CheckpointConfig(keep=2, async_save=False))
  opt = make_optimizer(exp.train)
  state = create_train_state(nnx.state(src[0], nnx.Param), opt, exp.train, 0)
  ck.save(10, state, {"iterator": {}})
  ck.wait()
  target = Transformer(CFG, rngs=nnx.Rngs(9))
  assert restore_params(exp, target) == {"source": str(tmp_path / "checkpoints" / "10"),
                                         "step": 10}
  _assert_same_params(target, src[0])
  # A best checkpoint wins over the latest; a better one replaces it (one kept).
  ck.save_best(4, nnx.state(src[1], nnx.Param), 2.5)
  ck.save_best(8, nnx.state(src[2], nnx.Param), 2.0)
  ck.wait()
  assert sorted(os.listdir(tmp_path / "best")) == ["8"]
  r = restore_params(exp, target)
  assert r["step"] == 8
  _assert_same_params(target, src[2])
  ck.close()


def test_restore_params_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    restore_params(_exp(tmp_path), Transformer(CFG, rngs=nnx.Rngs(0)))
