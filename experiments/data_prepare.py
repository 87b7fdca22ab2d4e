"""Clean and deduplicate the embedded stdlib corpus (or any `data.corpus`).

    lmx data prepare --config=experiments/data_prepare.py
    lmx data prepare --config=experiments/data_prepare.py --config.data.corpus=/my/texts \
        --config.prepare.output_dir=data/mine --config.prepare.pii=True

Takes ~2-4 minutes on 2 CPU cores for the ~13k stdlib documents. Expect the boilerplate report
to list the PSF license / copyright header lines and the dedup report a few hundred near-
duplicate files (tests copied between packages, generated encodings tables). Train on the
result with `--config.data.corpus=data/stdlib_clean`.
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
  p.dedup = ml_collections.ConfigDict(dict(
      exact=True,
      near=True,
      threshold=0.7,  # Jaccard of 5-word shingle sets.
      num_perm=128,
      shingle="word",  # word | char
      shingle_size=5,
      seed=0,
      processes=1,  # >1: signatures in a multiprocessing pool.
  ))
  p.quality = ml_collections.ConfigDict(dict(
      enabled=True,
      drop_fraction=0.02,  # the 2% least model-like documents.
      scorer="char_ngram",  # char_ngram | lmx_model (Python API; see docs/data.md)
      order=5,
      reference_docs=500,  # evenly spaced survivors the scorer is fitted on.
      max_chars=4000,  # characters scored per document.
  ))
  c.prepare = p
  return c
