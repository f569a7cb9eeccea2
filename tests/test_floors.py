"""The floors of DESIGN.md hold: imports point down, and each concern has one place.

Read from the source (AST), so a new upward import or a second copy of a loader fails here
before it drifts: the counts are what the assembly-floor issue set to 1.
"""

from __future__ import annotations

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "derta_jax"
COMMANDS = {"derta_jax.convert", "derta_jax.export", "derta_jax.evaluate", "derta_jax.plan",
            "derta_jax.reproduce", "derta_jax.train.loop", "derta_jax.train.__main__",
            "derta_jax.data.tfds_build"}
LIBRARY_DIRS = ("data", "models", "hf", "eval")
LIBRARY_FILES = ("paths.py", "workdir.py", "weights.py", "loss.py", "train/state.py",
                 "train/step.py", "train/plan_compile.py", "train/plan_memory.py",
                 "train/data.py", "train/config.py", "train/mesh.py", "train/plan_decode.py")


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every module a file imports, anywhere in it (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _library_files() -> list[pathlib.Path]:
    files = [p for d in LIBRARY_DIRS for p in (PACKAGE / d).rglob("*.py")]
    return files + [PACKAGE / f for f in LIBRARY_FILES]


def test_no_library_module_imports_a_command():
    offenders = {}
    for path in _library_files():
        bad = sorted(_imports(path) & COMMANDS)
        if bad:
            offenders[_module_name(path)] = bad
    assert offenders == {}


def test_models_is_the_lowest_floor():
    """models/ imports nothing of the project outside models/ (loss.py is beside it)."""
    offenders = {}
    for path in (PACKAGE / "models").rglob("*.py"):
        ours = {m for m in _imports(path) if m.startswith("derta_jax")}
        bad = sorted(m for m in ours if not m.startswith("derta_jax.models"))
        if bad:
            offenders[_module_name(path)] = bad
    assert offenders == {}


def _sources() -> dict[str, str]:
    return {_module_name(p): p.read_text() for p in PACKAGE.rglob("*.py")}


def _where(pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return sorted(name for name, text in _sources().items()
                  if any(regex.search(line) for line in text.splitlines()
                         if not line.lstrip().startswith("#")))


def test_each_concern_is_written_once():
    # the abstract model (nnx.eval_shape of a Transformer), HF loading, the Orbax manager,
    # the state assembly, LoRA surgery, the output-directory rule
    assert _where(r"nnx\.eval_shape\(") == ["derta_jax.weights"]
    assert _where(r"load_hf_tensors\(abstract") == ["derta_jax.weights"]
    assert _where(r"ocp\.CheckpointManager\(") == ["derta_jax.workdir"]
    assert _where(r"= make_train_step\(") == ["derta_jax.train.state"]
    assert _where(r"def add_lora\(|def merge_lora\(") == ["derta_jax.models.lora"]
    assert _where(r"is not empty") == ["derta_jax.paths"]
    assert not (PACKAGE / "train" / "lora.py").exists()
    assert not (PACKAGE / "hf" / "lora.py").exists()


def test_every_command_has_a_console_script():
    """pyproject's [project.scripts] point at cli() functions of the command modules (read
    from the source: the absl commands define their flags at import, so one process can
    import only one of them; tests/test_install.py runs the installed scripts)."""
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    scripts = project["project"]["scripts"]
    assert {"derta-train", "derta-evaluate", "derta-export", "derta-convert", "derta-plan",
            "derta-reproduce"} <= set(scripts)
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        assert any(isinstance(node, ast.FunctionDef) and node.name == function
                   for node in tree.body), name
