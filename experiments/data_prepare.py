"""Clean and deduplicate the embedded stdlib corpus (or any `data.corpus`).

    lmx data prepare --config=experiments/data_prepare.py
    lmx data prepare --config=experiments/data_prepare.py --config.data.corpus=/my/texts \
        --config.prepare.output_dir=data/mine --config.prepare.pii=True

Takes 2-3 minutes on 2 CPU cores for the 1,841 stdlib documents (Python 3.11), most of it the
quality model. Expect (measured): 28 empty files skipped by the reader, 99 documents dropped
by the heuristic filters, 147 boilerplate lines cut from 90 files (the PSF license / copyright
headers), 1 exact and 99 near duplicates removed plus 90 training twins of validation
documents (48 clusters: the generated codec families, `load_tests` packages, idle test
templates), 31 documents (2%) dropped by the quality model: 1,841 -> 1,521 (docs/data.md has
the numbers before the character-shingle defaults). Re-running gives the same output hash.
Train on the result with `--config.data.corpus=data/stdlib_clean`.
"""

import ml_collections

from lmx.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config()
  c.name = "data_prepare"
  c.data.corpus = "stdlib"  # input; any folder / .jsonl / .array_record works too.

  p = ml_collections.ConfigDict()
  p.output_dir = "data/stdlib_clean"  # shards, reports/ and summary.json go here.
  p.shard_docs = 2000  # documents per output JSONL shard.
  p.strip_html = True  # strip markup from documents that look like HTML.
  p.pii = False  # scrub e-mails / phones / IPs (code is full of author e-mails: off here).
  p.pii_rules = ml_collections.ConfigDict(dict(
      phone_regions=("CN", "US", "GB", "DE", "FR", "IN", "JP"),  # national phone formats known.
      national_ids=False,  # also PRC resident ID numbers (checksum-validated) -> <ID>.
  ))
  p.max_examples = 3  # removed examples kept per reason in each report.

  # Code-tolerant heuristic thresholds (the Gopher prose values reject most Python).
  p.filters = ml_collections.ConfigDict(dict(
      min_chars=100,  # drop stubs like a bare `from x import *`.
      max_chars=1_000_000,  # 0 = no upper bound.
      min_words=10,
      min_mean_line_chars=5.0,  # mean non-blank line length.
      max_mean_line_chars=160.0,  # generated tables / minified data have huge lines.
      max_symbol_ratio=0.5,  # non-alphanumeric share of non-space chars.
      max_dup_line_fraction=0.5,  # chars in lines repeated within the document.
      max_top_ngram_fraction=0.4,  # chars covered by the most frequent word 2..4-gram.
      max_dup_ngram_fraction=0.8,  # chars inside repeated word 5-/10-grams (code repeats a lot).
  ))
  p.boilerplate = ml_collections.ConfigDict(dict(
      enabled=True,
      min_docs=10,  # the PSF header lines recur in ~40-100 of ~13k files.
      min_fraction=0.0,
      min_line_chars=20,  # shorter lines are never boilerplate.
      scope="edges",  # only header/footer runs; 'anywhere' for web text.
      edge_lines=60,
      sketch_width=1 << 20,  # count-min sketch: 16 MB whatever the corpus size.
      line_prefixes=("#",),  # code: only comment lines can be boilerplate, never statements.
  ))
  p.langid = ml_collections.ConfigDict(dict(
      enabled=True,
      keep=(),  # () keeps and only counts languages; ('en',) drops other prose.
      min_confidence=0.5,
      code_extensions=(".py", ".pyi", ".c", ".h", ".js", ".sh"),  # labelled 'code', never dropped.
      keep_undetermined=True,
  ))
  p.dedup = ml_collections.ConfigDict(dict(  # defaults from the curve in docs/data.md
      exact=True,
      near=True,
      threshold=0.4,  # Jaccard of character 6-gram sets (~5% character edits give ~0.6).
      num_perm=256,  # MinHash permutations; estimate std <= 0.031.
      shingle="auto",  # auto (Unicode characters, any script) | char | word | byte
      shingle_size=6,
      bands=0,  # LSH bands x rows; 0, 0 = derived from the threshold (85 x 3).
      rows=0,
      seed=0,
      processes=1,  # >1: signatures in a multiprocessing pool.
  ))
  p.quality = ml_collections.ConfigDict(dict(
      enabled=True,
      drop_fraction=0.02,  # the 2% least model-like documents.
      scorer="lmx_model",  # lmx_model (a small lmx LM, bits/byte) | char_ngram (fast)
      order=5,  # byte n-gram order (char_ngram only)
      reference="",  # '' = a hash-sample of the input itself; 'stdlib' or a corpus path
      reference_docs=500,  # documents the scorer is fitted on.
      max_chars=4000,  # characters scored per document.
      d_model=64,  # lmx_model: reference model width (multiple of 32)
      n_layers=2,  # lmx_model: blocks
      vocab_size=1024,  # lmx_model: SentencePiece pieces
      seq_len=128,  # lmx_model: training rows and scoring windows, in tokens
      batch_size=16,  # lmx_model: sequences per step
      steps=300,  # lmx_model: optimizer steps (~1 min on 2 CPU cores)
      learning_rate=3e-3,  # lmx_model: peak AdamW LR
  ))
  c.prepare = p
  return c
