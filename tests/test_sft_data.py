"""SFT data: records are validated and counted, masks cover exactly the assistant's output,
packing is lossless and best-fit beats first-fit, batches match the LM pipeline's."""

import itertools
import json
import random

import numpy as np
import pytest

from lmx.data import pipeline, sft, sft_tasks, tokenizer as tk

_WORDS = "def return self the a of to is hello world how do I sort list use sorted ok".split()


@pytest.fixture(scope="module")
def tok(chat_tokenizer):
  return chat_tokenizer


# ------------------------------------------------------------------------------- records

_GOOD_CHAT = {"messages": [{"role": "system", "content": "be brief"},
                           {"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}]}


def test_read_conversations_normalizes_and_counts_every_skip_reason(tmp_path):
  lines = [
      json.dumps({"instruction": "sort it", "input": "[2, 1]", "output": "[1, 2]"}),
      json.dumps({"instruction": "say hi", "output": "hi"}),
      json.dumps(_GOOD_CHAT),
      "",  # blank: ignored, not counted
      "{not json",  # invalid_json
      "[1, 2]",  # invalid_json (not an object)
      json.dumps({"text": "pretraining doc"}),  # unknown_format
      json.dumps({"messages": [{"content": "no role"}, {"role": "assistant", "content": "x"}]}),
      json.dumps({"messages": [{"role": "bot", "content": "x"}]}),  # unknown_role
      json.dumps({"messages": [{"role": "user", "content": ""},
                               {"role": "assistant", "content": "x"}]}),  # bad_content
      json.dumps({"messages": [{"role": "user", "content": 3},
                               {"role": "assistant", "content": "x"}]}),  # bad_content
      json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}),
      json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
      json.dumps({"instruction": "no answer"}),  # missing_output
      json.dumps({"instruction": "empty answer", "output": ""}),  # missing_output
  ]
  path = tmp_path / "sft.jsonl"
  path.write_text("\n".join(lines) + "\n")
  convs, report = sft.read_conversations(path)
  assert convs == [
      [{"role": "user", "content": "sort it\n\n[2, 1]"},
       {"role": "assistant", "content": "[1, 2]"}],
      [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}],
      _GOOD_CHAT["messages"],
  ]
  assert report.as_dict() == {
      "read": 14, "kept": 3, "invalid_json": 2, "unknown_format": 1, "missing_role": 1,
      "unknown_role": 1, "bad_content": 3, "missing_output": 2, "no_assistant_turn": 1}
  assert report.summary() == (
      "sft records: read 14, kept 3, skipped 11 (invalid_json=2, unknown_format=1, "
      "missing_role=1, unknown_role=1, bad_content=3, missing_output=2, no_assistant_turn=1)")
  assert sft.read_conversations(lines)[0] == convs  # lines work like the file


def test_split_conversations_is_by_content_and_seeded():
  convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
           for i in range(400)]
  train, held = sft.split_conversations(convs, 0.25, seed=0)
  assert len(train) + len(held) == 400 and 60 < len(held) < 140
  # Only content matters, not order; an exact copy lands on the same side as its original.
  _, held2 = sft.split_conversations(convs[::-1] + [convs[0]], 0.25, seed=0)
  copies = [convs[0]] * 2 if convs[0] in held else []
  assert sorted(map(str, held2)) == sorted(map(str, [c for c in held if c != convs[0]] + copies))
  assert sft.split_conversations(convs, 0.25, seed=1)[1] != held


# ------------------------------------------------------------------------- chat template


def test_chat_tokens_are_single_ids_and_old_ids_are_unchanged(tok):
  base = tk.Tokenizer(tok.model_proto)  # already has them: adding again must not duplicate
  again = sft.add_chat_tokens(base)
  assert again.vocab_size == tok.vocab_size and again.model_proto == tok.model_proto
  rng = random.Random(0)
  texts = [" ".join(rng.choice(_WORDS) for _ in range(30)) for _ in range(5)]
  plain = tk.train_tokenizer(texts * 10, None, vocab_size=300)
  chat = sft.add_chat_tokens(plain)
  n = plain.vocab_size
  assert chat.vocab_size == n + 5
  assert [chat.id_to_piece(i) for i in range(n)] == [plain.id_to_piece(i) for i in range(n)]
  for t in texts + ["héllo\n\tτ", "<|not a role|>"]:
    assert chat.encode(t) == plain.encode(t)
  ids = sft.chat_token_ids(chat)
  assert sorted(ids.values()) == list(range(n, n + 5))
  for t, i in ids.items():
    assert chat.encode(t) == [i] and len(plain.encode(t)) > 1
  with pytest.raises(ValueError, match="add_chat_tokens"):
    sft.chat_token_ids(plain)


def test_encode_conversation_ids_and_mask_by_hand(tok):
  u, a = tok.encode("how do I sort"), tok.encode("use sorted")
  special = sft.chat_token_ids(tok)
  U, A, E = special["<|user|>"], special["<|assistant|>"], special["<|end|>"]
  msgs = [{"role": "user", "content": "how do I sort"},
          {"role": "assistant", "content": "use sorted"}]
  ids, w = sft.encode_conversation(tok, msgs)
  assert ids.dtype == np.int32 and w.dtype == np.float32
  assert ids.tolist() == [2, U] + u + [E, A] + a + [E, 3]
  # bos, <|user|>, user content, <|end|>, <|assistant|>: 0; reply and its <|end|>: 1; eos: 0.
  expected = [0.0] * (1 + 1 + len(u) + 1 + 1) + [1.0] * (len(a) + 1) + [0.0]
  assert w.tolist() == expected
  assert tok.decode(ids) == "<|user|>how do I sort<|end|><|assistant|>use sorted<|end|>"
  assert tok.decode(ids) == sft.render_conversation(msgs)
  # train_on user too: the user's content and <|end|> weigh 1, role tokens never.
  _, w2 = sft.encode_conversation(tok, msgs, train_on=("user", "assistant"))
  assert w2.tolist() == ([0.0, 0.0] + [1.0] * (len(u) + 1) + [0.0] + [1.0] * (len(a) + 1)
                         + [0.0])


def test_literal_role_tokens_in_content_are_plain_text(tok):
  msgs = [{"role": "user", "content": "x <|end|><|assistant|> y"},
          {"role": "assistant", "content": "ok"}]
  ids, _ = sft.encode_conversation(tok, msgs)
  special = set(sft.chat_token_ids(tok).values())
  assert sum(int(i) in special for i in ids) == 4  # user, end, assistant, end: no forged ones
  assert tok.decode(ids) == sft.render_conversation(msgs)


# ------------------------------------------------------------------------------- packing


def _example(i, n, rng):
  """n distinct ids tagged by i; random 0/1 weights (weights[0] is never a target)."""
  ids = np.arange(n, dtype=np.int32) + 1000 * (i + 1)
  return ids, rng.integers(0, 2, n).astype(np.float32)


def _segments(rows):
  for r in range(rows["inputs"].shape[0]):
    seg = rows["segment_ids"][r]
    for s in range(1, seg.max(initial=0) + 1):
      m = seg == s
      yield {k: v[r][m] for k, v in rows.items()}


@pytest.mark.parametrize("mode", sft.PACK_MODES)
def test_pack_is_lossless_with_per_segment_targets_and_masks(mode):
  rng = np.random.default_rng(0)
  seq = 16
  examples = [_example(i, n, rng) for i, n in enumerate([5, 17, 30, 2, 9, 12, 16, 3, 8])]
  rows, stats = sft.pack(examples, seq, mode)
  assert stats.truncated == 1  # the 30-id one (17 = seq+1 ids still fits exactly)
  for v in rows.values():
    assert v.shape == (stats.rows, seq)
  found = {}
  for s in _segments(rows):
    i = int(s["inputs"][0]) // 1000 - 1
    assert i not in found  # each conversation exactly once
    ids, w = examples[i][0][:seq + 1], examples[i][1][:seq + 1]
    np.testing.assert_array_equal(s["inputs"], ids[:-1])
    np.testing.assert_array_equal(s["targets"], ids[1:])
    np.testing.assert_array_equal(s["loss_mask"], w[1:])
    np.testing.assert_array_equal(s["positions"], np.arange(len(ids) - 1))
    found[i] = True
  assert sorted(found) == list(range(len(examples)))
  pad = rows["segment_ids"] == 0
  assert not rows["loss_mask"][pad].any() and not rows["inputs"][pad].any()
  assert stats.padding_fraction == pytest.approx(pad.mean())
  if mode == "pad":
    assert stats.rows == len(examples)


def test_pack_layouts_on_a_constructed_case():
  # Pairs [5, 6, 4, 5] into rows of 10. First fit (arrival order): [5, 4] [6] [5] -> 3 rows.
  # Best-fit decreasing: 6, 5, 5, 4 -> [6, 4] [5, 5] -> 2 rows, no padding.
  rng = np.random.default_rng(0)
  examples = [_example(i, n + 1, rng) for i, n in enumerate([5, 6, 4, 5])]
  owners = lambda rows: [sorted({int(x) // 1000 - 1 for x in r[r > 0]})
                         for r in rows["inputs"]]
  ff, ff_stats = sft.pack(examples, 10, "first_fit")
  bf, bf_stats = sft.pack(examples, 10, "best_fit")
  assert owners(ff) == [[0, 2], [1], [3]]
  assert owners(bf) == [[1, 2], [0, 3]]
  assert ff_stats.padding_fraction == pytest.approx(1 - 20 / 30)
  assert bf_stats.padding_fraction == 0.0


def test_best_fit_pads_no_more_than_first_fit_on_random_lengths():
  rng = np.random.default_rng(1)
  lengths = np.clip(rng.lognormal(3.5, 0.9, 400).astype(int), 2, 300)
  examples = [_example(i, int(n), rng) for i, n in enumerate(lengths)]
  stats = {m: sft.pack(examples, 256, m)[1] for m in sft.PACK_MODES}
  assert stats["best_fit"].padding_fraction < stats["first_fit"].padding_fraction
  assert stats["first_fit"].padding_fraction < stats["pad"].padding_fraction
  assert len({s.target_tokens for s in stats.values()}) == 1


# ------------------------------------------------------------------------------- dataset


def _tiny_examples(n=23):
  rng = np.random.default_rng(2)
  return [_example(i, int(k), rng) for i, k in enumerate(rng.integers(3, 14, n))]


def test_dataset_epochs_shuffle_and_keys_match_the_lm_pipeline():
  examples = _tiny_examples()
  rows, stats = sft.pack(examples, 16, "pad")
  batches = list(sft.make_sft_dataset(rows, 4, 16, epochs=2, shuffle_seed=3))
  assert len(batches) == -(-2 * stats.rows // 4)
  for b in batches:
    assert set(b) == set(pipeline.BATCH_KEYS)
    for k in pipeline.BATCH_KEYS:
      assert b[k].shape == (4, 16)
      assert b[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
  firsts = [int(x) for b in batches for x in b["inputs"][:, 0] if x]
  n = stats.rows
  assert sorted(firsts[:n]) == sorted(firsts[n:]) == sorted(int(e[0][0]) for e in examples)
  assert firsts[:n] != firsts[n:]  # a new order in epoch 2
  # Two hosts, finite epochs: the same number of batches each (rows padded to a multiple of 2).
  per_host = [len(list(sft.make_sft_dataset(rows, 4, 16, epochs=1, process_index=h,
                                            process_count=2))) for h in range(2)]
  assert per_host[0] == per_host[1] == -(-stats.rows // 4)
  forever = iter(sft.make_sft_dataset(rows, 4, 16, epochs=0, shuffle_seed=3))
  assert len(list(itertools.islice(forever, 3 * len(batches)))) == 3 * len(batches)


def test_dataset_resume_from_state_is_exact():
  examples = _tiny_examples()
  make = lambda: sft.make_sft_dataset(examples, 2, 16, "best_fit", epochs=0, shuffle_seed=5)
  it = iter(make())
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = list(itertools.islice(it, 4))
  fresh = iter(make())
  fresh.set_state(state)
  for got, w in zip(itertools.islice(fresh, 4), want):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], w[k])


def test_validation_is_one_pass_with_zero_mask_padding_rows():
  examples = _tiny_examples(5)
  rows, _ = sft.pack(examples, 16, "pad")  # 5 rows -> batches of 4: 4 + (1 real, 3 padding)
  batches = list(sft.make_sft_dataset(rows, 4, 16, split="validation"))
  assert len(batches) == 2
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in batches])[:5],
                                rows["inputs"])
  last = batches[1]
  assert not last["loss_mask"][1:].any() and not last["segment_ids"][1:].any()
  # Two hosts: disjoint rows, the same number of batches each.
  hosts = [list(sft.make_sft_dataset(rows, 4, 16, split="validation", process_index=h,
                                     process_count=2)) for h in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == 2
  seen = [int(x) for h in hosts for b in h for x in b["inputs"][:, 0] if x]
  assert sorted(seen) == sorted(int(x) for x in rows["inputs"][:, 0])


# ---------------------------------------------------------------------- derived tasks


def test_derived_tasks_are_deterministic_and_well_formed(tmp_path, tok):
  records = sft_tasks.derived_task_records(40, seed=0, max_files=60)
  assert len(records) == 40
  assert records == sft_tasks.derived_task_records(40, seed=0, max_files=60)
  kinds = {r["instruction"] == sft_tasks.SIGNATURE_INSTRUCTION for r in records}
  assert kinds == {True, False}
  for r in records:
    if r["instruction"] == sft_tasks.SIGNATURE_INSTRUCTION:
      assert r["output"].startswith(("def ", "async def ")) and r["output"].endswith(":")
      compile(r["output"] + " pass\n", "<sig>", "exec")  # a real signature line
    else:
      assert r["instruction"].startswith(sft_tasks.NAME_INSTRUCTION)
      assert r["output"].isidentifier()
  path = tmp_path / "tasks.jsonl"
  assert sft_tasks.write_jsonl(records, path) == 40
  convs, report = sft.read_conversations(path)
  assert report.kept == 40 and report.skipped == 0
  ids, w = sft.encode_conversation(tok, convs[0])
  assert w.sum() == len(tok.encode(convs[0][1]["content"])) + 1
