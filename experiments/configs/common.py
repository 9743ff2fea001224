"""Defaults shared by every config; each config file overrides what it needs."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Data
  c.dataset = "digits"
  c.data_dir = ""            # '' -> default search path / TFDS_DATA_DIR
  c.val_holdout = 0          # >0: hold out this many train images and evaluate on them
  c.eval_on = "auto"         # auto (test, or validation when val_holdout > 0) | test | validation
  c.augment = True
  # Model and quantization
  c.model = "vig_digits"
  c.method = "fp"            # fp | minmax | lsq | pq | pq+aqd | pq+sqd | pq+aqd+sqd
  c.w_bits = 4
  c.a_bits = 4
  c.lam = 2.5                # PQ's lambda: both ablations' W2A2 validation winner (docs/METHOD.md)
  c.w_symmetric = True       # weights: symmetric grid, codes +-(2^(b-1) - 1)
  c.a_symmetric = False      # activations: asymmetric grid, 2^b levels over [lo, hi]
  c.w_granularity = "channel"  # channel | tensor
  c.a_granularity = "tensor"   # channel | tensor
  c.ema_momentum = 0.9       # activation-range EMA
  # LSQ's activation grid where the input is a GELU output (recipe.GELU_INPUTS): signed |
  # unsigned (LSQ's after-ReLU grid, the tail below 0 clipped) | offset (LSQ+'s learnable
  # offset); elsewhere signed. Range quantizers ignore it. CPU W2A2 validation (issue 15,
  # docs/METHOD.md): signed 88.32 / unsigned 88.52 / offset 87.88 % (within the noise).
  c.lsq_gelu_grid = "unsigned"
  # Range quantizers: gradient to lo/hi and through PQ's mu, sigma (True), or stop-gradient
  # (SPEC). CPU W2A2 validation with pq (issue 15): False 88.06 / True 87.62 %.
  c.range_grad = False
  c.quantize_stem = False
  c.quantize_head = False
  c.graph_impl = "dense"     # dense | segment (jraph)
  c.dtype = "float32"        # compute dtype; params stay float32
  c.drop_path = 0.0
  c.dropout = 0.0
  # Self-distillation (used only when the method names aqd / sqd). The GPU ablation's W2A2
  # validation winners (docs/METHOD.md); SPEC's starting point was 1, 1, 1, 0.5, 1.
  c.aqd_alpha = 0.1
  c.aqd_tau = 2.0
  c.sqd_beta = 3.0
  c.sqd_p = 0.25
  c.sqd_temperature = 2.0
  # The forms (qgnn_jax.distill.AQD_FORMS / SQD_FORMS; docs/METHOD.md, "Distillation
  # forms"), and speq's activation bit choices: "auto" = {b+2, 8, fp} besides the
  # student's b, or a list such as "4,8,fp".
  c.aqd_form = "channel_mse"
  c.sqd_form = "bypass_kl"
  c.sqd_bits = "auto"
  # Classic KD from the frozen FP model of init_from (method '...+kd'): its weight; the
  # temperature is sqd_temperature.
  c.kd_weight = 1.0
  c.label_smoothing = 0.0
  # Optimisation
  c.optimizer = "adamw"      # adamw | sgd
  c.lr = 1e-3
  c.quant_lr = -1.0          # LSQ step lr; <= 0 -> same as lr
  c.weight_decay = 0.05
  c.warmup_epochs = 1.0
  c.grad_clip = 0.0
  c.num_epochs = 10.0
  c.num_steps = 0            # > 0 overrides num_epochs
  c.batch_size = 128
  c.eval_batch_size = 500
  c.seed = 0
  # Bookkeeping
  c.init_from = ""           # another run's workdir / checkpoint dir (QAT from FP)
  # Where the weights a run starts from came from, when not from a run of this project:
  # experiments.convert_official writes 'official <file> sha256:<hex> ...'.
  c.source = ""
  c.log_every = 50
  c.eval_every_epochs = 1.0  # 0 -> only at the end
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.stop_at_step = 0         # > 0: stop (resumably) at this step, as a crash would
  c.restore_step = 0         # > 0: resume from this kept step, not the newest
  c.progress = True
  # Two-phase pipelines (quick start): FP pretraining, then QAT initialised from it
  c.pretrain_fp_epochs = 0.0
  # Post-training quantization of init_from's model (no training; qgnn_jax/ptq_run.py):
  # calibrate on ptq_batches training batches, then search each site's activation range
  # ("mse": PQ's lambda / min-max's clip minimising the quantization error; "none")
  c.ptq = False
  c.ptq_batches = 8
  c.ptq_search = "mse"
  return c
