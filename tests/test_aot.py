"""The 8B configs proven by compilation: Llama-3.1-8B's GRPO step, reference forward, sampler
and judge lowered from abstract inputs and compiled for a 64-device mesh (fake CPU devices in a
subprocess: the device count is fixed when jax starts, and conftest gives this process 8).

Full depth (32 layers) and full vocab: the blocks run under `lax.scan`, so depth costs no
compile time. To keep the test near a minute of CPU, the GRPO step and the sampler's
prefill/prepare/decode compile, the reference forward and the judge are only lowered, and the
sampler's second pass (extend + decode) is left out; `python -m qalign_jax.aot` compiles all
nine programs (about 4.5 min on 2 loaded cores, 2 layers)."""

import os
import subprocess
import sys

from tests.test_grpo import ROOT

SCRIPT = r"""
import os, sys, time, importlib.util
sys.path.insert(0, os.getcwd())
import jax
from qalign_jax import aot, plan, sharding
spec = importlib.util.spec_from_file_location("c", "configs/qalign_grpo_llama3_8b.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
config = mod.get_config()
cfg = plan.model_config(config, "llama3_1_8b")
mesh = sharding.make_mesh(config.mesh.shape)
assert dict(mesh.shape) == {"data": 1, "fsdp": 16, "tensor": 4}, mesh.shape
out = aot.compile_grpo(config, cfg, mesh, compile_={"grpo_step"})
step = out["grpo_step"]
# Every state leaf keeps its FSDP/tensor sharding through the step: params in = params out.
ins, outs = step.input_shardings[0][0], step.output_shardings[0]
flat_in = jax.tree.leaves(ins.params, is_leaf=lambda x: hasattr(x, "spec"))
flat_out = jax.tree.leaves(outs.params, is_leaf=lambda x: hasattr(x, "spec"))
assert [s.spec for s in flat_in] == [s.spec for s in flat_out]
assert any("fsdp" in str(s.spec) and "tensor" in str(s.spec) for s in flat_in)
print("programs:", ",".join(sorted(out)), "params:", cfg.num_params)
# A mesh whose batch axes do not divide the 80 rollout rows fails here, not on the pod.
config.mesh.shape = (1, -1, 1)
try:
    aot.compile_grpo(config, cfg, sharding.make_mesh(config.mesh.shape), compile_=False)
except ValueError as e:
    print("refused:", e)
"""


def test_llama3_8b_grpo_compiles_for_64_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=64")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    programs = r.stdout.split("programs: ")[1].split()[0].split(",")
    for name in ("grpo_step", "ref_logprobs", "sampler_prefill", "sampler_prepare",
                 "sampler_decode", "judge_prefill", "judge_score"):  # fmt: skip
        assert name in programs, r.stdout
    assert "params: 8030261248" in r.stdout
    assert "refused: batch size 80 is not divisible by data x fsdp = 64" in r.stdout


SFT_SCRIPT = r"""
import os, sys, importlib.util
sys.path.insert(0, os.getcwd())
from qalign_jax import aot, plan, sharding
spec = importlib.util.spec_from_file_location("c", "configs/sft_prime_llama3_8b.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
config = mod.get_config()
cfg = plan.model_config(config, "llama3_1_8b")
mesh = sharding.make_mesh(config.mesh.shape)
ma = aot.compile_sft(config, cfg, mesh)["sft_step"].memory_analysis()
p = plan.plan(config, cfg, num_devices=32, accelerator="v5p")
args = p.rows["params"] + p.rows["optimizer (Adam mu, nu)"] + p.rows["batch"]
print("argument bytes per device:", ma.argument_size_in_bytes, "plan:", int(args))
print("temp bytes per device (CPU):", ma.temp_size_in_bytes)
"""


def test_llama3_8b_sft_step_compiles_for_32_devices_and_matches_the_plan():
    """The whole 8B SFT step (32 layers) on the v5p-64 mesh (1, 32, 1); the planner's
    per-device state (fp32 params + Adam + batch) equals XLA's argument bytes within 1%."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=32")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", SFT_SCRIPT], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    line = r.stdout.split("argument bytes per device: ")[1].split()
    actual, planned = int(line[0]), int(line[2])
    assert abs(planned - actual) <= 0.01 * actual, r.stdout
    assert 2.9e9 < actual < 3.1e9  # 3 x 8.03e9 x 4 B / 32
