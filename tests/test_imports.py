"""The package's import structure: what may depend on what (read from the source with `ast`)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPS_DIR = os.path.join(ROOT, "qalign_jax", "loops")


def imported_modules(path: str) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file, at any depth (function-level too).
    `from qalign_jax.loops import sft` counts as `qalign_jax.loops.sft`."""
    out = []
    for node in ast.walk(ast.parse(open(path).read(), filename=path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


def loop_modules() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(LOOPS_DIR) if f.endswith(".py") and f != "__init__.py")


def test_no_loop_imports_another_loop():
    """Shared pieces live in the loop core (`train_state.py`, `rollouts.py`, `data.py`, ...);
    loops that compose others (the pipeline, IterAlign's SFT rounds) get `train.run_stage`."""
    loops = loop_modules()
    assert {"sft", "grpo", "dpo", "iteralign", "pipeline", "prime_data", "best_of_n"} <= set(loops)
    offences = []
    for name in loops:
        path = os.path.join(LOOPS_DIR, f"{name}.py")
        for line, module in imported_modules(path):
            other = module.removeprefix("qalign_jax.loops.").split(".")[0]
            if module.startswith("qalign_jax.loops.") and other in loops and other != name:
                offences.append(f"qalign_jax/loops/{name}.py:{line} imports {module}")
    assert not offences, "a loop imports another loop:\n" + "\n".join(offences)


def test_the_check_sees_an_offending_import(tmp_path):
    """The reader above finds both spellings of a loop import, at module and function level."""
    path = tmp_path / "x.py"
    path.write_text(
        "from qalign_jax.loops import sft\ndef f():\n    import qalign_jax.loops.grpo as g\n"
    )
    found = {m for _, m in imported_modules(str(path))}
    assert {"qalign_jax.loops.sft", "qalign_jax.loops.grpo"} <= found
