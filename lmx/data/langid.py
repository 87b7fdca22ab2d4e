"""Language identification with py3langid (a naive-Bayes byte n-gram model shipped inside the
package: nothing is downloaded at run time).

Code is classified oddly (Python often comes out as English, sometimes as Latin or Tagalog), so
`LangIdConfig.code_extensions` marks documents by the extension in their id: those are
labelled `code` and never filtered. `keep=()` keeps every language and only routes (each output
record carries its `lang`); a non-empty `keep` drops prose in other languages.
"""

from __future__ import annotations

import dataclasses
import functools

LANGID_CHARS = 2000  # the first characters decide; enough for a stable verdict, cheap.


@dataclasses.dataclass(frozen=True)
class LangIdConfig:
  enabled: bool = True
  keep: tuple[str, ...] = ()  # ISO 639-1 codes to keep, e.g. ('en',); () keeps all.
  min_confidence: float = 0.5  # below this the label is 'und' (undetermined).
  code_extensions: tuple[str, ...] = (".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".js", ".ts",
                                      ".java", ".go", ".rs", ".sh")
  keep_undetermined: bool = True  # keep 'und' documents when `keep` is set.

  def validate(self) -> "LangIdConfig":
    if not 0.0 <= self.min_confidence <= 1.0:
      raise ValueError(f"Invalid config: `prepare.langid.min_confidence` is "
                       f"{self.min_confidence!r}; it must be in [0, 1].")
    if self.enabled and self.keep:
      labels = set(_identifier().labels)
      bad = sorted(set(self.keep) - labels)
      if bad:
        raise ValueError(f"Invalid config: `prepare.langid.keep` has unknown language "
                         f"{bad[0]!r}; valid codes are ISO 639-1 such as 'en', 'de', 'fr'.")
    return self


@functools.cache
def _identifier():
  from py3langid.langid import MODEL_FILE, LanguageIdentifier  # lazily: loading takes ~1 s
  return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str, doc_id: str, cfg: LangIdConfig) -> tuple[str, float]:
  """(language code | 'code' | 'und', confidence in [0, 1])."""
  if doc_id.lower().endswith(tuple(cfg.code_extensions)):
    return "code", 1.0
  lang, conf = _identifier().classify(text[:LANGID_CHARS])
  if conf < cfg.min_confidence:
    return "und", float(conf)
  return lang, float(conf)


def keep_language(lang: str, cfg: LangIdConfig) -> bool:
  if not cfg.keep or lang == "code":
    return True
  if lang == "und":
    return cfg.keep_undetermined
  return lang in cfg.keep
