"""Command lines of the absl-flag commands, with every bad one reported as ONE line.

The project's rule for bad input: one line `error: ...` on stderr naming the flag, exit
status 2, nothing written. absl's own parsing breaks it (`FATAL Flags parsing error: ...`,
a second line about --helpshort, exit status 1; a main raising app.UsageError prints the
whole module docstring), so the commands parse with `parse` here instead:

    app.run(main, flags_parser=lambda argv: cli_flags.parse(argv, required=("config",)))

or, for a command with its own set of flags (`new_flag_values`: not absl's global FLAGS, so
that two commands defining the same names can run in one process, the tests included):

    values = cli_flags.new_flag_values()
    flags.DEFINE_string("out", None, "...", flag_values=values)
    args = cli_flags.parse(argv, values, required=("out",), positional=("FILE",), doc=__doc__)

Messages read `--flag=VALUE: what is wrong` (`--num_safety=abc: expected an integer`,
`--bogus: unknown flag`, `--out: required, not given (see --help)`), like the data
commands' own `--triples=PATH: no such file`.
"""

from __future__ import annotations

import re
import sys
from typing import NoReturn, Sequence

from absl import flags

USAGE_STATUS = 2  # a command line's to fix (1 is left to the commands: bad data, a failed run)

# Python's wording for a value that does not convert, as absl passes it on
_CONVERSION_ERRORS = (
    (re.compile(r"\('Non-boolean argument to boolean flag', .*\)$", re.S), "expected true or false"),
    (re.compile(r"invalid literal for int\(\) with base \d+: .*$", re.S), "expected an integer"),
    (re.compile(r"could not convert string to float: .*$", re.S), "expected a number"),
)


def one_line(text: str) -> str:
    """`text` with its lines joined by '; ' (a library's message may run to several)."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def fail(message: str) -> NoReturn:
    """Prints `error: MESSAGE` (one line) on stderr and exits with status 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(USAGE_STATUS)


def flag_error_message(error: flags.Error) -> str:
    """absl's parsing error as `--flag...: what is wrong` (one line)."""
    if isinstance(error, flags.UnrecognizedFlagError):
        _, _, suggestions = str(error).partition(". Did you mean: ")
        names = [name.strip() for name in suggestions.rstrip(" ?").split(",") if name.strip()]
        return (f"--{error.flagname}: unknown flag"
                + (f" (did you mean {', '.join('--' + n for n in names)}?)" if names else ""))
    message = one_line(str(error))
    if message.startswith("ERROR:: "):  # --flagfile that cannot be read
        message = "--flagfile: " + message[len("ERROR:: "):]
    missing = re.fullmatch(r"Missing value for flag (-\S+)", message)  # `--out` as the last word
    if missing:
        message = f"{missing[1]}: no value (write {missing[1]}=VALUE)"
    if isinstance(error, flags.IllegalFlagValueError):
        message = message.removeprefix("flag ")
        for pattern, plain in _CONVERSION_ERRORS:
            message = pattern.sub(plain, message)
    return message


def new_flag_values() -> flags.FlagValues:
    """A command's own, empty set of flags, with --help (-h)."""
    values = flags.FlagValues()
    flags.DEFINE_bool("help", False, "Show this help and exit.", short_name="h", flag_values=values)
    return values


def parse(argv: Sequence[str], flag_values: flags.FlagValues | None = None, *,
          required: Sequence[str] = (), positional: Sequence[str] | None = (),
          doc: str = "") -> list[str]:
    """Parses `argv` (the program name first) into `flag_values` (absl's FLAGS by default);
    returns the arguments that are not flags, the program name first.

    Exits with status 2 and one line `error: ...` on a bad flag (unknown, a value that does
    not parse, one of `required` left unset) or, unless `positional` is None, on positional
    arguments other than the ones it names. `--help` of a `new_flag_values` set prints `doc`
    and the flags on stdout and exits with status 0."""
    values = flags.FLAGS if flag_values is None else flag_values
    try:
        rest = values(list(argv))
    except flags.Error as error:
        fail(flag_error_message(error))
    if flag_values is not None and "help" in values and values["help"].value:
        print(doc.strip() + "\n\nFlags:\n" + values.get_help(include_special_flags=False))
        sys.exit(0)
    for name in required:
        if values[name].value is None:
            fail(f"--{name}: required, not given (see --help)")
    if positional is not None:
        extra = rest[1 + len(positional):]
        if extra:
            fail(f"unexpected argument{'s' if len(extra) > 1 else ''} "
                 f"{' '.join(map(repr, extra))} (flags are written --name=value)")
        if len(rest) - 1 < len(positional):
            fail(f"missing the {positional[len(rest) - 1]} argument (see --help)")
    return rest


def _unknown_field(err: Exception, argv: Sequence[str]) -> str | None:
    """`--config.a.b: no field 'b'; did you mean ...` for the error ml_collections raises
    (AttributeError or KeyError, its "did you mean" suggestion inside) when an override names
    no field of the config; None when the error names no override of argv."""
    while err.args and isinstance(err.args[0], BaseException):  # AttributeError(KeyError(..))
        err = err.args[0]
    text = str(err.args[0]) if err.args else ""
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    for arg in argv[1:]:
        name = arg.split("=", 1)[0].lstrip("-")
        if name.startswith("config.") and key in name.split(".")[1:]:
            hint = hint.strip()
            return (f"--{name}: no field {key!r} in the config"
                    + (f"; {hint[:1].lower()}{hint[1:]}" if hint else ""))
    return None


def config_parser(config_flag):
    """An app.run flags_parser for a command with a required ml_collections `--config` file
    flag (config_flags.DEFINE_config_file's holder): `parse`, then the recipe file and its
    `--config.a.b=v` overrides, whose errors ml_collections would raise as a traceback."""
    def parse_with_config(argv: Sequence[str]) -> list[str]:
        try:
            rest = parse(argv, required=("config",))
            config_flag.value.keys()  # a recipe file that failed to load raises on first use
            return rest
        except OSError as err:  # ml_collections: "Failed loading config file ...[Errno 2] ..."
            fail(f"--config: {str(err).strip().splitlines()[-1].strip()}")
        except (AttributeError, KeyError) as err:
            message = _unknown_field(err, argv)
            if message is None:
                raise
            fail(message)

    return parse_with_config
