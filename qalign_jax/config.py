"""The base config: every key any experiment may set, with its default and meaning.

Experiment files in `configs/` start from `base_config()`, which is *locked*: assigning a key
that does not exist here (a typo) raises at once, and so does `--config.not.a.key=1` on the
command line. A stage that needs new settings adds them here, documented, so that one file
lists the whole surface.
"""

import importlib.util
import os

import ml_collections

from qalign_jax import sharding


def load_file(spec: str) -> ml_collections.ConfigDict:
    """The config of `path/to/experiment.py[:arg]`, as `--config` would load it."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} (from {spec!r}) does not exist.")
    module_spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(path))[0], path
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.loop = "generate"  # which loop `qalign_jax.train` runs; see train.LOOPS
    c.seed = 0  # the one seed of a run; loops split it, steps fold in the step number
    # SFT and GRPO check `plan.py`'s peak bytes per device against the device before loading
    # anything: 'error' stops a run that cannot fit (naming settings that would), 'warn', 'off'.
    c.memory_check = "error"
    c.distributed = "auto"  # jax.distributed.initialize(): 'auto' | 'on' | 'off'

    # The model: 'embedded' | path/to/model.gguf | path/to/hf_dir | 'random:<preset>'.
    c.model = ml_collections.ConfigDict()
    c.model.source = "embedded"
    c.model.tokenizer = ""  # tokenizer source for random-weight models ('' = none)
    c.model.param_dtype = "float32"  # storage dtype of the weights
    c.model.dtype = "float32"  # compute dtype (bfloat16 on accelerators)
    c.model.remat = "none"  # 'none' | 'full' | 'dots' (see llama.REMAT_POLICIES)
    # Train steps cast the weights to `dtype` once per step, before the micro-batch loop, not at
    # each use in every micro-batch (`train_state.compute_copy`; no-op when dtype = param_dtype).
    # It holds one copy of the weights in `dtype` for the step; False casts at each use.
    c.model.compute_copy = True
    # Training losses run the output head on this many positions of each row at a time, so
    # the [rows, T, vocab] float32 logits never exist at once (0 = all at once).
    c.model.logits_chunk = 0
    # Low-rank adapters (models/lora.py): rank 0 = off (full fine-tuning). With rank r > 0 the
    # SFT/GRPO/DPO loops train only the adapters of `targets` (Hugging Face projection names,
    # comma-separated), scaled by alpha / r; the frozen base serves as the KL reference and
    # the judge, with no second copy. No dropout on the adapters.
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0
    c.model.lora.alpha = 16.0
    c.model.lora.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    # A PEFT adapter directory to start the adapters from (e.g. a LoRA run's workdir/adapter;
    # its rank, alpha and targets must match the above); '' = fresh (B = 0). In GRPO and DPO
    # the KL reference is then the base with these adapters (the policy at the start).
    c.model.lora.init = ""
    # Attention (`llama.ATTENTION`): 'auto' (splash on a TPU, dot_product on a GPU, xla
    # elsewhere), 'xla' (the reference einsums; grouped, K/V never repeated), 'dot_product'
    # (jax.nn.dot_product_attention: cuDNN flash attention on a GPU where it applies, XLA
    # elsewhere), 'cudnn' (insist on cuDNN), 'splash' (Pallas splash attention, models/splash.py,
    # for the forwards without a KV cache). The judge's shared-prefix attention is always the
    # reference.
    c.model.attention = "auto"

    # Devices: (data, fsdp, tensor); one -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = sharding.DEFAULT_RULES  # (logical axis, mesh axes) pairs

    # Generation (the `generate` loop and the chat CLI).
    c.generate = ml_collections.ConfigDict()
    c.generate.prompts = ("What is the capital of France?",)
    c.generate.prompts_file = ""  # JSONL (id, prompt, ...); overrides `prompts` if set
    c.generate.system_prompt = ""  # '' = the chat template's own default
    c.generate.batch_size = 8
    c.generate.max_new_tokens = 64
    c.generate.temperature = 0.0  # 0 = greedy
    c.generate.top_k = 0  # 0 = off
    c.generate.top_p = 1.0  # 1 = off

    # Training data (`data.py`). SFT JSONL lines: {"id", "prompt", "segments": [{"text",
    # "train"}, ...]} or {"id", "prompt", "completion"}.
    c.data = ml_collections.ConfigDict()
    c.data.train_path = ""  # SFT JSONL to train on (required by the sft loop); "a,b": both
    c.data.eval_path = ""  # held-out SFT JSONL; '' = hold out `eval_size` of train_path
    c.data.eval_size = 0  # examples held out of train_path (by a hash of seed and id); 0 = none
    c.data.max_examples = 0  # use only the first N training examples; 0 = all
    c.data.system_prompt = ""  # system message of every example; '' = the template's default
    c.data.seq_len = 1024  # tokens per batch row (chat-template prompt + answer + end of turn)
    c.data.on_overflow = "error"  # example longer than seq_len: 'error' | 'truncate' (drop tail)
    # SFT and DPO rows: 'batch' = as wide as each batch's longest row, rounded up to 64, 96,
    # 128, 192, ... (one train-step compile per width); 'seq_len' = always the longest (one).
    c.data.row_width = "batch"

    # The SFT loop (`loops/sft.py`).
    c.sft = ml_collections.ConfigDict()
    c.sft.global_batch_size = 8  # examples per optimizer step, all micro-batches together
    c.sft.grad_accum_steps = 1  # micro-batches per step (each global_batch_size / this rows)
    c.sft.num_epochs = 1  # passes over the training examples
    c.sft.num_steps = 0  # > 0: train exactly this many steps instead of num_epochs
    c.sft.eval_every = 0  # eval loss every N steps (also at step 0 and at the end); 0 = ends only
    c.sft.export_hf = True  # write the final params as a Hugging Face directory, workdir/hf
    c.sft.export_dtype = ""  # dtype of the exported weights; '' = model.param_dtype

    # AdamW with linear warmup and cosine decay, clipped by global norm
    # (`train_state.make_optimizer`).
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-5  # peak learning rate
    c.optimizer.warmup_ratio = 0.03  # fraction of the steps warming up linearly from 0
    c.optimizer.min_lr_ratio = 0.0  # final lr of the cosine decay, as a fraction of lr
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0  # decoupled; never applied to norm weights
    c.optimizer.mu_dtype = ""  # Adam's first moment: '' = the params' dtype, or 'bfloat16'
    c.optimizer.max_grad_norm = 1.0  # clip the global gradient norm to this; 0 = no clipping

    # The judge (`judge.py`): a rubric answered by a judge model from answer-token logits.
    c.judge = ml_collections.ConfigDict()
    c.judge.source = ""  # judge model source; '' = the policy model itself (shared weights)
    c.judge.tokenizer = ""  # tokenizer source for a random-weight judge
    c.judge.rubric = "demo"  # built-in name ('demo', 'default', 'scalar') or a rubric file
    c.judge.mode = "logits"  # 'logits' (shared prefix) | 'generate' (naive baseline)
    c.judge.batch_size = 4  # responses per judge prefill
    c.judge.question_chunk = 64  # questions per jitted scoring call
    c.judge.max_context_tokens = 1024  # judge prefix budget (system + prompt + response)
    c.judge.on_long_context = "truncate"  # 'truncate' the response's end | 'error'
    c.judge.skip_inapplicable = True  # never compute a question whose conditions failed
    # Judge cache (`judge_cache.py`): a (prompt, response) repeated in one call is always judged
    # once; these replay verdicts across calls and runs (keyed by judge weights, rubric, template).
    c.judge.cache_entries = 0  # verdicts kept in memory across calls; 0 = off
    c.judge.cache_dir = ""  # also store/replay verdicts here (local or gs://); needs entries > 0
    # Judge defences (measured by `python -m qalign_jax.judge robustness`; off = the paper's
    # judge). quote_response shows the response as a "> " quote, so a "### Question" line inside
    # it cannot end the judge's context section; substantive_gate vetoes non-answers (empty, ":",
    # "Thought process:", the prompt or rubric echoed) to the reward floor like a violated gate.
    c.judge.quote_response = False
    c.judge.substantive_gate = False
    c.judge.calibrate = False  # option probs divided by the judge's on a content-free pair
    # with calibrate: a response longer than 16 tokens is also divided by the judge's length
    # effect (placeholder text of its length bucket over 16 tokens of it), against padding
    c.judge.calibrate_length = False

    # Rewards (`rewards.py`); defaults are QA-LIGN's.
    c.reward = ml_collections.ConfigDict()
    c.reward.dimension_pooling = "min"  # 'min' | 'weighted_mean'
    c.reward.final_pooling = "safety_first"  # 'safety_first' | 'weighted_mean'
    c.reward.safety_principle = "harmlessness"
    c.reward.gate_readout = "argmax"  # 'argmax' | 'expected'
    c.reward.grade_readout = "expected"  # 'expected' | 'argmax'
    c.reward.scale = "paper"  # 'paper' (A=1 .. F=-1, floor -1) | 'unit' ([0, 1])
    c.reward.improvement_weight = 10.0  # two-pass: weight of R2 - R1 > 0 (the paper's alpha)
    c.reward.regression_weight = 1.0  # two-pass: weight of R1 - R2 >= 0 (the paper's beta)
    # The reward as components (reward_components.py): ((name, kind or 'pkg.mod:fn', weight,
    # options), ...); kinds 'rubric' (the judge, all of the above), 'refusal', 'degeneracy',
    # 'format', 'length'; option veto=True floors the total. QA-LIGN: the rubric alone.
    c.reward.components = (("rubric", "rubric", 1.0, {}),)
    c.reward.aggregation = "sum"  # 'sum' (QA-LIGN) | 'gdpo' (each component group-normalized)

    # Rejection-sampling SFT data (`loops/best_of_n.py`): the best of N samples by the reward.
    c.best_of_n = ml_collections.ConfigDict()
    c.best_of_n.sources = ()  # ((prompt-set JSONL, count or -1 for all), ...)
    c.best_of_n.num_samples = 8  # N answers per prompt
    c.best_of_n.num_samples_by_label = ()  # ((label, N), ...) overriding num_samples
    c.best_of_n.batch_prompts = 4  # prompts per sampler call at num_samples (x N rows)
    c.best_of_n.max_new_tokens = 128
    c.best_of_n.max_prompt_tokens = 256
    c.best_of_n.on_long_prompt = "error"  # 'error' | 'drop'
    c.best_of_n.temperature = 1.0
    c.best_of_n.top_p = 1.0
    c.best_of_n.min_reward = float("-inf")  # keep a prompt's best answer at or above this
    c.best_of_n.min_reward_by_label = ()  # ((label, threshold), ...) overriding min_reward

    # Reflection priming data (`loops/prime_data.py`): draft -> findings -> <Think> -> revision.
    c.prime = ml_collections.ConfigDict()
    c.prime.sources = ()  # ((prompt-set JSONL, count or -1 for all), ...): the prompt mix
    c.prime.batch_size = 8  # prompts per sampling batch
    c.prime.draft_max_tokens = 128
    c.prime.think_max_tokens = 96  # the reflection; closed with </Think> if it runs out
    c.prime.revision_max_tokens = 160
    c.prime.temperature = 0.7
    c.prime.top_p = 0.95
    c.prime.reviser = ""  # model writing <Think> + revision; '' = the policy itself
    c.prime.reviser_tokenizer = ""  # tokenizer source for a random-weight reviser
    c.prime.max_findings = 6  # findings sentences shown to the reviser
    c.prime.keep = "not_worse"  # 'improved' (R2 > R1) | 'not_worse' (R2 >= R1) | 'all'

    # QA-LIGN GRPO (`loops/grpo.py`, `losses.grpo_loss`); defaults are the paper's where it
    # gives them (G = 5, two-pass rollouts).
    c.grpo = ml_collections.ConfigDict()
    c.grpo.sources = ()  # ((prompt-set JSONL, count or -1[, options]), ...): the RL prompts
    c.grpo.priming_data = ""  # the priming stage's prime_data.jsonl ('' = no check)
    c.grpo.on_overlap = "error"  # a prompt id also in priming_data: 'error' | 'exclude'
    c.grpo.prompts_per_step = 2  # B prompts per step
    # {} draws the B prompts uniformly; {'harmful': 4, 'benign': 4} draws that many of each
    # label every step (counts sum to B; 'none' = prompts without a label; 0 leaves a label out;
    # DAPO's resampled extra prompts are drawn with the same mix)
    c.grpo.label_mix = {}
    c.grpo.num_generations = 5  # G samples per prompt
    c.grpo.num_steps = 10
    c.grpo.two_pass = True  # draft -> findings -> <Think> -> revision; False: single pass
    c.grpo.draft_max_tokens = 128
    c.grpo.revision_max_tokens = 192  # reflection + </Think> + revision
    c.grpo.max_prompt_tokens = 256  # longer prompts are an error (or dropped, below)
    c.grpo.on_long_prompt = "error"  # 'error' | 'drop'
    # sampling temperature of the rollouts; the loss's log-probs (policy, old, reference) are
    # taken at it too, softmax(logits / T), as the sampler records them (TRL and verl do the same)
    c.grpo.temperature = 1.0
    c.grpo.top_p = 1.0
    c.grpo.max_findings = 6
    # A revision that does not parse (no </Think>, empty) counts as no revision (R2 = R1) and
    # pays this penalty: the draft still gets its signal and the format is still pushed.
    c.grpo.malformed_penalty = 1.0
    c.grpo.adv_eps = 1e-6
    c.grpo.scale_adv_by_std = True  # False: Dr. GRPO's r - mean
    c.grpo.clip_low = 0.2
    c.grpo.clip_high = 0.2
    c.grpo.kl_beta = 0.04  # 0 skips the reference forward
    c.grpo.aggregation = "seq_mean"  # 'seq_mean' | 'token_mean' | 'constant'
    # The importance ratio (`losses.grpo_loss`): 'grpo' per token (the paper's) | 'gspo' per
    # sequence, the geometric mean of its token ratios, clipped per sequence (GSPO, arXiv
    # 2507.18071; it clips far tighter, e.g. clip_low 3e-4, clip_high 4e-4) | 'gspo_token'.
    c.grpo.loss = "grpo"
    # Groups whose G samples all score alike (zero variance in every reward component) carry
    # no signal. 'off' (the paper's): trained as they are (advantages 0, but they count in the
    # loss's normalizer, and the KL) | 'drop': masked out of the loss | 'resample' (DAPO, arXiv
    # 2503.14476): roll out more prompts (a per-step deterministic stream) until B groups vary
    # or max_resample_rounds extra rollout calls were made; the rest are filled with
    # zero-variance groups, masked out of the loss.
    c.grpo.dynamic_sampling = "off"
    c.grpo.max_resample_rounds = 2
    # Answers cut by the length limit (finish reason 'length' in the final pass): 'keep' (the
    # paper's) | 'mask': out of the loss | 'soft_penalty': DAPO's soft overlong penalty added to
    # the reward (a `length` reward component named 'overlong', weight 1): 0 up to the limit
    # minus overlong_cache_tokens, then linear down to -1 at the limit (0 = a quarter of it).
    c.grpo.overlong = "keep"
    c.grpo.overlong_cache_tokens = 0
    c.grpo.num_iterations = 1  # mu: optimizer updates per batch of rollouts
    c.grpo.grad_accum_steps = 1  # micro-batches per update
    c.grpo.rollouts_every = 5  # write rollouts with their judge reports every N steps (0: never)
    c.grpo.rollouts_shown = 2  # rollouts written per such step (-1: all B x G, to read a step)
    c.grpo.export_hf = True

    # The QA-LIGN pipeline (`loops/pipeline.py`): each stage is an experiment config file
    # ('path/to/config.py[:arg]'); the pipeline wires each stage's outputs into the next and
    # applies its own `model` and `mesh` to every stage.
    c.pipeline = ml_collections.ConfigDict()
    c.pipeline.prime = ""  # the prime_data stage
    c.pipeline.sft = ""  # the SFT priming stage (trains on the prime stage's prime_sft.jsonl)
    c.pipeline.grpo = ""  # the GRPO stage (starts from the SFT stage's weights)
    c.pipeline.eval_sources = ()  # ((prompt-set JSONL, count or -1), ...): held-out prompts

    # IterAlign (`loops/iteralign.py`): per round red-team the policy, detect failures with the
    # judge, have a proposer write constitutions, revise the failed answers in context with
    # them, keep revisions by a rule, SFT (with `sft`, `optimizer`, `data.seq_len`) on
    # (prompt, kept revision); compile the constitutions into rubric gate questions.
    c.iteralign = ml_collections.ConfigDict()
    c.iteralign.sources = ()  # ((prompt-set JSONL, count or -1), ...): the red-team pool
    c.iteralign.prompts_per_round = 20  # round r takes the r-th slice of the pool (wrapping)
    c.iteralign.max_rounds = 3
    c.iteralign.stop_failure_rate = 0.05  # stop once a round's red-team failure rate is below
    c.iteralign.batch_size = 8  # prompts per sampling batch (red team and revisions)
    c.iteralign.answer_max_tokens = 128  # red-team answers
    c.iteralign.temperature = 0.0  # red team and revisions; 0 = greedy (the authors' script)
    c.iteralign.top_p = 1.0
    c.iteralign.detect = "gates"  # failure: 'gates' (a gate of judge.rubric violated) | 'reward'
    c.iteralign.failure_reward = 0.0  # detect='reward': a judged reward below this fails
    c.iteralign.proposer = ""  # proposer model source; '' = config.model.source (frozen base)
    c.iteralign.proposer_tokenizer = ""  # tokenizer source for a random-weight proposer
    c.iteralign.proposer_max_tokens = 128
    c.iteralign.proposer_temperature = 0.0  # first attempt; 0 = greedy
    c.iteralign.proposer_retry_temperature = 0.7  # retries of unparseable outputs
    c.iteralign.max_retries = 2  # re-sends of an unparseable proposer output, then skip it
    c.iteralign.failures_per_call = 4  # failed answers shown to the proposer per prompt
    c.iteralign.constitutions_per_call = 2  # principles asked for per prompt (1 or 2)
    c.iteralign.dedup_jaccard = 0.7  # word-set overlap at which a proposal merges into an entry
    c.iteralign.max_constitutions_in_context = 4  # shown to the policy when it revises
    c.iteralign.revision_examples = 2  # few-shot revision examples in the prompt (0-2)
    c.iteralign.revision_max_tokens = 128
    c.iteralign.keep = "passes"  # 'passes' (no longer a failure) | 'improved' | 'not_worse' | 'all'
    c.iteralign.train = True  # SFT each round; False: discovery only (e.g. between GRPO phases)
    c.iteralign.compile_rubric = True  # write workdir/rubrics/rubric_v{round}.json each round
    c.iteralign.base_rubric = ""  # the rubric the constitutions extend; '' = judge.rubric
    c.iteralign.gates_per_constitution = 1  # gate questions drafted per constitution (1-2)

    # The DPO baseline (`loops/dpo.py`, `losses.dpo_loss`): pairs of best vs worst of G judged
    # samples of the starting policy, then the sigmoid DPO loss against it (frozen).
    c.dpo = ml_collections.ConfigDict()
    c.dpo.sources = ()  # ((prompt-set JSONL, count or -1), ...): the prompts to sample on
    c.dpo.num_generations = 4  # G samples per prompt; the best and the worst make a pair
    c.dpo.min_margin = 0.0  # best - worst reward must exceed this, else the prompt is a tie
    c.dpo.max_new_tokens = 128  # tokens per sampled answer
    c.dpo.max_prompt_tokens = 256  # longer prompts are an error (or dropped, below)
    c.dpo.on_long_prompt = "error"  # 'error' | 'drop'
    c.dpo.temperature = 1.0
    c.dpo.top_p = 1.0
    c.dpo.sample_batch_prompts = 8  # prompts per sampler call (x G rows)
    c.dpo.beta = 0.1  # DPO's inverse temperature of the implicit reward
    c.dpo.label_smoothing = 0.0  # cDPO: assumed probability that a preference is flipped
    c.dpo.pairs_per_step = 4  # pairs per optimizer update
    c.dpo.grad_accum_steps = 1  # micro-batches per update
    c.dpo.num_epochs = 1  # passes over the pairs
    c.dpo.num_steps = 0  # > 0: exactly this many updates instead of num_epochs
    c.dpo.export_hf = True  # write the final params as a Hugging Face directory, workdir/hf

    # Evaluation (`eval.py`, `eval_suites.py`): suites of prompt-set JSONLs, reports, plots.
    c.eval = ml_collections.ConfigDict()
    # ((name, kind, JSONL path, count or -1), ...); kinds: 'asr', 'refusal', 'truthfulqa_mc',
    # 'hhh', 'helpfulness' (see eval_suites.py for the fields each needs).
    c.eval.suites = ()
    c.eval.model = ""  # the evaluated model; '' = model.source (or an orbax workdir, HF dir, GGUF)
    c.eval.name = ""  # the run's name in tables and plots; '' = the model path's last part
    c.eval.batch_size = 16  # prompts per sampler call
    c.eval.max_new_tokens = 128  # answer (or draft) tokens
    c.eval.max_prompt_tokens = 512  # longer chat prompts are an error
    c.eval.temperature = 0.0  # 0 = greedy (deterministic evals)
    c.eval.top_p = 1.0
    c.eval.two_pass = False  # QA-LIGN models: draft -> findings -> <Think> -> revision
    c.eval.revision_max_tokens = 192  # two-pass: reflection + </Think> + revision
    c.eval.max_findings = 6  # two-pass: findings shown after the draft (as in training)
    c.eval.mc_format = "harness"  # 'harness' (lm-eval-harness raw-text prompts) | 'chat'
    c.eval.mc_batch_size = 16  # (context, choice) rows per log-likelihood forward
    c.eval.helpfulness_principle = (
        "helpfulness"  # the rubric principle the 'helpfulness' suite reads
    )

    # Checkpoints (`checkpoint.py`): orbax in workdir/ckpt, resumed automatically.
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100  # save every N steps (and always at the end); 0 = end only
    c.checkpoint.keep = 3  # newest checkpoints kept; 0 = all
    c.checkpoint.async_save = True  # write in the background while training continues
    c.checkpoint.init = ""  # initial params: a previous stage's workdir or a HF dir ('' = model)

    # Metrics (`metrics.py`): workdir/metrics.jsonl, console, optional TensorBoard.
    c.metrics = ml_collections.ConfigDict()
    c.metrics.log_every = 1  # console progress line every N steps (JSONL gets every step)
    c.metrics.tensorboard = True  # also write workdir/tb if tensorboardX or tensorflow exists

    c.lock()
    return c
