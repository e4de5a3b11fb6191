"""The memory planner against XLA's own accounting, and its verdicts and errors.

`compiled.memory_analysis()` of the SFT step (8 CPU devices) gives per-device argument bytes
(params, Adam, batch) and temporaries (gradients, activations). The planner must match the
arguments within 1% and the temporaries within 10% on shapes its activation coefficients were
not fitted on (qalign_jax/plan.py: fitted on a 4-layer D=128 model and single-axis variants)."""

import pytest

from qalign_jax import aot, plan, sharding
from qalign_jax.models import llama
from tests.test_sft import load_config

# Held-out shapes: every dimension differs from the fitting set at once.
HELD_OUT = llama.LlamaConfig(
    vocab_size=2048, hidden_size=192, intermediate_size=512, num_layers=3, num_heads=6,
    num_kv_heads=2, head_dim=32, max_position_embeddings=512,
)  # fmt: skip


def sft_config(rows, seq_len, mesh):
    config = load_config("smoke", "sft_prime_smol.py")
    config.mesh.shape = mesh
    config.sft.global_batch_size, config.sft.grad_accum_steps = rows, 1
    config.data.seq_len = seq_len
    return config


@pytest.mark.parametrize(
    "remat,rows,seq_len,mesh,chunk",
    [("none", 16, 192, (1, 8, 1), 0), ("full", 24, 160, (1, 8, 1), 0),
     ("none", 8, 128, (1, 4, 2), 0), ("none", 16, 192, (1, 8, 1), 32)],
)  # fmt: skip
def test_plan_matches_memory_analysis(remat, rows, seq_len, mesh, chunk):
    config = sft_config(rows, seq_len, mesh)
    cfg = HELD_OUT.replace(remat=remat, logits_chunk=chunk)
    ma = aot.compile_sft(config, cfg, sharding.make_mesh(mesh))["sft_step"].memory_analysis()
    p = plan.plan(config, cfg, num_devices=8)
    args = p.rows["params"] + p.rows["optimizer (Adam mu, nu)"] + p.rows["batch"]
    temp = p.rows["gradients + step temporaries (f32)"] + p.rows[f"activations (remat {remat})"]
    print(remat, rows, seq_len, mesh, ma.argument_size_in_bytes, args, ma.temp_size_in_bytes, temp)
    assert args == pytest.approx(ma.argument_size_in_bytes, rel=0.01)
    assert temp == pytest.approx(ma.temp_size_in_bytes, rel=0.10)


def test_8b_verdicts_and_components():
    config = load_config(None, "sft_prime_llama3_8b.py")
    cfg = llama.get_preset("llama3_1_8b").replace(
        param_dtype="float32", dtype="bfloat16", remat="full"
    )
    p = plan.plan(config, cfg, num_devices=32, accelerator="v5p")
    # fp32 params over 32 chips, every 8B matrix divisible: 8.03e9 * 4 / 32 plus the norms.
    assert p.rows["params"] == pytest.approx(8.03e9 * 4 / 32, rel=0.01)
    assert p.rows["optimizer (Adam mu, nu)"] == 2 * p.rows["params"]
    assert p.fits and p.peak < 20e9
    assert not plan.plan(config, cfg.replace(remat="none"), 32, "v5e").fits
    text = plan.format_plan(p, "t")
    assert "fits" in text and "remat 'none' instead" in text

    grpo = load_config(None, "qalign_grpo_llama3_8b.py")
    grpo.checkpoint.init = "primed"  # a separate frozen reference, and a separate judge
    g = plan.plan(grpo, cfg, num_devices=32, accelerator="v5p")
    for row in ("frozen reference (checkpoint.init)", "judge copy (judge.source)",
                "KV cache, both passes", "decode weights (compute dtype)",
                "judge prefix cache"):  # fmt: skip
        assert g.rows[row] > 0, row
    assert "frozen model.source weights" not in g.rows  # read by nothing, so never loaded
    # 80 rollouts over fsdp 16 (GRPO's sampler bucket is B x G itself): 5 rows x 1,792 slots x
    # 32 layers x 4 kv heads (8 over tensor 2) x 128 x 2 (k, v) x 2 bytes.
    assert g.rows["KV cache, both passes"] == 5 * 1792 * 32 * 4 * 128 * 2 * 2
    assert g.peak == max(g.train, g.rollout)
    grpo.checkpoint.init = ""  # model.source is the reference, the judge is separate: 2 copies
    two = plan.plan(grpo, cfg, num_devices=32, accelerator="v5p")  # v5p: the same coefficients
    assert two.train == pytest.approx(g.train)
    grpo.judge.source = ""  # one frozen copy: judge and reference
    one = plan.plan(grpo, cfg, num_devices=32, accelerator="v5p")
    assert "judge copy (judge.source)" not in one.rows
    assert one.train == pytest.approx(g.train - g.rows["params"])


def test_errors():
    config = load_config(None, "sft_prime_llama3_8b.py")
    cfg = llama.get_preset("tiny")
    with pytest.raises(ValueError, match="give --num_devices"):
        plan.plan(config, cfg)
    with pytest.raises(ValueError, match="unknown accelerator 'v9'"):
        plan.plan(config, cfg, 8, "v9")
    config.mesh.shape = (1, 4, 1)
    with pytest.raises(ValueError, match="needs 4 devices, not 8"):
        plan.plan(config, cfg, 8)
    config.loop = "generate"
    with pytest.raises(ValueError, match="the planner knows 'sft' and 'grpo'"):
        plan.plan(config, cfg, 4)


def test_a_config_that_cannot_fit_stops_naming_settings_that_would(caplog):
    config = sft_config(64, 256, (1, 8, 1))
    cfg = plan.load.describe_config(config.model)[0]
    peak = plan.plan(config, cfg, 8).peak
    with pytest.raises(MemoryError) as err:
        plan.check_fits(config, "sft", 8, memory=peak / 2, device="fake")
    text = str(err.value)
    assert f"plans {peak / plan.GB:.1f} GB per device" in text and "[fake]" in text
    assert "--config.sft.grad_accum_steps=" in text, text
    # Every suggestion fits by the same plan, and is the smallest grad_accum_steps that does.
    fixes = plan.fitting_settings(config, cfg, 8, peak / 2)
    assert fixes and all(p <= plan.USABLE_FRACTION * peak / 2 for _, p in fixes)
    for flags_, _ in fixes:
        accum = int(flags_.split("grad_accum_steps=")[1].split()[0])
        trial = config.copy_and_resolve_references()
        trial.sft.grad_accum_steps = accum // 2
        remat = "full" if "remat=full" in flags_ else cfg.remat
        assert plan.plan(trial, cfg.replace(remat=remat), 8).peak > plan.USABLE_FRACTION * peak / 2
    # Between 90% and 100% of the device it only warns; with room, nothing; 'off' skips.
    with caplog.at_level("WARNING"):
        plan.check_fits(config, "sft", 8, memory=peak / 0.95, device="fake")
    assert "plans" in caplog.text
    caplog.clear()
    plan.check_fits(config, "sft", 8, memory=peak * 2, device="fake")
    assert "plans" not in caplog.text
    config.memory_check = "off"
    plan.check_fits(config, "sft", 8, memory=1.0, device="fake")
    config.memory_check = "maybe"
    with pytest.raises(ValueError, match="use 'error', 'warn' or 'off'"):
        plan.check_fits(config, "sft", 8, memory=1.0)


def test_grpo_stops_before_loading_weights_when_it_cannot_fit(tmp_path, monkeypatch):
    from qalign_jax import train
    from qalign_jax.models import load
    from tests.test_grpo import smoke_config

    monkeypatch.setattr(plan, "device_memory", lambda: (1e6, "a 1 MB device"))
    monkeypatch.setattr(load, "base_model", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(MemoryError, match=r"each device has 0\.0 GB \[a 1 MB device\]"):
        train.run(smoke_config(), str(tmp_path))


def test_compile_prints_the_compilers_bytes_beside_the_plan():
    config = sft_config(16, 128, (1, 8, 1))
    mesh = plan.compile_mesh(config)  # no topology: the local (8 fake CPU) devices
    p = plan.plan(config, HELD_OUT, 8)
    text = plan.compiled_report(config, HELD_OUT, mesh, p, "v5p")
    row = next(line.split() for line in text.splitlines() if line.strip().startswith("sft_step"))
    args_gb, temps_gb, peak_gb = map(float, row[1:4])
    planned_args = p.rows["params"] + p.rows["optimizer (Adam mu, nu)"] + p.rows["batch"]
    assert args_gb == pytest.approx(planned_args / plan.GB, rel=0.02, abs=2e-3)
    assert peak_gb >= args_gb and temps_gb > 0
    assert "train step: plan" in text and "plan / compiler" in text
    model = plan.train_step_flops(config, HELD_OUT, 8)
    assert model == pytest.approx(6 * HELD_OUT.num_params * 16 * 128 / 8, rel=0.2)
    assert f"model {model / 1e12:.2f} TFLOP per device" in text and "v5p: 459 TFLOP/s" in text


def test_tpu_targets_use_the_tpu_coefficients():
    """A TPU target takes the TPU fit of its attention: splash ('auto' there) or the reference."""
    assert plan.coefficients("v5p") is plan.FIT_TPU_SPLASH
    assert plan.coefficients("v6e", attention="splash") is plan.FIT_TPU_SPLASH
    assert plan.coefficients("v5p", attention="xla") is plan.FIT_TPU
    assert plan.coefficients("", topology="v5p:2x2x1", attention="xla") is plan.FIT_TPU
    assert plan.coefficients("h100") is plan.FIT and plan.coefficients() is plan.FIT
    assert plan.coefficients("h100", attention="splash") is plan.FIT
    config = sft_config(16, 192, (1, 8, 1))
    cfg = HELD_OUT.replace(param_dtype="float32", dtype="bfloat16", remat="full")
    key = "activations (remat full)"
    cfg = cfg.replace(attention="xla")
    tpu, cpu = plan.plan(config, cfg, 8, "v5p"), plan.plan(config, cfg, 8)
    assert tpu.rows[key] == plan.activation_bytes(cfg, 16, 192, tpu_mesh := {"data": 1,
        "fsdp": 8, "tensor": 1}, "full", plan.FIT_TPU)  # fmt: skip
    assert cpu.rows[key] == plan.activation_bytes(cfg, 16, 192, tpu_mesh, "full", plan.FIT)
    assert tpu.rows[key] != cpu.rows[key]
    grads = "gradients + step temporaries (f32)"
    assert tpu.rows[grads] == plan.FIT_TPU["full"]["grads"] * cpu.rows[grads] / plan.FIT["full"][
        "grads"]  # fmt: skip
    # The train step's bytes: the train phase less the frozen copies; its temporaries: less
    # the arguments (params, Adam, batch).
    assert plan.train_step_peak(tpu) == tpu.train
    args = sum(tpu.rows[k] for k in ("params", "optimizer (Adam mu, nu)", "batch"))
    assert plan.temporaries(tpu) == pytest.approx(tpu.train - args)


@pytest.mark.parametrize("attention", ["xla", "auto"])
def test_plan_matches_the_tpu_compiler(attention):
    """A small model compiled deviceless for 4 v5p chips (needs libtpu: `pip install libtpu`,
    or its directory on PYTHONPATH; no TPU): the plan with the TPU fit of the attention
    (FIT_TPU for 'xla', FIT_TPU_SPLASH for 'auto', which is splash there) within 15% of the
    compiled train step's peak, on a shape the coefficients were not fitted on."""
    pytest.importorskip("libtpu", reason="libtpu is not installed: no deviceless TPU compile")
    config = sft_config(12, 768, (1, -1, 1))
    config.model.param_dtype, config.model.dtype = "float32", "bfloat16"
    cfg = llama.LlamaConfig(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=3, num_heads=6,
        num_kv_heads=2, head_dim=64, param_dtype="float32", dtype="bfloat16", remat="full",
        attention=attention,
    )  # fmt: skip
    mesh = plan.compile_mesh(config, "v5p:2x2x1")
    lowered = aot.compile_sft(config, cfg, mesh, compile_=False)["sft_step"]
    # the Pallas kernel (a Mosaic custom call) is in the program exactly when splash runs:
    # 'auto' picks it on a TPU mesh
    assert ("tpu_custom_call" in lowered.as_text()) == (attention == "auto")
    got = plan.compiled_bytes(lowered.compile())
    p = plan.plan(config, cfg, 4, "v5p")
    print(plan.train_step_peak(p), got)
    assert plan.train_step_peak(p) == pytest.approx(got["peak"], rel=0.15)
    assert plan.temporaries(p) == pytest.approx(got["temporaries"], rel=0.25)


def test_grpo_train_step_alone_for_plan_compile():
    """`plan --compile --train_only` (and bench/fit_plan_tpu.py) lower GRPO's train step
    without the sampler and judge programs, which take most of the compile time at 8B."""
    from tests.test_grpo import smoke_config

    config = smoke_config()
    cfg = plan.model_config(config, "tiny")
    mesh = sharding.make_mesh(config.mesh.shape)
    out = aot.compile_grpo(config, cfg, mesh, compile_=False, train_only=True)
    assert list(out) == ["grpo_step"]
    assert hasattr(out["grpo_step"], "compile")  # lowered, not compiled
