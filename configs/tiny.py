"""The embedded default: a tiny Llama trained from scratch on the project's own synthetic
safety world. Runs end to end on a laptop CPU in a few minutes; nothing is downloaded.
The settings live in the package (derta_jax.train.config.tiny_config), so an installed
derta_jax runs them without this directory."""

from derta_jax.train.config import tiny_config


def get_config():
    return tiny_config()
