"""The mesh from config (ICI x DCN factors, -1 fill, clear errors), the rules table from
config, and the divisibility check that runs before anything compiles."""

import types

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from lmx.config import ConfigError, MeshConfig, ModelConfig, base_config, from_config_dict
from lmx.model import Transformer
from lmx.parallel import rules as rules_lib
from lmx.parallel.mesh import (check_divisible, device_grid, make_mesh, mesh_axis_sizes,
                               state_shardings)


def test_mesh_fills_the_minus_one_axis_and_multiplies_ici_by_dcn():
  assert mesh_axis_sizes(MeshConfig(data=-1, tensor=2), 8) == ([4, 1, 2, 1, 1], [1] * 5)
  ici, dcn = mesh_axis_sizes(MeshConfig(data=-1, fsdp=2, dcn_data=2), 16)
  assert ici == [4, 2, 1, 1, 1] and dcn == [2, 1, 1, 1, 1]
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "pipeline": 1, "expert": 1}
  # Plain reshape on CPU: device i sits at the row-major index i.
  assert [d.id for d in mesh.devices.reshape(-1)] == [d.id for d in jax.devices()]


@pytest.mark.parametrize("cfg, n, pattern", [
    (MeshConfig(data=3), 8, r"`mesh` sizes .*multiply to 3, but 8 devices"),
    (MeshConfig(data=-1, tensor=3), 8, r"fixes 3 devices per replica.*does not divide the 8"),
    (MeshConfig(data=2, dcn_data=2), 8, r"multiply to 4, but 8 devices"),
])
def test_mesh_size_errors_are_one_sentence(cfg, n, pattern):
  with pytest.raises(ConfigError, match=pattern) as e:
    mesh_axis_sizes(cfg, n)
  assert "\n" not in str(e.value)


def test_dcn_factors_need_that_many_slices():
  # One process of 8 CPU devices is one granule; dcn_data=2 asks for two.
  with pytest.raises(ConfigError, match=r"multiply to 2 slices.*belong to 1 processes"):
    make_mesh(MeshConfig(data=4, dcn_data=2))


def test_hybrid_mesh_keeps_dcn_across_processes():
  """Two fake 'processes' of 4 devices each: with dcn_data=2 the data axis crosses the
  processes only in its DCN part; every other axis stays within one process."""
  fake = [types.SimpleNamespace(id=i, process_index=i // 4, platform="cpu", device_kind="cpu")
          for i in range(8)]
  grid = device_grid(MeshConfig(data=1, fsdp=2, tensor=2, dcn_data=2), fake)
  assert grid.shape == (2, 2, 2, 1, 1)
  for i in range(2):  # data index i holds process i's devices only
    assert {d.process_index for d in grid[i].reshape(-1)} == {i}
  with pytest.raises(ConfigError, match=r"multiply to 4 slices.*belong to 2 processes"):
    device_grid(MeshConfig(data=1, fsdp=2, dcn_data=4), fake)


def test_rules_from_config():
  table = dict(rules_lib.parse_rules(""))
  assert table == dict(rules_lib.DEFAULT_RULES)
  sp = dict(rules_lib.parse_rules("sequence_parallel"))
  assert sp["seq"] == ("tensor",) and sp["mlp"] == ("tensor",)
  over = dict(rules_lib.parse_rules("default; mlp=tensor+fsdp; vocab="))
  assert over["mlp"] == ("tensor", "fsdp") and over["vocab"] == () and over["embed"] == ("fsdp",)
  c = base_config()
  c.mesh.rules = "mlp=tensr"
  with pytest.raises(ConfigError, match=r"`mesh.rules` is 'mlp=tensr'.*mesh axis 'tensr'"):
    from_config_dict(c)
  c.mesh.rules = "fancy"
  with pytest.raises(ConfigError, match=r"`mesh.rules`.*rule set 'fancy' is unknown"):
    from_config_dict(c)
  c.mesh.rules = "mlpp=tensor"
  with pytest.raises(ConfigError, match=r"`mesh.rules`.*NAME one of"):
    from_config_dict(c)


def test_rules_override_changes_the_layout():
  model = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
  params = nnx.state(nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(0))), nnx.Param)
  mesh = AbstractMesh((2, 2, 2, 1, 1), ("data", "fsdp", "tensor", "pipeline", "expert"))
  default = state_shardings(params, mesh)
  assert default["embed"].spec == P("tensor", "fsdp")  # (vocab, embed)
  replicated_vocab = state_shardings(params, mesh, rules_lib.parse_rules("vocab="))
  assert replicated_vocab["embed"].spec == P(None, "fsdp")


def _abstract_params(**kw):
  model = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=16, **kw)
  return nnx.state(nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(0))), nnx.Param)


@pytest.mark.parametrize("kw, mesh_shape, pattern", [
    # MQA: one KV head cannot split over tensor=2.
    ({"n_kv_heads": 1}, (4, 1, 2, 1, 1), r"'kv_heads'\) of size 1, which does not divide over "
                                          r"mesh axes tensor = 2"),
    # vocab 64 over tensor=8 is fine; 60 is not.
    ({"vocab_size": 60}, (1, 1, 8, 1, 1), r"\['embed'\].*'vocab'\) of size 60.*tensor = 8"),
])
def test_indivisible_sharded_dimension_is_named_before_compiling(kw, mesh_shape, pattern):
  kw = dict(kw)
  vocab = kw.pop("vocab_size", 64)
  model = ModelConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=4, max_seq_len=16, **kw)
  params = nnx.state(nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(0))), nnx.Param)
  mesh = AbstractMesh(mesh_shape, ("data", "fsdp", "tensor", "pipeline", "expert"))
  with pytest.raises(ConfigError, match=pattern) as e:
    check_divisible(params, mesh)
  assert "\n" not in str(e.value)
  ok = AbstractMesh((8, 1, 1, 1, 1), ("data", "fsdp", "tensor", "pipeline", "expert"))
  check_divisible(params, ok)  # pure data parallelism shards no parameter: nothing to divide
