"""Build a TFDS data set (ArrayRecord, random access) from derta_jax's row files; library and CLI.

    # the paper's mixture, one TFDS config per recipe: derta_mixture/derta:1.0.0
    python -m derta_jax.data.tfds_build --triples=T.jsonl --helpful=H.jsonl --recipe=derta \\
        --seed=0 --data_dir=DIR [--num_safety=6000 --num_helpful=N] [--version=1.0.0]

    # any rows as they are (helpful and/or reference format; JSONL or Parquet; local or gs://)
    python -m derta_jax.data.tfds_build --name=my_sft --helpful=alpaca.parquet \\
        --instruction_field=prompt --output_field=completion --data_dir=DIR

Train from it with `--config.data.sources=tfds:derta_mixture/derta:train
--config.data.tfds_data_dir=DIR` (several sources with weights: see DESIGN.md, Data).

What is stored: one record per training row BEFORE any template (question, response,
prefill, prompt, rto, kind, source; tfds_format.py), so one build serves every model; the
run tokenises it once into its token cache. The records keep the rows' order (TFDS's
disableShuffling): the loader shuffles, seeded, so a TFDS run and a run from the equivalent
JSONL see the same batches. The data set's metadata holds the provenance: each input's path and
sha256, the recipe, seed, counts and notes of the mixture, rows skipped.

A recipe builds the rows with the same code as `python -m derta_jax.data.mixture`
(mixture.build_mixture_rows: same seed, same rows). Without --recipe the rows of the
--reference and --helpful files are stored as they are, streamed (a file of millions of
rows never sits in memory); Parquet columns are mapped with the same --*_field flags.

Exit status 2: one line `error: ...` naming the flag, before anything is written (a missing
input, an existing version without --overwrite, a name TFDS cannot take); 1 for bad data
(`error: FILE:LINE: field: ...`).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import sys
import uuid
from typing import Callable, Iterable, Iterator, Sequence

from derta_jax.data import formats, mixture, sources, tfds_format
from derta_jax.data.templates import TextRow

DEFAULT_NAME = "derta_mixture"
DEFAULT_VERSION = "1.0.0"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


@dataclasses.dataclass(frozen=True)
class BuildResult:
    name: str  # name[/config]:version
    directory: str
    rows: int
    provenance: dict


def dataset_dir(data_dir: str, name: str, config: str | None, version: str):
    """Where TFDS keeps data set name[/config]:version: DATA_DIR/NAME[/CONFIG]/VERSION."""
    from derta_jax import paths

    root = paths.resolve(data_dir) / name
    return (root / config if config else root) / version


def write_dataset(name: str, version: str, config: str | None, data_dir: str,
                  make_rows: Callable[[], Iterable[TextRow]], provenance: dict,
                  overwrite: bool = False, shard_rows: int = 100_000) -> BuildResult:
    """Writes the rows `make_rows()` yields as TFDS data set name[/config]:version, split
    `train`, streamed: ArrayRecord shards of `shard_rows` records (TFDS's ArrayRecord file
    adapter and its example serialisation), then TFDS's metadata (dataset_info.json with
    the split's shard lengths, features.json, metadata.json with `provenance`).

    Why not a GeneratorBasedBuilder: its writer buffers the split in memory and, past 1 GB,
    spills to temporary files through TensorFlow's gfile, so without TensorFlow it fails
    on a million-row split. This path holds one record at a time. Everything is written to
    a temporary directory beside the version and renamed into place when complete; an
    existing version is kept unless `overwrite` (FileExistsError)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import dataset_info, file_adapters, naming

    target = dataset_dir(data_dir, name, config, version)
    if (target / "dataset_info.json").exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to rebuild it, or give "
                              f"a new --version")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".incomplete-{version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        features = tfds_format.features()
        shards, num_bytes = _write_shards(staging, features, make_rows(), shard_rows,
                                          file_adapters.ArrayRecordFileAdapter)
        if not shards:
            raise ValueError(f"{name}: no rows to write")
        template = naming.ShardedFileTemplate(data_dir=staging, dataset_name=name,
                                              split="train", filetype_suffix="array_record")
        for index in range(len(shards)):
            (staging / f"part-{index:05d}").rename(
                template.sharded_filepath(shard_index=index, num_shards=len(shards)))
        provenance["rows"] = sum(shards)
        identity = dataset_info.DatasetIdentity(
            name=name, version=tfds.core.Version(version), data_dir=str(staging),
            module_name="", config_name=config,
            release_notes={version: "written by python -m derta_jax.data.tfds_build"})
        info = dataset_info.DatasetInfo(
            builder=identity, description="derta_jax training rows (before any template)",
            features=features, disable_shuffling=True,
            metadata=tfds.core.MetadataDict(provenance=provenance))
        info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
        info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
            name="train", shard_lengths=shards, num_bytes=num_bytes,
            filename_template=template)]))
        info.write_to_directory(staging)
        if target.exists():  # --overwrite: the old version goes only once the new one is whole
            old = target.parent / f".old-{version}-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            old.rmtree()
        staging.rename(target)
    finally:
        if staging.exists():
            staging.rmtree()
    full = f"{name}/{config}:{version}" if config else f"{name}:{version}"
    return BuildResult(full, str(target), sum(shards), provenance)


def _write_shards(directory, features, rows: Iterable[TextRow], shard_rows: int,
                  adapter) -> tuple[list[int], int]:
    """Serialised records into part-00000, part-00001, ... of `shard_rows` each; returns
    the shard lengths and the bytes written."""
    rows = iter(rows)
    shards, num_bytes = [], 0

    def serialized(first: TextRow):
        nonlocal num_bytes
        for count, row in enumerate(itertools.chain([first], itertools.islice(
                rows, shard_rows - 1)), start=1):
            data = features.serialize_example(tfds_format.record_of(row))
            num_bytes += len(data)
            shards[-1] = count
            yield None, data

    for first in rows:
        shards.append(0)
        adapter.write_examples(directory / f"part-{len(shards) - 1:05d}", serialized(first))
    return shards, num_bytes


def _inputs(paths_: Sequence[str]) -> list[dict]:
    return [{"path": p, "sha256": formats.file_sha256(p)} for p in paths_]


def streamed_rows(reference: Sequence[str], helpful: Sequence[str],
                  reference_fields: formats.ReferenceFields,
                  helpful_fields: formats.HelpfulFields, on_error: str,
                  skipped: list) -> Iterator[TextRow]:
    """The rows of the files as they are: reference files (in order), then helpful files."""
    for path in reference:
        yield from sources.file_rows("reference", path, on_error, skipped, reference_fields)
    for path in helpful:
        yield from sources.file_rows("helpful", path, on_error, skipped, helpful_fields)


def _define_flags():
    from absl import flags

    from derta_jax import cli_flags
    v = cli_flags.new_flag_values()
    flags.DEFINE_string("data_dir", None, "Where the TFDS data set is written (local or "
                        "gs://; default: TFDS's own, $TFDS_DATA_DIR or ~/tensorflow_datasets).",
                        flag_values=v)
    flags.DEFINE_string("name", None, f"Data set name (snake_case). Default with --recipe: "
                        f"{DEFAULT_NAME}; required without.", flag_values=v)
    flags.DEFINE_string("version", DEFAULT_VERSION, "Data set version (X.Y.Z).", flag_values=v)
    flags.DEFINE_enum("recipe", None, list(mixture.RECIPES), "Build this recipe's mixture from "
                      "--triples/--helpful (the data set's config is the recipe name).",
                      flag_values=v)
    flags.DEFINE_string("triples", None, "Triples file (JSONL or Parquet; needs --recipe).",
                        flag_values=v)
    flags.DEFINE_list("helpful", [], "Helpful files (instruction, output), comma-separated; "
                      "with --recipe exactly one.", flag_values=v)
    flags.DEFINE_list("reference", [], "Reference-format files (prefix, text, safe), "
                      "comma-separated, stored as they are (not with --recipe).", flag_values=v)
    flags.DEFINE_integer("seed", 0, "Seed of the mixture's random choices.", flag_values=v)
    flags.DEFINE_integer("num_safety", mixture.DEFAULT_NUM_SAFETY, "Safety rows of the recipe.",
                         lower_bound=0, flag_values=v)
    flags.DEFINE_integer("num_helpful", None, "Helpful rows of the recipe (default: all).",
                         lower_bound=0, flag_values=v)
    flags.DEFINE_enum("on_error", "raise", ["raise", "skip"],
                      "Bad input rows: stop, or skip and report.", flag_values=v)
    flags.DEFINE_bool("overwrite", False, "Rebuild the version if it exists.", flag_values=v)
    for fields in (formats.TripleFields(), formats.HelpfulFields(), formats.ReferenceFields()):
        for field, default in dataclasses.asdict(fields).items():
            flags.DEFINE_string(f"{field}_field", default, f"Field (JSONL) or column (Parquet) "
                                f"holding the {field}.", flag_values=v)
    return v


def _fields(FLAGS, cls):
    return cls(**{f: getattr(FLAGS, f"{f}_field") for f in dataclasses.asdict(cls())})


def _flag_problem(FLAGS) -> str | None:
    """The first flag that cannot be used, as `--flag=VALUE: what is wrong`; None if all can."""
    for flag in ("triples", "helpful", "reference"):
        value = getattr(FLAGS, flag)
        for path in ([value] if isinstance(value, str) else value or []):
            problem = formats.input_file_problem(f"--{flag}={path}", path)
            if problem:
                return problem
    if FLAGS.recipe is None:
        if FLAGS.triples:
            return f"--triples={FLAGS.triples}: needs --recipe (which mixture to build)"
        if not FLAGS.name:
            return "--name: required without --recipe (the data set's name)"
        if not (FLAGS.helpful or FLAGS.reference):
            return "--helpful/--reference: no input rows given"
    else:
        if FLAGS.reference:
            return (f"--reference={','.join(FLAGS.reference)}: not with --recipe (a recipe "
                    f"mixes --triples and --helpful)")
        if len(FLAGS.helpful) > 1:
            return f"--helpful={','.join(FLAGS.helpful)}: one file with --recipe"
        try:
            mixture.recipe_counts(FLAGS.recipe, FLAGS.num_safety)
        except ValueError as e:
            return f"--num_safety={FLAGS.num_safety}: {e}"
    name = FLAGS.name or DEFAULT_NAME
    if not _NAME.match(name):
        return f"--name={name}: must be snake_case (a-z, 0-9, _; a letter first), as TFDS names are"
    if not _VERSION.match(FLAGS.version):
        return f"--version={FLAGS.version}: must be X.Y.Z (e.g. 1.0.0)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    from derta_jax import cli_flags
    FLAGS = _define_flags()
    cli_flags.parse(sys.argv if argv is None else argv, FLAGS, doc=__doc__)
    problem = _flag_problem(FLAGS)
    if problem is not None:
        cli_flags.fail(problem)
    data_dir = FLAGS.data_dir or tfds_format.default_data_dir()
    name = FLAGS.name or DEFAULT_NAME
    config = FLAGS.recipe
    try:
        target = dataset_dir(data_dir, name, config, FLAGS.version)
        if (target / "dataset_info.json").exists() and not FLAGS.overwrite:
            cli_flags.fail(f"--data_dir={data_dir}: {target} exists; pass --overwrite to "
                           f"rebuild it, or give a new --version")
    except (ValueError, OSError, ImportError) as e:  # a scheme, filesystem package, permissions
        cli_flags.fail(f"--data_dir={data_dir}: {formats.cli_one_line(e)}")
    reference_fields = _fields(FLAGS, formats.ReferenceFields)
    helpful_fields = _fields(FLAGS, formats.HelpfulFields)
    skipped: list = []
    try:
        inputs = _inputs(([FLAGS.triples] if FLAGS.triples else []) + FLAGS.reference
                         + FLAGS.helpful)
        provenance = {"tool": "python -m derta_jax.data.tfds_build", "inputs": inputs}
        if config:
            triples = (formats.read_triples(FLAGS.triples, _fields(FLAGS, formats.TripleFields),
                                            FLAGS.on_error) if FLAGS.triples
                       else formats.ReadResult((), ()))
            helpful = (formats.read_helpful(FLAGS.helpful[0], helpful_fields, FLAGS.on_error)
                       if FLAGS.helpful else formats.ReadResult((), ()))
            skipped = list(triples.skipped + helpful.skipped)
            built = mixture.build_mixture_rows(triples.rows, helpful.rows, config,
                                               FLAGS.seed, FLAGS.num_safety,
                                               FLAGS.num_helpful)
            provenance.update(recipe=config, seed=FLAGS.seed, num_safety=FLAGS.num_safety,
                              num_helpful=FLAGS.num_helpful, counts=built.counts,
                              triple_passes=built.triple_passes, notes=list(built.notes))
            make_rows = lambda: iter(built.rows)  # noqa: E731
        else:
            provenance.update(fields={"reference": dataclasses.asdict(reference_fields),
                                      "helpful": dataclasses.asdict(helpful_fields)})

            def make_rows():
                yield from streamed_rows(FLAGS.reference, FLAGS.helpful, reference_fields,
                                         helpful_fields, FLAGS.on_error, skipped)
                provenance["skipped_rows"] = [str(row) for row in skipped]
        provenance["on_error"] = FLAGS.on_error
        provenance["skipped_rows"] = [str(row) for row in skipped]
        result = write_dataset(name, FLAGS.version, config, data_dir, make_rows, provenance,
                               FLAGS.overwrite)
    except (formats.DataError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {cli_flags.one_line(str(e))}", file=sys.stderr)
        return 1
    for row in skipped:
        print(f"skipped {row}", file=sys.stderr)
    source = f"tfds:{name}/{config}:train" if config else f"tfds:{name}:train"
    print(f"wrote {result.rows} rows as TFDS data set {result.name} to {result.directory} "
          f"(skipped input rows={len(skipped)}); train with "
          f"--config.data.sources={source} --config.data.tfds_data_dir={data_dir}")
    return 0


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
