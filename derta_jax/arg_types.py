"""Argument types shared by the argparse commands (evaluate, durability): one parser, one
error message per flag kind, so that the same flag reads the same in every command."""

from __future__ import annotations

import argparse


def int_list(flag: str, noun: str, example: str, distinct: bool = False):
    """An argparse type for --FLAG=A,B,...: integers >= 0 (distinct when asked), in order."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{flag}={text!r}: expected integers separated "
                                             f"by commas, e.g. {example}") from None
        if not values or min(values) < 0 or (distinct and len(set(values)) != len(values)):
            raise argparse.ArgumentTypeError(
                f"--{flag}={text!r}: need {'distinct ' if distinct else ''}{noun} >= 0")
        return values
    return parse


prefill_depths = int_list("prefill_depths", "depths", "0,5,10")


def mesh_sizes(text: str) -> dict:
    """--mesh=AXIS:SIZE,... -> {axis: size} over the four mesh axes (unnamed axes: 1)."""
    from derta_jax.train.config import MESH_AXES
    from derta_jax.train.mesh import parse_mesh

    try:
        return {axis: 1 for axis in MESH_AXES} | parse_mesh(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
