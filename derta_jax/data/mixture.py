"""Training mixtures (the paper's recipes) from triples and helpful pairs; library and CLI.

    python -m derta_jax.data.mixture --triples=T.jsonl --helpful=H.jsonl --recipe=derta \\
        --seed=0 --out=train.jsonl [--template=reference|chat|plain --tokenizer=DIR] \\
        [--num_safety=6000 --num_helpful=N] [--question_field=... ...] [--overwrite]

Recipes (N = --num_safety, the number of safety ROWS; helpful rows are added to each):

    sft      helpful only
    vanilla  N refusal rows (q -> r)
    prefix   N/2 harmful-prefix rows (q + r̂_<k -> r)
    rto      N/2 RTO rows (q + r̂ with every position trained to say the refusal token)
    derta    N/2 RTO + N/2 harmful-prefix rows from the same N/2 triples (the paper's DeRTa)
    recaug   N harmful-prefix rows

The harmful-prefix cut is word-level: r̂_<k is r̂ up to the end of its k-th
whitespace-separated word, original spacing kept, so a cut never falls inside a word. k = 0
(no prefix) for harmful-prefix instances 0, 3, 6, ... as in the reference; otherwise k is
uniform in 1..n-2 for a response of n words (formats.py requires n >= 3).

Determinism: one `random.Random(seed)` drives every choice (which helpful rows, the order
of triples, every k), so the same inputs and seed give the same file byte for byte. Triples
are taken in a seeded order; when a recipe needs more triples than the file has, the order
is repeated (a fresh permutation each pass) and the reuse is reported, never hidden.
Output is the reference JSONL format, helpful rows first, then the safety rows in instance
order (the loader shuffles); files of the reference repository and ours are interchangeable.

Exit status: 2 for a command-line problem, one line `error: ...` naming the flag, before
anything is read or written (an unknown flag or a bad value, no --out, an input that is not
there, an --out that exists without --overwrite, a --num_safety the recipe cannot split, a
template without its --tokenizer); 1 for bad data (`error: FILE:LINE: field: what is wrong`).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import sys
import tempfile
from typing import Sequence

from derta_jax.data import formats
from derta_jax.paths import check_output_file
from derta_jax.data.templates import (Example, Template, TextRow, make_template,
                                      render_row)

RECIPES = ("sft", "vanilla", "prefix", "rto", "derta", "recaug")
DEFAULT_NUM_SAFETY = 6000
_WORD = re.compile(r"\S+")


@dataclasses.dataclass(frozen=True)
class RecipeCounts:
    refusal: int = 0
    harmful_prefix: int = 0
    rto: int = 0
    triples: int = 0  # distinct instances drawn (the same triple feeds its RTO and prefix rows)


def recipe_counts(recipe: str, num_safety: int) -> RecipeCounts:
    """How many rows of each safety kind `recipe` makes for `num_safety` safety rows."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if num_safety < 0:
        raise ValueError(f"num_safety must be >= 0, got {num_safety}")
    if recipe in ("prefix", "rto", "derta") and num_safety % 2:
        raise ValueError(f"num_safety must be even for recipe {recipe!r} (N/2 rows per "
                         f"safety kind), got {num_safety}")
    half = num_safety // 2
    return {
        "sft": RecipeCounts(),
        "vanilla": RecipeCounts(refusal=num_safety, triples=num_safety),
        "prefix": RecipeCounts(harmful_prefix=half, triples=half),
        "rto": RecipeCounts(rto=half, triples=half),
        "derta": RecipeCounts(harmful_prefix=half, rto=half, triples=half),
        "recaug": RecipeCounts(harmful_prefix=num_safety, triples=num_safety),
    }[recipe]


def word_prefix(text: str, k: int) -> str:
    """`text` up to the end of its k-th whitespace-separated word ("" for k = 0)."""
    if k == 0:
        return ""
    ends = [m.end() for m in _WORD.finditer(text)]
    if not 0 < k <= len(ends):
        raise ValueError(f"k={k} is outside 0..{len(ends)} (the number of words)")
    return text[:ends[k - 1]]


def draw_cut(rng: random.Random, instance: int, num_words: int) -> int:
    """k for harmful-prefix instance `instance`: 0 for every third, else uniform in 1..n-2."""
    if instance % 3 == 0:
        return 0
    if num_words < formats.MIN_HARMFUL_WORDS:
        raise ValueError(f"a harmful response of {num_words} words cannot be cut "
                         f"(needs at least {formats.MIN_HARMFUL_WORDS})")
    return rng.randint(1, num_words - 2)


@dataclasses.dataclass(frozen=True)
class MixtureRows:
    rows: tuple[TextRow, ...]  # before any template: what a TFDS mixture stores
    counts: dict  # kind -> rows
    triple_passes: int  # 1 when no triple was used twice; >1 means triples were reused
    notes: tuple[str, ...]  # human-readable facts about the build (reuse, subsets)


@dataclasses.dataclass(frozen=True)
class Mixture:
    examples: tuple[Example, ...]
    counts: dict  # kind -> rows
    triple_passes: int  # 1 when no triple was used twice; >1 means triples were reused
    notes: tuple[str, ...]  # human-readable facts about the build (reuse, subsets)


def _seeded_order(rng: random.Random, size: int, needed: int) -> list[int]:
    order: list[int] = []
    while len(order) < needed:
        block = list(range(size))
        rng.shuffle(block)
        order.extend(block)
    return order[:needed]


def build_mixture_rows(triples: Sequence[formats.TripleRow],
                       helpful: Sequence[formats.HelpfulRow], recipe: str, seed: int,
                       num_safety: int = DEFAULT_NUM_SAFETY,
                       num_helpful: int | None = None) -> MixtureRows:
    """The recipe's rows, template-free: helpful rows (file order), then safety rows in
    instance order. Every random choice comes from `seed`, none from the template."""
    counts = recipe_counts(recipe, num_safety)
    rng = random.Random(seed)
    notes = []
    if num_helpful is None:
        num_helpful = len(helpful)
    if not 0 <= num_helpful <= len(helpful):
        raise ValueError(f"num_helpful={num_helpful} but the helpful file has {len(helpful)} rows")
    if num_helpful < len(helpful):
        notes.append(f"{num_helpful} of {len(helpful)} helpful rows (seeded sample)")
    chosen_helpful = sorted(rng.sample(range(len(helpful)), num_helpful))
    rows = [TextRow(helpful[i].instruction, helpful[i].output, kind="helpful",
                    source=helpful[i].source) for i in chosen_helpful]

    if counts.triples and not triples:
        raise ValueError(f"recipe {recipe!r} needs triples (--triples) for {num_safety} safety rows")
    order = _seeded_order(rng, len(triples), counts.triples) if counts.triples else []
    passes = -(-len(order) // len(triples)) if order else 0
    if passes > 1:
        notes.append(f"recipe {recipe!r} needs {counts.triples} triples but the file has "
                     f"{len(triples)}: triples reused ({passes} seeded passes)")
    prefix_instance = 0
    for index in order:
        row = triples[index]
        if counts.refusal:
            rows.append(TextRow(row.question, row.safe_response, kind="refusal",
                                source=row.source))
        if counts.rto:
            rows.append(TextRow(row.question, row.harmful_response, rto=True, kind="rto",
                                source=row.source))
        if counts.harmful_prefix:
            words = len(row.harmful_response.split())
            k = draw_cut(rng, prefix_instance, words)
            prefix_instance += 1
            rows.append(TextRow(row.question, row.safe_response,
                                prefill=word_prefix(row.harmful_response, k),
                                kind="harmful_prefix", source=row.source))
    if not rows:
        raise ValueError(f"recipe {recipe!r} with num_safety={num_safety} and "
                         f"{num_helpful} helpful rows gives an empty mixture (--helpful missing?)")
    kinds: dict[str, int] = {}
    for row in rows:
        kinds[row.kind] = kinds.get(row.kind, 0) + 1
    return MixtureRows(tuple(rows), kinds, max(passes, 1), tuple(notes))


def build_mixture(triples: Sequence[formats.TripleRow], helpful: Sequence[formats.HelpfulRow],
                  recipe: str, seed: int, template: Template,
                  num_safety: int = DEFAULT_NUM_SAFETY, num_helpful: int | None = None) -> Mixture:
    """The recipe's examples under `template` (build_mixture_rows, rendered)."""
    built = build_mixture_rows(triples, helpful, recipe, seed, num_safety, num_helpful)
    examples = tuple(render_row(row, template, "") for row in built.rows)
    return Mixture(examples, built.counts, built.triple_passes, built.notes)


def example_to_reference_row(example: Example) -> formats.ReferenceRow:
    return formats.ReferenceRow(prefix=example.prompt, text=example.response,
                                safe=example.rto, source=example.source)


def write_reference_jsonl(examples: Sequence[Example], path: str, overwrite: bool = False,
                          fields: formats.ReferenceFields = formats.ReferenceFields()) -> None:
    """Writes the reference format atomically; refuses to replace a file unless `overwrite`."""
    check_output_file(path, overwrite)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".mixture-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for example in examples:
                f.write(formats.reference_row_to_json(example_to_reference_row(example), fields))
                f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _define_flags():
    """The command's flags: a fresh set per call (cli_flags.new_flag_values), so that main
    runs more than once in a process."""
    from absl import flags

    from derta_jax import cli_flags
    v = cli_flags.new_flag_values()
    flags.DEFINE_string("triples", None, "Triples JSONL (question, safe_response, harmful_response).",
                        flag_values=v)
    flags.DEFINE_string("helpful", None, "Helpful JSONL (instruction, output).", flag_values=v)
    flags.DEFINE_enum("recipe", "derta", list(RECIPES), "Which mixture to build.", flag_values=v)
    flags.DEFINE_integer("seed", 0, "Seed for every random choice.", flag_values=v)
    flags.DEFINE_string("out", None, "Output JSONL (reference format); required.", flag_values=v)
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.", flag_values=v)
    flags.DEFINE_enum("template", "reference", ["reference", "chat", "plain"], "Prompt format.",
                      flag_values=v)
    flags.DEFINE_string("tokenizer", None, "Tokenizer directory (needed by chat and plain; "
                        "gives reference its EOS, else the reference's <|end_of_text|>).",
                        flag_values=v)
    flags.DEFINE_string("plain_prefix", "", "plain template: text before the question.",
                        flag_values=v)
    flags.DEFINE_string("plain_suffix", "\n", "plain template: text after the question.",
                        flag_values=v)
    flags.DEFINE_string("system", None, "chat template: optional system message.", flag_values=v)
    flags.DEFINE_integer("num_safety", DEFAULT_NUM_SAFETY, "Number of safety rows.",
                         lower_bound=0, flag_values=v)
    flags.DEFINE_integer("num_helpful", None, "Number of helpful rows (default: all).",
                         lower_bound=0, flag_values=v)
    flags.DEFINE_enum("on_error", "raise", ["raise", "skip"],
                      "Bad input rows: stop, or skip and report.", flag_values=v)
    for field, default in dataclasses.asdict(formats.TripleFields()).items():
        flags.DEFINE_string(f"{field}_field", default, f"Triples field holding the {field}.",
                            flag_values=v)
    for field, default in dataclasses.asdict(formats.HelpfulFields()).items():
        flags.DEFINE_string(f"{field}_field", default, f"Helpful field holding the {field}.",
                            flag_values=v)
    return v


def _flag_problem(FLAGS) -> str | None:
    """The first flag on the command line that cannot be used (an input or output path, a
    --num_safety the recipe cannot split), as `--flag=VALUE: what is wrong`; None when all can."""
    for flag in ("triples", "helpful"):
        path = getattr(FLAGS, flag)
        problem = path and formats.input_file_problem(f"--{flag}={path}", path)
        if problem:
            return problem
    if os.path.isdir(FLAGS.out):
        return f"--out={FLAGS.out}: is a directory, not a file"
    directory = os.path.dirname(os.path.abspath(FLAGS.out))
    if not os.path.isdir(directory):
        return f"--out={FLAGS.out}: directory {directory} does not exist"
    if os.path.exists(FLAGS.out) and not FLAGS.overwrite:
        return f"--out={FLAGS.out}: exists; pass --overwrite to replace it"
    try:
        recipe_counts(FLAGS.recipe, FLAGS.num_safety)
    except ValueError as e:
        return f"--num_safety={FLAGS.num_safety}: {e}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The command (argv: the program name first; sys.argv when None). A bad command line
    exits (SystemExit) with status 2 and one line `error: ...`, nothing read or written; bad
    data returns 1 with `error: FILE:LINE: field: ...`."""
    from derta_jax import cli_flags
    FLAGS = _define_flags()
    cli_flags.parse(sys.argv if argv is None else argv, FLAGS, required=("out",), doc=__doc__)
    problem = _flag_problem(FLAGS)
    tokenizer = template = None
    if problem is None and FLAGS.tokenizer:
        tokenizer, problem = formats.load_tokenizer_flag(FLAGS.tokenizer)
    if problem is None:
        try:
            template = make_template(FLAGS.template, tokenizer, plain_prefix=FLAGS.plain_prefix,
                                     plain_suffix=FLAGS.plain_suffix, system=FLAGS.system)
        except ValueError as e:  # chat or plain without --tokenizer
            problem = f"--template={FLAGS.template}: {e}"
    if problem is not None:  # the command line's to fix: exit status 2, nothing written
        cli_flags.fail(problem)
    try:
        triple_fields = formats.TripleFields(**{f: getattr(FLAGS, f"{f}_field") for f in
                                                dataclasses.asdict(formats.TripleFields())})
        helpful_fields = formats.HelpfulFields(**{f: getattr(FLAGS, f"{f}_field") for f in
                                                  dataclasses.asdict(formats.HelpfulFields())})
        triples = (formats.read_triples(FLAGS.triples, triple_fields, FLAGS.on_error)
                   if FLAGS.triples else formats.ReadResult((), ()))
        helpful = (formats.read_helpful(FLAGS.helpful, helpful_fields, FLAGS.on_error)
                   if FLAGS.helpful else formats.ReadResult((), ()))
        for skipped in triples.skipped + helpful.skipped:
            print(f"skipped {skipped}", file=sys.stderr)
        mixture = build_mixture(triples.rows, helpful.rows, FLAGS.recipe, FLAGS.seed, template,
                                FLAGS.num_safety, FLAGS.num_helpful)
        write_reference_jsonl(mixture.examples, FLAGS.out, FLAGS.overwrite)
    except (formats.DataError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {cli_flags.one_line(str(e))}", file=sys.stderr)
        return 1
    for note in mixture.notes:
        print(f"note: {note}", file=sys.stderr)
    skipped = len(triples.skipped) + len(helpful.skipped)
    summary = ", ".join(f"{kind}={n}" for kind, n in sorted(mixture.counts.items()))
    print(f"wrote {len(mixture.examples)} rows to {FLAGS.out} (recipe={FLAGS.recipe}, "
          f"seed={FLAGS.seed}, template={FLAGS.template}; {summary}; skipped input rows={skipped})")
    return 0


def cli() -> None:
    """The console-script entry point (pyproject [project.scripts]), = python -m."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
