"""Base config: joint T2I + edit distillation at T2I:Edit = 5:5 (the paper's best unified student).

    python -m qwen_flash_jax.main --config=configs/5to5.py:toy --workdir=/tmp/qf
    python -m qwen_flash_jax.main --config=configs/5to5.py --workdir=gs://...      # full scale

Every other config derives from this one through `qwen_flash_jax.config_lib.derive(__file__, arg=arg)` and changes
only what differs. `arg` is "toy" (the CPU-sized world: tiny transformer, toy text encoder and codec, trains in
minutes) or "full" (Qwen-Image 2.x sizes; teachers and text encoder come from converted checkpoints given by path).

`get_config` writes the full-scale config once; every toy difference is in `_toy_overrides`, with the reason for
each toy value beside it.
"""

import ml_collections

ARGS = ("toy", "full")


def get_config(arg=None):
    arg = arg or "full"
    if arg not in ARGS:
        raise ValueError(f"config argument must be one of {ARGS}, got {arg!r}")
    c = ml_collections.ConfigDict()
    c.variant = arg
    c.job = "distill"  # or "teacher": train the teacher named by `teacher_name`
    c.teacher_name = ""
    c.seed = 0
    # Shared, content-addressed cache of things several runs reuse (toy datasets, text encoder, teachers, judge).
    c.cache_dir = ""  # "" -> ~/.cache/qwen_flash_jax
    # Toy runs start from the trained toy teachers, text encoder and judge that ship with the package
    # (qwen_flash_jax/train/prebuilt.py); False trains them here (over an hour on a 2-core CPU).
    c.prebuilt_cache = True

    # The transformer (student, fake score and teachers share it). Fields of models.TransformerConfig.
    c.model = ml_collections.ConfigDict(
        dict(
            patch_size=1,
            in_channels=64,
            out_channels=64,
            num_layers=32,
            attention_head_dim=128,
            num_attention_heads=32,
            context_in_dim=4096,  # = text encoder output width
            mlp_ratio=3,
            axes_dims_rope=(16, 56, 56),
            eps=1e-6,
            causal_condition=True,
            param_dtype="float32",
            dtype="bfloat16",
            # Full remat: each layer saves only its input and recomputes the rest in the backward. With
            # dots_with_no_batch_dims_saveable the T2I critic step alone needed 142.89 GB of temporaries per v5p chip
            # (95.74 GB HBM); with "full" the edit steps peak at 83.2 (critic) and 87.2 GiB (generator) on a v5p-16
            # at fsdp 8, global batch 64, bfloat16 teachers (docs/experiments/aot.md).
            remat_policy="full",
            scan_layers=True,
        )
    )

    # The toy encoder's sizes below are used by kind="toy" only; the Qwen3-VL encoder's come from its checkpoint.
    c.text_encoder = ml_collections.ConfigDict(
        dict(
            kind="qwen3_vl",
            path="",  # full: a converted Qwen3-VL text encoder directory
            vocab_size=1024,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            mlp_dim=128,
            pretrain_steps=300,
            feature_layers=(-1,),  # Qwen-Image uses the last layer only
        )
    )
    c.codec = ml_collections.ConfigDict(dict(kind="vae", patch=4, path=""))

    c.data = ml_collections.ConfigDict(
        dict(
            source="jsonl",
            image_size=1024,
            examples_per_category=2000,  # toy world: records per category and task
            t2i_jsonl="",
            edit_jsonl="",
            image_root="",
            on_bad_record="error",  # or "skip" (skipped records are counted and logged)
            t2i_weights=dict(landscape=1.0, portrait=1.0, text=1.0),
            edit_weights=dict(scene=1.0, enhance=1.0, object=1.0, text_edit=1.0, identity=1.0, style=1.0),
            task_ratio="5:5",
            batch_size=64,  # global batch
            max_prompt_tokens=512,
            # Edit prompts also hold the condition image's slots (one per 2x2 latents: 1024 at 1024 px); 0 = as T2I.
            edit_prompt_tokens=1536,
            # Edit layouts: each a list of the condition images' (height, width) pixels, in order (the last sets the
            # output's aspect ratio), each a size the pipeline keeps at image_size. A record takes the layout of its
            # image count and nearest aspect ratios (data/edit_layouts.py); () = one square source of the target size.
            edit_layouts=(),
            # True: every record's prompt is encoded once before training and the DMD steps read the stored states
            # (no text encoder in the step programs); the store lives in cache_dir/text_states.
            precompute_text=False,
            seed=0,
        )
    )

    # Multi-step teachers. `train` describes how the toy teachers are trained when no `path` is given; the data
    # fields there override `data` for that training run only.
    c.teachers = ml_collections.ConfigDict()
    c.teachers.base = ml_collections.ConfigDict(
        dict(
            path="",
            init_from="",
            train=ml_collections.ConfigDict(
                dict(
                    steps=0,
                    learning_rate=2e-3,
                    warmup_steps=100,
                    batch_size=16,
                    caption_dropout=0.1,
                    # Share of training times drawn uniformly instead of logit-normal (flow.sample_training_t).
                    uniform_t_fraction=0.0,
                    ema_decay=0.995,
                    task_ratio="1:1",
                    t2i_weights=dict(landscape=1.0, portrait=1.0, text=1.0),
                    edit_weights=dict(scene=1.0, enhance=1.0, object=1.0, text_edit=1.0, identity=1.0, style=1.0),
                )
            ),
        )
    )
    c.teachers.text = ml_collections.ConfigDict(
        dict(
            path="",
            init_from="base",
            train=ml_collections.ConfigDict(
                dict(
                    steps=0,
                    learning_rate=5e-4,
                    warmup_steps=20,
                    batch_size=16,
                    caption_dropout=0.1,
                    uniform_t_fraction=0.0,
                    ema_decay=0.99,
                    task_ratio="1:1",
                    t2i_weights=dict(text=1.0),
                    edit_weights=dict(text_edit=1.0),
                )
            ),
        )
    )

    # The few-step student and the fake score; both start from the base teacher's weights.
    c.student = ml_collections.ConfigDict(
        dict(
            num_steps=4,
            # The student's K input times, decreasing; () = the teacher's shifted Euler schedule.
            timesteps=(),
            # Between steps the student's x0 is re-noised with "fresh" noise (DMD2) or with the noise its velocity
            # implies ("predicted": Euler steps, the teacher's own sampler at initialisation).
            renoise="fresh",
            init_from="base",
            learning_rate=2e-6,
            # In [0, 1): > 0 keeps an EMA of the student, evaluated instead of the raw weights; 0 = off (no EMA state).
            ema_decay=0.0,
            first_step_fm_weight=0.0,  # DP-DMD's first-step flow-matching regulariser (paper 6.1); 0 = off
            # DMD2's GAN term (distill/gan.py): weight of the generator's non-saturating loss against real data, on
            # the DMD loss's scale. 0 = pure DMD, the paper's objective.
            gan_weight=0.0,
            gan_tasks=("t2i", "edit"),  # the tasks whose updates carry the GAN term (critic and generator)
            # DMD1's regression onto the base teacher's multi-step samples (distill/pairs.py), on the DMD loss's scale;
            # needs renoise="predicted". 0 = off. The bank holds `regression_batches` batches drawn once per run.
            regression_weight=0.0,
            regression_batches=512,
        )
    )
    c.fake_score = ml_collections.ConfigDict(
        dict(
            init_from="base",
            learning_rate=2e-6,
            updates_per_student=5,  # critic-to-student update ratio (DMD2's two time-scale rule)
            # How often each student step k is the one whose samples (its x0) the fake score learns; () = uniform, as
            # the generator's k always is (DMD2).
            step_probs=(),
            # Critic-only updates before the first student update (the fake score starts as the teacher's score, so the
            # first DMD gradients are only the CFG direction). toy: 300 changes neither task
            # (docs/experiments/objective.md).
            warmup_updates=0,
            # Weight of the discriminator's classification loss in the critic update (used when student.gan_weight > 0).
            # It also trains the fake trunk: at 1.0 it pulled the trunk off the student's score (toy fake-score loss
            # 0.15 -> 0.31); 0.01 leaves the fake score intact. The head has its own learning rate below.
            gan_weight=0.01,
            gan_head_learning_rate=2e-5,  # the head starts from scratch, the trunk from the teacher
        )
    )
    # Step-wise multi-teacher guidance: lambda[k, m](c) per student step k and condition c (task or task/category;
    # the most specific rule wins; each row sums to 1). The base teacher anchors the early steps, the text
    # specialist joins at the later steps of text-centric prompts.
    c.guidance = ml_collections.ConfigDict(
        dict(
            teachers=("base", "text"),
            # The teachers' real score: conditional (1.0) or CFG against the empty prompt (> 1). 1.0 because
            # Qwen-Image 2.1 is sampled without guidance: diffusers' QwenImage21Pipeline defaults to
            # true_cfg_scale=1.0 ("meant to be sampled without guidance") and guides only with a negative prompt and
            # a scale > 1. Its conditional velocity is then the distribution its pipeline samples, which the student
            # should match; guidance on top would target a distribution the model was not meant to sample. At 1.0
            # the unconditional pass is skipped, halving the teachers' cost. A teacher that needs CFG sets > 1: the
            # paper's Qwen-Image-2.0-Base is compared at 80 NFE (40 steps with CFG), but the paper gives no scale
            # for the DMD real score. The toy's teachers are trained with caption dropout for CFG (2.0, below).
            cfg_scale=1.0,
            cfg_rescale=0.0,
            # "shared" (DMD2): the student's sample is compared once, at a noise level in [t_min, t_max], with the
            # guided real score. "decoupled" (Decoupled DMD): the comparison with the fake score uses the conditional
            # teachers (CFG 1), and the CFG direction (guided - conditional) is applied on its own at noise levels in
            # [t_min, min(t_k, t_max)], never noisier than the trained student step's input.
            schedule="shared",
            t_min=0.02,
            t_max=0.98,
            weights=(
                ("*", ({"base": 1.0},) * 4),
                ("t2i/text", ({"base": 1.0}, {"base": 1.0}, {"base": 0.5, "text": 0.5}, {"base": 0.5, "text": 0.5})),
                (
                    "edit/text_edit",
                    ({"base": 1.0}, {"base": 1.0}, {"base": 0.5, "text": 0.5}, {"base": 0.5, "text": 0.5}),
                ),
            ),
        )
    )
    c.nonfinite_limit = 10  # consecutive skipped (non-finite) steps that stop the job

    c.sampling = ml_collections.ConfigDict(
        dict(
            teacher_steps=40,
            # The teachers' evaluation samples, as diffusers samples 2.1 by default (true_cfg_scale=1.0: 40 NFE);
            # > 1 guides against the empty prompt, like guidance.cfg_scale.
            cfg_scale=1.0,
            # A diffusers pipeline folder whose scheduler/scheduler_config.json sets the schedule of the teachers'
            # and the student's samplers, the student's times and the export ("": the first of the student's initial
            # teacher and the guiding teachers whose folder holds scheduler/; with none, the constants below).
            scheduler="",
            # Timestep shift: mu from the target token count, as Qwen-Image's scheduler does (dynamic shifting).
            base_seq_len=256,
            max_seq_len=4096,
            base_shift=0.5,
            max_shift=1.15,
            use_kv_cache=True,
        )
    )

    c.optim = ml_collections.ConfigDict(
        dict(
            learning_rate=2e-6,
            b1=0.9,
            b2=0.999,
            weight_decay=0.01,
            clip_norm=1.0,
            warmup_steps=100,
        )
    )

    # Mesh axes and logical-axis rules (see qwen_flash_jax/sharding.py). -1 takes the remaining devices; full
    # scale shards the parameters (fsdp).
    c.mesh = ml_collections.ConfigDict(
        dict(
            axes=(("data", 1), ("fsdp", -1), ("tensor", 1)),
            rules=(
                ("batch", ("data", "fsdp")),
                ("embed", "fsdp"),
                ("mlp", "tensor"),
                ("heads", "tensor"),
                ("kv_heads", "tensor"),
                ("vocab", "tensor"),
                ("act_mlp", "tensor"),
                ("act_heads", "tensor"),
            ),
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            steps=2000,
            # Distillation replicate: offsets the student's RNG and the data order, not the teachers (`seed` and
            # `data.seed` are in the toy teachers' cache key; this is not), so replicates share their teachers.
            seed=0,
            log_every=50,
            checkpoint_every=250,
            sample_every=500,  # student sample grids + small validation scores (0 = off)
            keep_checkpoints=2,
        )
    )

    c.eval = ml_collections.ConfigDict(
        dict(
            # "toy": score on the toy world's benchmarks with the toy judge. "none": write sample grids of student and
            # teachers on the first `unjudged_samples` prompts per task of the training data, unscored. "vlm": those
            # grids, then T2I-Bench / Editing-Bench images of every model scored by `vlm_judges` (eval/vlm_bench.py).
            judge="none",
            vlm_judges=(),  # each as vlm_judge's --judge: "NAME=MODEL@BASE_URL[,key_env=VAR]"
            vlm_t2i_bench="",  # a T2I bench JSONL; "" = the package's example set
            vlm_edit_bench="",  # an edit bench JSONL; "" = the package's example set
            vlm_concurrency=8,
            vlm_max_attempts=3,
            vlm_timeout=120.0,
            unjudged_samples=8,
            prompts_per_category=600,
            edits_per_category=250,
            seed=1234,
            probe_prompts_per_category=32,  # the periodic validation probe (train.sample_every)
            probe_edits_per_category=16,
        )
    )

    if arg == "toy":
        _toy_overrides(c)
    return c


def _toy_overrides(c):
    """Every difference of the toy world from the full-scale config above (assignments keep the fields' order)."""
    # A tiny transformer that trains on a laptop CPU.
    c.model.in_channels = 48
    c.model.out_channels = 48
    c.model.num_layers = 4
    c.model.attention_head_dim = 32
    c.model.num_attention_heads = 4
    c.model.context_in_dim = 128  # = the toy text encoder's output width: 2 feature layers x 64
    c.model.axes_dims_rope = (8, 12, 12)
    c.model.dtype = "float32"
    c.model.remat_policy = "none"
    c.model.scan_layers = False  # unrolled: the CPU teacher step is faster (docs/experiments/performance.md)

    c.text_encoder.kind = "toy"
    # The word embeddings beside the last layer (text/encoder.py says why).
    c.text_encoder.feature_layers = (0, -1)
    c.codec.kind = "space_to_depth"

    c.data.source = "toy_world"
    c.data.image_size = 32
    c.data.batch_size = 16
    c.data.max_prompt_tokens = 80
    c.data.edit_prompt_tokens = 0

    # The toy teachers are trained here (or come prebuilt); full-scale teachers are loaded from `path`.
    # ~19 min at ~4.8 steps/s on the 2-core CPU. Shorter is much weaker: the student initialised from a
    # 2000-step teacher scores T2I 1.48 / edit 1.30 on the validation probe, from this one 2.28 / 2.47.
    c.teachers.base.train.steps = 5400
    # 0.5: with no uniform times, the teacher never learned to start a sample from the prompt alone (wrong sky
    # colours).
    c.teachers.base.train.uniform_t_fraction = 0.5
    c.teachers.text.train.steps = 400
    c.teachers.text.train.uniform_t_fraction = 0.5

    # A low last time: the shifted schedule's last step from t=0.35 leaves 4-step samples blurry, and a last step
    # from 0.1 gains T2I +0.09 over (1.0, 0.8, 0.5, 0.2) (docs/experiments/toy_defaults.md, commit cf7869e).
    c.student.timesteps = (1.0, 0.7, 0.4, 0.1)
    c.student.renoise = "predicted"  # +0.10 T2I over fresh noise at the same times
    # With the fake score on the final samples, EMA 0.95 and 3 critic updates, T2I rises with the rate up to 5e-5
    # (2e-5 / 3e-5 / 4e-5 / 5e-5: 2.53 / 2.57 / 2.59 / 2.60, edits level) and 7e-5 overshoots (the probe falls
    # late, text prompts and edits lose; docs/experiments/toy_defaults.md, commit 81ce2fa).
    c.student.learning_rate = 5e-5
    # 0.99 lags ~100 of the 300 updates while T2I still climbs (0.95: T2I +0.019 at 2e-5, +0.016 at 3e-5;
    # docs/experiments/toy_defaults.md).
    c.student.ema_decay = 0.95
    c.student.regression_batches = 64

    c.fake_score.learning_rate = 1e-4
    # With the student at lr 5e-5, 2 gives T2I +0.039 over 3, edits level, and one batch fewer per update
    # (docs/experiments/toy_defaults.md, commit 81ce2fa).
    c.fake_score.updates_per_student = 2
    # The final samples only: edits +0.025 / +0.028 over () on two seeds, T2I level
    # (docs/experiments/toy_defaults.md).
    c.fake_score.step_probs = (0, 0, 0, 1)
    c.fake_score.gan_head_learning_rate = 1e-3

    c.guidance.cfg_scale = 2.0  # scores best with the toy judge (T2I 1.50 vs 1.33 at 4.0)
    # Decoupled: T2I +0.065 and edits +0.023 over shared, at 1.05x the time (docs/experiments/toy_defaults.md).
    c.guidance.schedule = "decoupled"
    c.sampling.cfg_scale = 2.0

    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 20

    # Data parallel: the toy parameters are a few MB and fsdp's weight all-gathers pure overhead (on emulated CPU
    # devices they are also what XLA:CPU can hang on: README, Tests).
    c.mesh.axes = (("data", -1), ("fsdp", 1), ("tensor", 1))

    c.train.steps = 300
    c.train.log_every = 25
    c.train.checkpoint_every = 50
    c.train.sample_every = 100

    c.eval.judge = "toy"
    # 96 / 48 narrow the paired 95% intervals to about +-0.05 (at 24 / 16 they were +-0.1, wide enough to hide a
    # real -0.04 behind a noisy +0.01); the whole evaluation still takes about a minute.
    c.eval.prompts_per_category = 96
    c.eval.edits_per_category = 48
    c.eval.probe_prompts_per_category = 8
    c.eval.probe_edits_per_category = 4
