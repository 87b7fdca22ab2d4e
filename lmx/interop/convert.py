"""`lmx convert`: Hugging Face directories <-> lmx run directories.

    lmx convert --from_hf HF_DIR --to RUN_DIR      # import
    lmx convert --from RUN_DIR --to_hf HF_DIR [--config=EXPERIMENT] [--config.x.y=v ...]

Import writes the weights as the Orbax checkpoint lmx's own runs end with
(RUN_DIR/best/0/params, what `train.init_from` and `lmx generate/evaluate` read), copies the
HF tokenizer files to RUN_DIR/hf_tokenizer/, and writes RUN_DIR/experiment.py: a pure
`get_config` with the imported model shape, so that

    lmx generate --config=RUN_DIR/experiment.py --prompt '...'
    lmx evaluate --config=RUN_DIR/experiment.py
    lmx train --config=RUN_DIR/experiment.py --config.train.init_from=RUN_DIR \\
        --config.run_dir=runs/finetune --config.data.corpus=...

work. An MoE run (`model.moe`) is exported as Mixtral where its settings allow (see
lmx.interop.hf_config.arch_of); a capacity run (capacity_factor > 0) as its dropless twin,
which the printed summary notes. A LoRA / QLoRA run is exported merged (its base from
`train.init_from` plus (alpha/r) A B); other PEFT methods are refused. Export needs the
run's experiment: without --config it is the one the run recorded (RUN_DIR/config.json,
written by `lmx train`, or RUN_DIR/experiment.py from an import), with any --config.x=v
overrides applied on top.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from lmx.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "config.json", "generation_config.json")
TOKENIZER_DIR = "hf_tokenizer"
_SKIP_FIELDS = ("dtype", "moe")  # dtype follows train.precision; moe is a section of its own


def experiment_source(cfg: ModelConfig, run_dir: str, tokenizer_path: str, source: str) -> str:
  """The text of RUN_DIR/experiment.py for an imported model."""
  fields = [f for f in dataclasses.fields(cfg) if f.name not in _SKIP_FIELDS]
  model_lines = "\n".join(f"  c.model.{f.name} = {getattr(cfg, f.name)!r}" for f in fields)
  if cfg.moe.num_experts:  # Mixtral
    model_lines += "\n" + "\n".join(f"  c.model.moe.{f.name} = {getattr(cfg.moe, f.name)!r}"
                                    for f in dataclasses.fields(cfg.moe))
  tok_note = ("  # The Hugging Face tokenizer, copied beside the weights "
              "(lmx.interop.hf_tokenizer)."
              if tokenizer_path else
              "  # NOTE: the Hugging Face directory had no tokenizer, so lmx trains one for\n"
              "  # data.corpus: its ids do not mean what the imported embedding learned.")
  return f'''"""{cfg.n_layers}-layer model imported from Hugging Face by `lmx convert`.

Source: {source}

    lmx generate --config={run_dir}/experiment.py --prompt 'def '
    lmx evaluate --config={run_dir}/experiment.py
    lmx train --config={run_dir}/experiment.py --config.train.init_from={run_dir} \\\\
        --config.run_dir=runs/finetune
"""

from lmx.config import base_config


def get_config(arg: str | None = None):
  """The imported model's shape; run_dir holds its weights (best/0/params)."""
  del arg
  c = base_config()
{model_lines}
  c.train.precision = {cfg.dtype!r}  # the compute dtype (model.dtype follows it)
{tok_note}
  c.data.tokenizer_path = {tokenizer_path!r}
  c.data.seq_len = {min(256, cfg.max_seq_len)!r}  # training window (<= model.max_seq_len)
  c.run_dir = {run_dir!r}
  c.name = {pathlib.Path(run_dir).name!r}
  return c
'''


def import_hf(hf_dir: str, run_dir: str, dtype: str | None = None) -> dict:
  """HF directory -> lmx run directory (see the module docstring). Returns a summary."""
  from lmx.config import CheckpointConfig
  from lmx.interop.hf import from_pretrained, load_tokenizer
  from lmx.train.checkpoint import Checkpointer
  src, run = pathlib.Path(hf_dir).absolute(), pathlib.Path(run_dir).absolute()
  model, cfg = from_pretrained(src, dtype=dtype)
  tok_path = ""
  if (src / "tokenizer.model").exists() or (src / "tokenizer.json").exists():
    tok_dir = run / TOKENIZER_DIR
    tok_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
      if (src / name).exists():
        shutil.copyfile(src / name, tok_dir / name)
    tok = load_tokenizer(tok_dir)
    if tok.vocab_size > cfg.vocab_size:
      raise ValueError(f"the tokenizer in {src} has {tok.vocab_size} ids but the model's "
                       f"vocab_size is {cfg.vocab_size}.")
    tok_path = str(tok_dir)
  if (run / "best").exists() or (run / "checkpoints").exists():
    raise FileExistsError(f"{run} already holds checkpoints; convert into a new directory.")
  ckpt = Checkpointer(run, CheckpointConfig(async_save=False))
  # val_loss unknown: +inf, so any evaluated step of a run in this directory replaces it.
  ckpt.save_best(0, nnx.state(model, nnx.Param), float("inf"))
  ckpt.wait()
  ckpt.close()
  (run / "experiment.py").write_text(experiment_source(cfg, str(run), tok_path, str(src)))
  return {"run_dir": str(run), "experiment": str(run / "experiment.py"),
          "tokenizer": tok_path or None,
          "params": int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))}


def _plain(tree):
  """An Orbax-restored tree -> nested dicts of numpy arrays (drops {'value': x} wrappers)."""
  if isinstance(tree, dict):
    if set(tree) == {"value"}:
      return _plain(tree["value"])
    return {k: _plain(v) for k, v in tree.items()}
  return np.asarray(tree)


def export_hf(run_dir: str, hf_dir: str, exp, *, dtype: str = "float32",
              max_shard_bytes: int = 0, tokenizer: bool = True) -> dict:
  """lmx run directory (+ its experiment) -> HF directory transformers loads."""
  from lmx.interop.hf import UnsupportedModel, assign_params, to_pretrained
  from lmx.model.transformer import Transformer
  from lmx.train.init_from import read_params
  cfg = exp.model
  if exp.peft.method in ("lora", "qlora"):  # base (train.init_from) + adapters, merged
    from lmx.peft import merge_lora
    from lmx.train.checkpoint import restore_params
    model = Transformer(cfg, rngs=nnx.Rngs(exp.seed))
    source = restore_params(exp, model, directory=run_dir)["source"]
    merge_lora(model)
  elif exp.peft.method:
    raise UnsupportedModel(f"the run trained peft.method={exp.peft.method!r} modules, which "
                           "neither a LLaMA nor a GPT-2 checkpoint can hold (LoRA and QLoRA "
                           "runs are merged into the base and exported).")
  else:
    tree, source = read_params(run_dir)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    assign_params(model, _plain(tree))  # checks every tensor's name and shape against cfg
  out = pathlib.Path(hf_dir)
  files = to_pretrained(model, cfg, out, dtype=dtype, max_shard_bytes=max_shard_bytes)
  if tokenizer:
    files += _export_tokenizer(exp, out)
  summary = {"source": source, "hf_dir": str(out), "files": files}
  if cfg.moe.num_experts and cfg.moe.capacity_factor:
    summary["note"] = (f"model.moe.capacity_factor={cfg.moe.capacity_factor} is exported as "
                       "dropless Mixtral (what lmx decodes with); training-time forward passes "
                       "that dropped tokens differ.")
  return summary


def _export_tokenizer(exp, out: pathlib.Path) -> list[str]:
  """Copy the run's tokenizer: an HF tokenizer directory's files, or lmx's SentencePiece
  model as tokenizer.model (read back exactly by lmx.interop.hf.load_tokenizer)."""
  path = exp.data.tokenizer_path
  if path and pathlib.Path(path).is_dir():
    names = [n for n in TOKENIZER_FILES if n != "config.json" and (pathlib.Path(path) / n).exists()]
    for n in names:
      shutil.copyfile(pathlib.Path(path) / n, out / n)
    return names
  from lmx.data.tokenizer import load_or_train_tokenizer
  tok = load_or_train_tokenizer(exp)
  if not hasattr(tok, "model_proto"):
    return []
  (out / "tokenizer.model").write_bytes(tok.model_proto)
  return ["tokenizer.model"]


def cli_main(argv: Sequence[str]) -> int:
  """`lmx convert --from_hf HF_DIR --to RUN_DIR [--dtype D]` or `lmx convert --from RUN_DIR
  --to_hf HF_DIR [--config=EXPERIMENT ...] [--dtype D] [--max_shard_mb N] [--no_tokenizer]`;
  prints one JSON line describing what was written."""
  from lmx.experiment import split_config_args
  cfg_args, rest = split_config_args(argv)
  p = argparse.ArgumentParser(prog="lmx convert", description=cli_main.__doc__)
  p.add_argument("--from_hf", help="Hugging Face model directory to import")
  p.add_argument("--to", help="run directory to create (with --from_hf)")
  p.add_argument("--from", dest="from_run", help="lmx run directory to export")
  p.add_argument("--to_hf", help="Hugging Face directory to write (with --from)")
  p.add_argument("--dtype", default=None,
                 help="import: compute dtype of the experiment (float32 | bfloat16 | float16, "
                      "default float32); export: stored dtype (default float32)")
  p.add_argument("--max_shard_mb", type=float, default=0,
                 help="export: shard model.safetensors above this size (0: one file)")
  p.add_argument("--no_tokenizer", action="store_true", help="export: weights only")
  args = p.parse_args(rest)
  if bool(args.from_hf) == bool(args.from_run):
    p.error("give either --from_hf DIR --to RUN_DIR or --from RUN_DIR --to_hf DIR")
  if args.dtype not in (None, "float32", "bfloat16", "float16"):
    p.error(f"--dtype is {args.dtype!r}; it must be float32, bfloat16 or float16")
  try:
    out = _run(p, args, cfg_args)
  except (ValueError, FileExistsError) as e:  # TensorError, UnsupportedModel: one sentence
    print(f"lmx convert: {e}", file=sys.stderr)
    return 2
  print(json.dumps(out))
  return 0


def _run(p: argparse.ArgumentParser, args, cfg_args: list[str]) -> dict:
  from lmx.experiment import load_experiment, recorded_config_dict
  if args.from_hf:
    if not args.to:
      p.error("--from_hf needs --to RUN_DIR")
    return import_hf(args.from_hf, args.to, args.dtype)
  if not args.to_hf:
    p.error("--from needs --to_hf DIR")
  if not any(a.startswith(("--config=", "--run=")) for a in cfg_args):  # the run's record
    if recorded_config_dict(args.from_run) is None:
      p.error(f"{args.from_run} has no experiment.py or config.json (lmx train writes it); "
              "pass --config=EXPERIMENT with the overrides the run was trained with")
    cfg_args = [f"--run={args.from_run}", *cfg_args]  # overrides apply on top
  exp, _ = load_experiment(cfg_args)
  return export_hf(args.from_run, args.to_hf, exp, dtype=args.dtype or "float32",
                   max_shard_bytes=int(args.max_shard_mb * 2**20),
                   tokenizer=not args.no_tokenizer)


if __name__ == "__main__":
  sys.exit(cli_main(sys.argv[1:]))
