"""The default experiment: a small LLaMA-style model on the embedded stdlib corpus.

Launch:   lmx train --config=experiments/default.py
Runs on:  2 CPU cores in about 8 minutes (tokenizer ~30 s, training ~6 min, eval + sample).
Expect:   validation perplexity far below one tenth of the unigram perplexity of the same
          validation tokens (both are printed), then a sampled continuation of `def `.
"""

from lmx.config import base_config


def get_config(arg: str | None = None):
  del arg
  c = base_config()
  c.name = "default"
  c.run_dir = "runs/default"  # checkpoints, metrics.jsonl, TensorBoard events, loss curve
  c.seed = 0  # model init and dropout-free sampling RNG

  m = c.model
  m.vocab_size = 4096  # SentencePiece BPE with byte fallback, trained on the corpus
  m.d_model = 256  # residual width
  m.n_layers = 4  # transformer blocks
  m.n_heads = 8  # query heads (head_dim 32)
  m.n_kv_heads = 2  # GQA: 4 query heads share each K/V head
  m.mlp = "swiglu"  # LLaMA gated MLP, d_ff = 8/3 * d_model rounded to 64
  m.norm = "rmsnorm"  # LLaMA norm
  m.position = "rope"  # rotary positions
  m.rope_theta = 10000.0  # RoPE base
  m.max_seq_len = 256  # longest sequence the model is used with
  m.tie_embeddings = True  # share input embedding and output projection

  d = c.data
  d.corpus = "stdlib"  # the Python standard library sources + pydoc topics
  d.seq_len = 256  # tokens per packed row
  d.batch_size = 16  # sequences per optimizer step (4,096 tokens)

  t = c.train
  t.steps = 800  # optimizer steps (~3.3M tokens)
  t.learning_rate = 3e-3  # peak AdamW LR
  t.warmup_steps = 50  # linear warmup
  t.min_lr_ratio = 0.1  # cosine floor
  t.weight_decay = 0.1  # decoupled decay, not on norms/biases
  t.grad_clip = 1.0  # global-norm clip
  t.precision = "float32"  # CPU: fp32 is fastest; bfloat16 on TPU/GPU
  t.eval_every = 200  # validation loss every N steps
  t.eval_batches = 16  # validation batches per eval
  t.log_every = 20  # JSONL/TensorBoard cadence

  c.checkpoint.every = 200  # steps between checkpoints
  c.checkpoint.keep = 2  # newest checkpoints kept (plus the best)

  c.sample.prompt = "def "  # prompt for the final sample
  c.sample.max_new_tokens = 64  # tokens sampled
  c.sample.temperature = 0.8
  c.sample.top_k = 40
  c.sample.top_p = 0.95
  return c
