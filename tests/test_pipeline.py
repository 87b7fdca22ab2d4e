"""Grain pipeline: packing is lossless, batches are well-formed, resume is exact, hosts split."""

import collections
import itertools
import json
import random

import grain
import numpy as np
import pytest

from lmx.config import base_config, from_config_dict
from lmx.data import corpus, mixing, pipeline, shards, tokenizer as tk

SEQ, BATCH = 32, 4


def _write_corpus(folder, n_docs, seed, alphabet="abcdefgh"):
  rng = random.Random(seed)
  folder.mkdir()
  for i in range(n_docs):
    n_words = rng.choice([1, 3, 10, 40, 150])  # some docs span several rows
    words = ("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 6)))
             for _ in range(n_words))
    (folder / f"d{i:03d}.txt").write_text(" ".join(words) + "\n")
  return str(folder)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  main = _write_corpus(root / "main", 60, 0)
  other = _write_corpus(root / "other", 30, 1, alphabet="xyz")
  docs = [d.text for d in corpus.iter_documents(
      from_config_dict({"data": {"corpus": main}}).data)]
  tok = tk.train_tokenizer(docs + ["xyz"], str(root / "tok"), vocab_size=300)
  return root, main, other, tok


def _exp(env, **data):
  root, main, _, tok = env
  c = base_config()
  c.model.vocab_size = 300
  c.data.update(dict(corpus=main, cache_dir=str(root / "cache"), seq_len=SEQ,
                     batch_size=BATCH, validation_fraction=0.25, tokenizer_path=tok.path))
  c.data.update(data)
  return from_config_dict(c)


def _reference_docs(exp, tok, split):
  """[bos] + encode(text) + [eos] for every document of `split`, in corpus order."""
  out = []
  for d in corpus.iter_documents(exp.data):
    if corpus.is_validation(d.id, exp.data.validation_fraction) == (split == "validation"):
      out.append([tok.bos_id] + tok.encode(d.text) + [tok.eos_id])
  return out


def _segments(batches):
  """(inputs, targets, positions) of every segment, in row order."""
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      seg = b["segment_ids"][r]
      for s in np.unique(seg[seg > 0]):
        m = seg == s
        yield b["inputs"][r][m], b["targets"][r][m], b["positions"][r][m]


def _unpack(batches, eos_id):
  """Rebuild the documents from packed rows: consecutive pieces overlap by one token."""
  docs, cur = [], None
  for inp, tgt, _ in _segments(batches):
    if cur is None:
      cur = [int(inp[0])]
    assert cur[-1] == inp[0]  # a continued piece starts where the last one stopped
    cur += tgt.tolist()
    if tgt[-1] == eos_id:
      docs.append(cur)
      cur = None
  assert cur is None
  return docs


@pytest.mark.parametrize("packing", [True, False])
def test_validation_batches_are_lossless_and_well_formed(env, packing):
  tok = env[3]
  exp = _exp(env, packing=packing)
  batches = list(pipeline.make_dataset(exp, tok, "validation"))
  assert batches
  for b in batches:
    assert set(b) == set(pipeline.BATCH_KEYS)
    for k in pipeline.BATCH_KEYS:
      assert b[k].shape == (BATCH, SEQ)
      assert b[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
    seg = b["segment_ids"]
    np.testing.assert_array_equal(b["loss_mask"], (seg > 0).astype(np.float32))
    pad = seg == 0
    assert (b["inputs"][pad] == tok.pad_id).all() and (b["targets"][pad] == tok.pad_id).all()
    for row in seg:  # ids count 1, 2, ... left to right; padding only at the end
      nz = row[row > 0]
      assert (np.diff(nz) >= 0).all() and (nz.size == 0 or nz[0] == 1)
      assert (np.diff(np.unique(nz)) == 1).all()
      assert (row[nz.size:] == 0).all()
      if not packing:
        assert nz.max(initial=0) <= 1
  for inp, tgt, pos in _segments(batches):
    np.testing.assert_array_equal(pos, np.arange(len(inp)))
    np.testing.assert_array_equal(inp[1:], tgt[:-1])  # targets are the next tokens
  assert _unpack(batches, tok.eos_id) == _reference_docs(exp, tok, "validation")
  if packing:  # every row but those of the final batch is full
    full = np.concatenate([b["loss_mask"] for b in batches[:-1]])
    assert full.all()


def test_train_stream_covers_every_train_token_once_per_epoch(env):
  tok = env[3]
  exp = _exp(env)
  ref = _reference_docs(exp, tok, "train")
  n_pairs = sum(len(d) - 1 for d in ref)
  it = iter(pipeline.make_dataset(exp, tok, "train"))
  n_batches = n_pairs // (BATCH * SEQ)  # whole batches inside epoch 1 (rows are all full)
  got = [next(it) for _ in range(n_batches)]
  assert all(b["loss_mask"].all() for b in got)
  pieces = collections.Counter()
  for inp, tgt, _ in _segments(got):
    pieces.update(zip(inp.tolist(), tgt.tolist()))
  want = collections.Counter()
  for d in ref:
    want.update(zip(d[:-1], d[1:]))
  assert not pieces - want  # no pair appears more often than the corpus has it
  assert sum(pieces.values()) == n_batches * BATCH * SEQ


def test_shuffle_is_seeded_and_differs_per_epoch(env):
  tok = env[3]
  a = pipeline.document_dataset(_exp(env).data, tok, "train")
  b = pipeline.document_dataset(_exp(env).data, tok, "train")
  c = pipeline.document_dataset(_exp(env, shuffle_seed=7).data, tok, "train")
  n = shards.shard_index(shards.shard_dir(_exp(env).data, tok))["splits"]["train"]["documents"]
  first = [a[i].tolist() for i in range(n)]
  assert first == [b[i].tolist() for i in range(n)]
  assert first != [c[i].tolist() for i in range(n)]
  second = [a[i].tolist() for i in range(n, 2 * n)]
  assert second != first and sorted(second) == sorted(first)
  assert sorted(first) == sorted(_reference_docs(_exp(env), tok, "train"))


@pytest.mark.parametrize("split,k", [("train", 3), ("train", 11), ("validation", 1)])
def test_resume_from_state_is_exact(env, split, k):
  tok = env[3]
  exp = _exp(env)
  it = iter(pipeline.make_dataset(exp, tok, split))
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON (Orbax handler)
  expected = list(itertools.islice(it, 3))
  assert expected
  fresh = iter(pipeline.make_dataset(exp, tok, split))
  fresh.set_state(state)
  got = list(itertools.islice(fresh, 3))
  assert len(got) == len(expected)
  for g, want in zip(got, expected):
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(g[key], want[key])


def test_resume_mid_document(env):
  tok = env[3]
  exp = _exp(env)
  it = iter(pipeline.make_dataset(exp, tok, "train"))
  for _ in range(40):
    next(it)
    if it.get_state()["offset"]:
      break
  state = it.get_state()
  assert state["offset"] > 0  # a document continues into the next batch
  want = next(it)
  fresh = iter(pipeline.make_dataset(exp, tok, "train"))
  fresh.set_state(state)
  np.testing.assert_array_equal(next(fresh)["inputs"], want["inputs"])


def test_orbax_checkpoint_manager_round_trip(env, tmp_path):
  import orbax.checkpoint as ocp
  tok = env[3]
  exp = _exp(env)
  it = iter(pipeline.make_dataset(exp, tok, "train"))
  for _ in range(5):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  want = next(it)
  fresh = iter(pipeline.make_dataset(exp, tok, "train"))
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(next(fresh)["targets"], want["targets"])


def test_two_hosts_split_the_stream(env):
  tok = env[3]
  exp = _exp(env)
  # Train: host h reads documents h, h+2, ... of the single-host (shuffled) stream.
  one = pipeline.document_dataset(exp.data, tok, "train")
  hosts = [pipeline.document_dataset(exp.data, tok, "train", h, 2) for h in (0, 1)]
  for i in range(50):
    np.testing.assert_array_equal(hosts[i % 2][i // 2], one[i])
  # Validation: same number of half-size batches per host; the documents are disjoint and
  # together are exactly the single-host documents.
  per_host = [list(pipeline.make_dataset(exp, tok, "validation", h, 2)) for h in (0, 1)]
  assert len(per_host[0]) == len(per_host[1])
  assert per_host[0][0]["inputs"].shape == (BATCH // 2, SEQ)
  docs = [_unpack(b, tok.eos_id) for b in per_host]
  ref = _reference_docs(exp, tok, "validation")
  assert docs[0] == ref[0::2] and docs[1] == ref[1::2]
  with pytest.raises(ValueError, match="process_index"):
    pipeline.make_dataset(exp, tok, "train", 2, 2)
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_dataset(exp, tok, "train", 0, 3)


@pytest.mark.slow  # compiles/trains: not in the 90 s fast set
def test_mixing_matches_token_weights(env):
  root, main, other, tok = env
  exp = _exp(env, seq_len=16)
  ds = mixing.make_mixed_dataset(exp, tok, [(main, 0.7), (other, 0.3)], with_source=True)
  share = mixing.measure_mixture(iter(ds), 1000, 2)
  np.testing.assert_allclose(share, [0.7, 0.3], atol=0.02)
  # data.mixture routes make_dataset(train) through the same mixer.
  mixed = _exp(env, seq_len=16, mixture=f"{main}=1,{other}=3")
  b = next(iter(pipeline.make_dataset(mixed, tok, "train")))
  assert set(b) == set(pipeline.BATCH_KEYS) and b["inputs"].shape == (BATCH, 16)


def test_bad_split_and_empty_split(env, tmp_path):
  tok = env[3]
  with pytest.raises(ValueError, match="split"):
    pipeline.make_dataset(_exp(env), tok, "test")
  with pytest.raises(ValueError, match="no documents"):
    pipeline.make_dataset(_exp(env, max_docs=1, validation_fraction=0.01), tok, "validation")


def test_rows_needed_matches_the_packer(env):
  tok = env[3]
  for packing in (True, False):
    exp = _exp(env, packing=packing)
    rows = pipeline.packed_rows(exp.data, tok, "validation")
    lengths = shards.split_lengths(shards.shard_dir(exp.data, tok), "validation")
    real = sum(1 for r in rows if r["loss_mask"].any())
    assert real == pipeline.rows_needed(lengths, SEQ, packing)
