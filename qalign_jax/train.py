"""The entry point: `python -m qalign_jax.train --config configs/<experiment>.py --workdir <dir>`.

Loads the experiment's config file (locked: unknown keys are errors), applies
`--config.a.b=value` overrides, initializes multi-process JAX when the environment asks for
it, records the resolved config in the workdir, and runs the loop that `config.loop` names.
"""

import functools
import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from qalign_jax import eval as eval_lib
from qalign_jax import files, sharding
from qalign_jax.loops import best_of_n, dpo, generate, grpo, iteralign, pipeline, prime_data, sft

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. configs/generate_smol.py[:smoke].",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Output directory: gs://bucket/path, or a local path (on a pod, one every host sees).",
)


def run_stage(config, workdir: str) -> None:
    """Runs `config.loop` as a stage of a composing loop (the pipeline's stages, IterAlign's
    SFT rounds). Loops never import each other; those two get this function instead."""
    LOOPS[config.loop](config, workdir)


# Every loop exposes `run(config, workdir)`.
LOOPS = {
    "best_of_n": best_of_n.run,
    "dpo": dpo.run,
    "eval": eval_lib.run,
    "generate": generate.run,
    "grpo": grpo.run,
    "iteralign": functools.partial(iteralign.run, run_stage=run_stage),
    "pipeline": functools.partial(pipeline.run, run_stage=run_stage),
    "prime_data": prime_data.run,
    "sft": sft.run,
}


def run(config, workdir: str) -> None:
    if config.loop not in LOOPS:
        raise ValueError(
            f"config.loop={config.loop!r} is not a known loop; known loops: {sorted(LOOPS)}."
        )
    if files.is_url(workdir) and not workdir.startswith("gs://"):
        raise ValueError(
            f"--workdir={workdir}: the URL workdirs supported are Cloud Storage ones "
            "(gs://bucket/path); use one of those or a local (or mounted) directory."
        )
    sharding.initialize_distributed(config)
    files.makedirs(workdir)
    if jax.process_index() == 0:
        files.write_json(
            os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort())
        )
    logging.info("loop %s, workdir %s", config.loop, workdir)
    LOOPS[config.loop](config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("both --config and --workdir are required.")
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
