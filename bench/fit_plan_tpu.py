"""Fit the planner's TPU coefficients (`plan.FIT_TPU`) to the TPU compiler's own accounting.

  # libtpu (pip install --target LIBTPU_DIR libtpu); no TPU needed: compiles are deviceless
  PYTHONPATH=$PWD:LIBTPU_DIR JAX_PLATFORMS=cpu nice -n 15 .venv/bin/python \
    bench/fit_plan_tpu.py collect fit held_out     # compile the points (skips cached ones)
  ... bench/fit_plan_tpu.py fit [0.5]              # prints FIT_TPU to paste into plan.py
  ... bench/fit_plan_tpu.py validate held_out sft_8b grpo_8b   # plan vs compiler table
  ... bench/fit_plan_tpu.py collect sft_8b grpo_8b # the 8B train steps (~2 min each)
  # the same with Pallas splash attention (the TPU default, 'auto'): FIT_TPU_SPLASH
  ... bench/fit_plan_tpu.py collect fit:splash held_out:splash sft_8b:splash grpo_8b:splash
  ... bench/fit_plan_tpu.py fit:splash [0.5]
  ... bench/fit_plan_tpu.py validate held_out:splash sft_8b:splash grpo_8b:splash

`collect` compiles the train step of every point of the named sets for a small v5p topology
(`plan.compile_mesh`, programs from `qalign_jax/aot.py`: the SFT step, or the GRPO step alone)
and stores its `memory_analysis()` bytes per device in bench/results/plan_tpu_points.json.
Points are SFT steps of a 4-layer model (V 4096, D 256, F 768, 4 heads of 64, 2 kv heads;
8 rows x 512 tokens over 4 chips, fp32 weights, bf16 compute), each dimension varied alone
and in pairs, with remat 'none' and 'full'; `held_out` varies every dimension at once (and the
mesh); `sft_8b` and `grpo_8b` are configs/sft_prime_llama3_8b.py and
configs/qalign_grpo_llama3_8b.py at Llama-3.1-8B on v5p:4x4x2 (32 chips). A set name with
`:splash` is the same points compiled with `model.attention='splash'` (stored as `splash/NAME`);
without it, the reference attention ('xla').

`fit` solves, per remat, non-negative least squares of the compiler's temporaries (less the
plan's compute copy of the weights) on the plan's per-component terms with unit coefficients,
each point divided by the square root of its bytes (between relative errors, where the small
shapes outvote the large, and absolute ones; the argument sets the power), and prints the coefficients with each
point's plan / compiler ratio. `validate` prints plan, compiler and their ratio for the train
step's peak (arguments + outputs - aliased + temporaries) with the coefficients in plan.py,
and for the 8B points the v5p roofline: the step's floor time (the executed FLOPs at peak,
the compiled bytes at HBM bandwidth) and the MFU it implies, an upper bound.
"""

import importlib.util
import json
import os
import sys
import time

import numpy as np

from qalign_jax import plan
from qalign_jax.models import llama

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
POINTS_FILE = os.path.join(RESULTS, "plan_tpu_points.json")
CONFIGS = os.path.join(os.path.dirname(RESULTS), "..", "configs")

BASE = llama.LlamaConfig(
    vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=64, max_position_embeddings=4096,
)  # fmt: skip
SMALL_TOPOLOGY = "v5p:2x2x1"  # 4 chips


def _point(name, rows=8, seq=512, mesh=(1, -1, 1), topology=SMALL_TOPOLOGY, **model):
    return dict(name=name, loop="sft", rows=rows, seq=seq, mesh=mesh, topology=topology,
                model=model)  # fmt: skip


def _sets():
    fit, held = [], []
    for remat in ("none", "full"):
        r = dict(remat=remat)
        fit += [
            _point(f"base/{remat}", **r),
            _point(f"V4/{remat}", vocab_size=16384, **r),
            _point(f"D2/{remat}", hidden_size=512, num_heads=8, num_kv_heads=4, **r),
            _point(f"F4/{remat}", intermediate_size=3072, **r),
            _point(f"L2/{remat}", num_layers=8, **r),
            _point(f"rows2/{remat}", rows=16, **r),
            _point(f"T2/{remat}", seq=1024, **r),
            _point(f"T4/{remat}", seq=2048, **r),
            _point(f"H2/{remat}", num_heads=8, num_kv_heads=2, **r),
            _point(f"V4T2/{remat}", vocab_size=16384, seq=1024, **r),
            _point(f"D2F2/{remat}", hidden_size=512, intermediate_size=1536, **r),
            _point(f"tp2/{remat}", mesh=(1, 2, 2), **r),
            _point(f"dev8/{remat}", rows=16, topology="v5p:2x2x2", **r),
            _point(f"dev8V4/{remat}", rows=16, topology="v5p:2x2x2", vocab_size=16384, **r),
        ]
    for extra in (dict(num_heads=8, num_kv_heads=2), dict(hidden_size=512, intermediate_size=1536),
                  dict(vocab_size=16384)):  # fmt: skip
        name = "T4" + "".join(f"{k[:1]}{v}" for k, v in extra.items())
        fit.append(_point(f"{name}/full", seq=2048, remat="full", **extra))
    for remat in ("none", "full"):
        r = dict(remat=remat)
        held += [
            _point(f"held1/{remat}", rows=12, seq=768, vocab_size=8192, hidden_size=384,
                   intermediate_size=1024, num_layers=3, num_heads=6, num_kv_heads=2, **r),
            _point(f"held2/{remat}", rows=8, seq=1536, mesh=(1, 4, 2), topology="v5p:2x2x2",
                   vocab_size=32768, hidden_size=512, intermediate_size=1792, num_layers=6,
                   num_heads=8, num_kv_heads=4, **r),
        ]  # fmt: skip
    big = dict(preset="llama3_1_8b", topology="v5p:4x4x2")
    return {
        "fit": fit,
        "held_out": held,
        "sft_8b": [dict(name="sft_8b", loop="sft", config="sft_prime_llama3_8b.py", **big)],
        "grpo_8b": [dict(name="grpo_8b", loop="grpo", config="qalign_grpo_llama3_8b.py", **big)],
    }


def _named(name: str) -> list[dict]:
    """The points of a set name: 'fit', 'held_out', ... or the same with ':splash'."""
    base, _, attention = name.partition(":")
    if attention not in ("", "splash"):
        raise ValueError(f"set {name!r}: the attention suffix may only be ':splash'.")
    points = _sets()[base]
    if attention:
        points = [dict(p, name=f"{attention}/{p['name']}", attention=attention) for p in points]
    return points


def load_config(arg, name):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(CONFIGS, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def load_point(point):
    """(config, cfg) of a point: the SFT smoke config reshaped, or an 8B config and preset."""
    if "config" in point:
        config = load_config(None, point["config"])
        cfg = llama.get_preset(point["preset"])
    else:
        config = load_config("smoke", "sft_prime_smol.py")
        config.mesh.shape = tuple(point["mesh"])
        config.sft.global_batch_size, config.sft.grad_accum_steps = point["rows"], 1
        config.data.seq_len = point["seq"]
        config.model.param_dtype, config.model.dtype = "float32", "bfloat16"
        config.model.remat = point["model"].get("remat", "none")
        cfg = BASE.replace(**{k: v for k, v in point["model"].items() if k != "remat"})
    m = config.model
    cfg = cfg.replace(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                      logits_chunk=m.logits_chunk, attention=point.get("attention", "xla"))  # fmt: skip
    return config, cfg


def collect(names):
    from qalign_jax import aot

    done = json.load(open(POINTS_FILE)) if os.path.exists(POINTS_FILE) else {}
    for point in [p for n in names for p in _named(n)]:
        if point["name"] in done:
            continue
        config, cfg = load_point(point)
        mesh = plan.compile_mesh(config, point["topology"])
        t0 = time.perf_counter()
        if point["loop"] == "sft":
            compiled = aot.compile_sft(config, cfg, mesh)["sft_step"]
        else:
            compiled = aot.compile_grpo(config, cfg, mesh, train_only=True)["grpo_step"]
        row = plan.compiled_bytes(compiled)
        row["flops"], row["bytes_accessed"] = plan.compiled_cost(compiled)
        row["compile_s"] = round(time.perf_counter() - t0, 1)
        row["num_devices"] = int(mesh.devices.size)
        done[point["name"]] = row
        print(point["name"], {k: v for k, v in row.items()}, flush=True)
        os.makedirs(RESULTS, exist_ok=True)
        with open(POINTS_FILE, "w") as f:
            json.dump(done, f, indent=1, sort_keys=True)


def _terms(config, cfg, num_devices, fit):
    p = plan.plan(config, cfg, num_devices, fit=fit)
    return p, plan.temporaries(p)


# Held at physical values, not fitted: on the small shapes they are a few percent of the bytes
# (the fit cannot see them) but at 8B they are gigabytes. The float32 gradients of the (sharded)
# parameters exist once; remat 'full' keeps every block's input; FSDP gathers one block's
# weights (compute dtype) at a time inside the layer scan. The head's gathered weights are left
# out (the compiler does not keep them whole at 8B: the 8B points agree without them).
FIXED = {"grads": 1.0, "inputs": 1.0, "block": 1.0, "head": 0.0}


def fit(name="fit", weight=0.5):
    """Least squares of the temporaries divided by compiler bytes ** `weight` (1: relative
    errors, every shape alike; 0: absolute, the large shapes, like the 8B ones, dominate) over
    the points of `name` ('fit' or 'fit:splash')."""
    done = json.load(open(POINTS_FILE))
    fit_points = _named(name)
    keys = list(plan.FIT_TPU["none"])
    free = [k for k in keys if k not in FIXED]
    out = {}
    for remat in ("none", "full"):
        points = [p for p in fit_points if p["name"].endswith(remat) and p["name"] in done]
        a, b = [], []
        for point in points:
            config, cfg = load_point(point)
            n = done[point["name"]]["num_devices"]
            zero = {r: dict.fromkeys(keys, 0.0) for r in plan.FIT_TPU}
            base = _terms(config, cfg, n, zero)[1]  # the compute copy: no coefficient
            cols = []
            for k in keys:
                one = {r: dict(zero[r], **{k: 1.0}) for r in zero}
                cols.append(_terms(config, cfg, n, one)[1] - base)
            fixed = sum(FIXED.get(k, 0.0) * c for k, c in zip(keys, cols))
            cols = [c for k, c in zip(keys, cols) if k not in FIXED]
            target = done[point["name"]]["temporaries"] - base - fixed
            scale = done[point["name"]]["temporaries"] ** weight
            a.append(np.array(cols) / scale)
            assert len(cols) == len(free)
            b.append(target / scale)
        import scipy.optimize

        coef, _ = scipy.optimize.nnls(np.array(a), np.array(b))
        out[remat] = dict(FIXED)
        out[remat].update({k: round(float(c), 2) for k, c in zip(free, coef)})
        out[remat] = {k: out[remat][k] for k in keys}
        print(f'    "{remat}": dict(' + ", ".join(f"{k}={v}" for k, v in out[remat].items()) + "),")
    table = {r: dict(v) for r, v in out.items()}
    for point in fit_points:
        if point["name"] in done:
            config, cfg = load_point(point)
            got = done[point["name"]]["temporaries"]
            temp = _terms(config, cfg, done[point["name"]]["num_devices"], table)[1]
            print(f"  {point['name']:<14} temporaries plan/compiler {temp / got:.3f}")


def validate(names):
    done = json.load(open(POINTS_FILE))
    print(f"{'point':<14}{'plan GB':>9}{'compiler GB':>13}{'ratio':>7}   (train step peak)")
    for point in [p for n in names for p in _named(n)]:
        if point["name"] not in done:
            print(f"{point['name']:<14} not collected")
            continue
        got = done[point["name"]]
        config, cfg = load_point(point)
        p = plan.plan(
            config, cfg, got["num_devices"], fit=plan.coefficients("v5p", attention=cfg.attention)
        )
        planned = plan.train_step_peak(p)
        print(f"{point['name']:<14}{planned / plan.GB:9.3f}{got['peak'] / plan.GB:13.3f}"
              f"{planned / got['peak']:7.2f}   temps {plan.temporaries(p) / plan.GB:.3f} vs "
              f"{got['temporaries'] / plan.GB:.3f}")  # fmt: skip
        if "config" in point:  # the roofline on v5p from the model's FLOPs and compiled bytes
            n = got["num_devices"]
            floor, mfu = plan.roofline(config, cfg, n, "v5p", got["bytes_accessed"])
            print(f"  v5p: model {plan.train_step_flops(config, cfg, n) / 1e12:.1f} TFLOP per "
                  f"chip per step ({plan.hardware_step_flops(config, cfg, n) / 1e12:.1f} executed,"
                  f" remat {cfg.remat}; cost_analysis {got['flops'] / 1e12:.1f}, a scan's body "
                  f"once), {got['bytes_accessed'] / plan.GB:.1f} GB moved: >= {floor * 1e3:.0f} "
                  f"ms per step, MFU at the roofline {mfu:.0%}")  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    what, names = sys.argv[1], sys.argv[2:]
    if what.startswith("fit"):
        fit(what, *map(float, names))
    else:
        {"collect": collect, "validate": validate}[what](names)
