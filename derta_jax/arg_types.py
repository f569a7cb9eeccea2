"""Argument types shared by the argparse commands (evaluate, durability): one parser, one
error message per flag kind, so that the same flag reads the same in every command."""

from __future__ import annotations

import argparse


def prefill_depths(text: str) -> tuple[int, ...]:
    try:
        depths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prefill_depths={text!r}: expected integers "
                                         f"separated by commas, e.g. 0,5,10") from None
    if not depths or min(depths) < 0:
        raise argparse.ArgumentTypeError(f"--prefill_depths={text!r}: need depths >= 0")
    return depths


def mesh_sizes(text: str) -> dict:
    """--mesh=AXIS:SIZE,... -> {axis: size} over the four mesh axes (unnamed axes: 1)."""
    from derta_jax.train.config import MESH_AXES
    from derta_jax.train.mesh import parse_mesh

    try:
        return {axis: 1 for axis in MESH_AXES} | parse_mesh(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
