"""From the `data` section of a config to a DataPipeline: tokenizer, examples, token cache.

Sources, any combination:
  - data.train_files: reference-format JSONL (prefix/text/safe), used as written;
  - data.triples (+ data.helpful): a mixture built on the fly with the config's template;
  - data.synthetic: the project's own synthetic safety world (tiny runs, no download),
    with a small BPE tokenizer trained on it and saved in the workdir;
  - data.sources: named sources (TFDS data sets in data.tfds_data_dir, JSONL/Parquet files,
    local or gs://), optionally with mixing weights (data/sources.py).
Rows are tokenised once into a cache keyed by everything that changes the tokens: the
fields above share one cache, each data.sources entry has its own (streamed, so a source of
millions of rows never sits in memory), and the loader reads them as one row space.
Nothing is dropped silently: skipped and truncated rows go to workdir/data_report.json.

Remote workdirs (gs://...): the token cache is memory-mapped and tokenizers load from local
files, so the cache then defaults to a local directory (content-keyed, shared by runs) and
the trained tokenizer is saved locally and copied to / from WORKDIR/tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import ml_collections

from derta_jax.data import (formats, mixture, sources, synthetic, templates, tfds_format,
                            tokenize)
from derta_jax.data.pipeline import ConcatRows, DataPipeline, LoaderConfig, Mixing
from derta_jax.data.token_cache import load_or_build_cache
from derta_jax.data.tokenizer_builder import build_bpe_tokenizer, load_tokenizer, save_tokenizer
from derta_jax import paths
from derta_jax.train.config import ConfigError

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass
class TrainingData:
    pipeline: DataPipeline
    tokenizer: Any
    tokenizer_dir: str
    refusal_id: int
    report: dict


def _synthetic_world(config: ml_collections.ConfigDict) -> synthetic.World:
    d = config.data
    return synthetic.generate_world(config.seed, num_triples=d.synthetic_triples,
                                    num_helpful=d.synthetic_helpful)


def local_cache_root(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> str:
    """data.cache_dir, else <workdir>/cache for a local workdir, else a local temp directory."""
    d = config.data
    if d.cache_dir:
        if paths.is_remote(d.cache_dir):
            raise ConfigError(f"data.cache_dir={d.cache_dir!r}: must be a local path (the token "
                              f"cache is memory-mapped)")
        return d.cache_dir
    if paths.is_remote(workdir):
        return os.path.join(tempfile.gettempdir(), "derta_jax", "token_cache")
    return os.fspath(paths.resolve(workdir) / "cache")


def load_or_train_tokenizer(config: ml_collections.ConfigDict,
                            workdir: paths.PathLike) -> tuple[Any, str]:
    """The run's tokenizer and the LOCAL directory it lives in (copied into exports)."""
    d = config.data
    if d.synthetic and not d.tokenizer:
        stored = paths.resolve(workdir) / TOKENIZER_DIR
        remote = paths.is_remote(stored)
        directory = tempfile.mkdtemp(prefix="derta_jax_tokenizer_") if remote else os.fspath(stored)
        if (stored / "tokenizer.json").is_file():  # a resumed run keeps its tokenizer
            if remote:
                paths.copy_tree(stored, directory)
            return load_tokenizer(directory), directory
        world = _synthetic_world(config)
        required = synthetic.single_token_strings()
        # BPE may add the required words on top of its trained vocabulary: leave them room.
        tok = build_bpe_tokenizer(synthetic.training_texts(world),
                                  vocab_size=config.model.vocab_size - len(required),
                                  required_words=required)
        save_tokenizer(tok, directory)
        if remote:
            paths.copy_tree(directory, stored)
        return tok, directory
    directory, field = d.tokenizer, "data.tokenizer"
    if not directory and config.model.init_from:  # the tokenizer a workdir keeps in hf_files/
        from derta_jax import workdir as wd

        source, _ = wd.split_checkpoint_path(config.model.init_from)
        directory, field = wd.hf_files_path(source), "model.init_from"
        if paths.is_remote(directory):
            local = tempfile.mkdtemp(prefix="derta_jax_tokenizer_")
            paths.copy_tree(directory, local)
            directory = local
    elif not directory:
        directory, field = config.model.hf_dir, "model.hf_dir"
    if not directory:
        raise ConfigError(f"data.tokenizer={d.tokenizer!r}: no tokenizer; set data.tokenizer=DIR "
                          f"or model.hf_dir=DIR or model.init_from=WORKDIR")
    try:
        return load_tokenizer(directory), directory
    except (OSError, ValueError) as err:  # a missing directory, or one without a tokenizer
        raise ConfigError(f"{field}={directory!r}: no tokenizer there "
                          f"({(str(err).splitlines() or [type(err).__name__])[0]})") from None


def _examples(config: ml_collections.ConfigDict, tokenizer: Any,
              template: templates.Template) -> tuple[list, list[str], list]:
    """All training examples, notes about how they were built, and skipped rows."""
    d = config.data
    examples, notes, skipped = [], [], []
    for path in [p for p in d.train_files.split(",") if p.strip()]:
        result = formats.read_reference(path.strip(), on_error=d.on_error)
        skipped.extend(result.skipped)
        eos = tokenizer.eos_token
        examples.extend(templates.example_from_reference_row(row, eos) for row in result.rows)
        notes.append(f"{path}: {len(result.rows)} reference rows")
    triples, helpful = [], []
    if d.triples:
        result = formats.read_triples(d.triples, on_error=d.on_error)
        triples, skipped = list(result.rows), skipped + list(result.skipped)
    if d.helpful:
        result = formats.read_helpful(d.helpful, on_error=d.on_error)
        helpful, skipped = list(result.rows), skipped + list(result.skipped)
    if d.synthetic:
        world = _synthetic_world(config)
        triples += [formats.TripleRow(r["question"], r["safe_response"], r["harmful_response"],
                                      f"synthetic:triples:{i + 1}")
                    for i, r in enumerate(world.rows["triples"])]
        helpful += [formats.HelpfulRow(r["instruction"], r["output"], f"synthetic:helpful:{i + 1}")
                    for i, r in enumerate(world.rows["helpful"])]
    if triples or helpful:
        built = mixture.build_mixture(triples, helpful, d.recipe, config.seed, template,
                                      num_safety=d.num_safety,
                                      num_helpful=None if d.num_helpful < 0 else d.num_helpful)
        examples.extend(built.examples)
        notes.append(f"mixture {d.recipe!r}: {built.counts}")
        notes.extend(built.notes)
    if not examples:
        raise ConfigError("data: no training examples (check data.train_files / triples / helpful)")
    return examples, notes, skipped


def _examples_hash(examples) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.prompt, e.response, e.rto, e.kind]).encode("utf-8"))
    return digest.hexdigest()[:16]


def has_inline_data(config: ml_collections.ConfigDict) -> bool:
    """Data given by the fields before data.sources (files, an on-the-fly mixture, synthetic)."""
    d = config.data
    return bool(d.train_files or d.triples or d.helpful or d.synthetic)


def source_specs(config: ml_collections.ConfigDict) -> list[sources.SourceSpec]:
    """data.sources parsed (config.validate has checked them: a ConfigError here too)."""
    try:
        return sources.parse_sources(config.data.sources)
    except sources.SourceError as e:
        raise ConfigError(str(e)) from None


def _source_cache(spec: sources.SourceSpec, config: ml_collections.ConfigDict, tokenizer: Any,
                  template: templates.Template, refusal_id: int, base_key: str,
                  cache_root: str) -> tuple[Any, list, list]:
    """One data.sources entry tokenised into its own cache (built at most once per key);
    returns the cache, its tokenisation reports (empty on a cache hit) and skipped rows."""
    d = config.data
    try:
        opened = sources.open_source(spec, d.tfds_data_dir or tfds_format.default_data_dir(),
                                     d.on_error)
    except sources.SourceError as e:
        raise ConfigError(str(e)) from None
    reports = []
    eos = tokenizer.eos_token

    def make_rows():
        report = tokenize.TokenizeReport()
        reports.append(report)
        examples = (templates.render_row(row, template, eos) for row in opened.rows())
        return tokenize.iter_tokenized(examples, tokenizer, refusal_id, d.max_length, report,
                                       on_error=d.on_error)

    cache = load_or_build_cache(cache_root, f"{base_key}-source-{opened.fingerprint[:40]}",
                                make_rows)
    if len(cache) == 0:
        raise ConfigError(f"data.sources entry {spec.text!r}: no rows")
    return cache, reports, opened.skipped


def build_training_data(config: ml_collections.ConfigDict, workdir: paths.PathLike, *,
                        process_index: int, process_count: int) -> TrainingData:
    d = config.data
    specs = source_specs(config)
    tokenizer, tokenizer_dir = load_or_train_tokenizer(config, workdir)
    refusal_id = tokenize.refusal_token_id(tokenizer, d.refusal_string)
    template = templates.make_template(d.template, tokenizer, plain_prefix=d.plain_prefix,
                                       plain_suffix=d.plain_suffix)
    base_key = tokenize.cache_key(tokenizer, template, d.max_length, refusal_id)
    cache_root = local_cache_root(config, workdir)
    caches, reports, notes, skipped, examples_count = [], [], [], [], 0
    if has_inline_data(config) or not specs:
        examples, notes, skipped = _examples(config, tokenizer, template)
        examples_count = len(examples)

        def make_rows():
            rows, report = tokenize.tokenize_examples(examples, tokenizer, refusal_id,
                                                      d.max_length, on_error=d.on_error)
            reports.append(report)
            return rows

        caches.append(load_or_build_cache(cache_root, f"{base_key}-data{_examples_hash(examples)}",
                                          make_rows))
    for spec in specs:
        cache, built, bad = _source_cache(spec, config, tokenizer, template, refusal_id,
                                          base_key, cache_root)
        caches.append(cache)
        reports += built
        skipped += bad
        examples_count += len(cache) + len(bad) + sum(len(r.skipped) for r in built)
        notes.append(f"{spec.label}: {len(cache)} rows"
                     + (f", weight {spec.weight:g}" if spec.weight is not None else ""))
    mixing = None
    if specs and specs[0].weight is not None:
        mixing = Mixing(tuple(len(c) for c in caches), tuple(s.weight for s in specs),
                        d.mixture_epoch).validate()
    source = caches[0] if len(caches) == 1 else ConcatRows(caches)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = LoaderConfig(seq_len=d.max_length, global_batch_size=config.train.batch_size,
                          num_epochs=max(config.train.num_epochs, 1), seed=d.shuffle_seed,
                          packing=d.packing, pad_id=int(pad_id))
    pipeline = DataPipeline(source, loader, process_index=process_index,
                            process_count=process_count, mixing=mixing)
    report = {"examples": examples_count, "rows": len(source), "notes": notes,
              "skipped_rows": [dataclasses.asdict(s) for s in skipped],
              "refusal_id": refusal_id, "refusal_string": d.refusal_string,
              "steps_per_epoch": list(pipeline.steps_per_epoch),
              "non_pad_fraction": pipeline.non_pad_fraction}
    if reports:  # built now (not read from cache): truncation facts are fresh
        report["truncated_rows"] = [source for r in reports for source in r.truncated]
        report["skipped_rows"] += [dataclasses.asdict(s) for r in reports for s in r.skipped]
    for s in report["skipped_rows"]:
        log.warning("skipped row %s: %s", s.get("source"), s.get("reason"))
    return TrainingData(pipeline, tokenizer, tokenizer_dir, refusal_id, report)
