"""The study's sizes. `cpu` fits one hour on 2 CPU cores, `gpu` is ~90x its training compute
for one H100, `tiny` runs every branch in seconds for the tests.

Keys: model (the base MDM's shape), seq_len / batch_size (bytes per row, rows per step),
baseline_steps (the MDM's budget B in steps; every other model is FLOP-matched to it),
mdm_extend (the MDM trains this many times longer, so its curve reaches past every LoopMDM
budget), units (checkpoints per B of the MDM; LoopMDM-type runs keep 8 per run and are scored
at 1/8, 1/4, 1/2 and 1 of their budget), lrs (tried per model on lr_seed, which is not
reported), seeds (reported), eval_rows / eval_batch / time_points (the held-out set and its
time grid), loop_sweep / taus (inference loops and adaptive thresholds), attention_rows.
"""

DEFAULT_CORPUS = "~/fortunes/usr/share/games/fortunes"

PRESETS = {
    "cpu": dict(model=dict(width=32, num_layers=12, num_heads=2, cond_dim=16),
                seq_len=128, batch_size=32, baseline_steps=400, warmup_steps=10, mdm_extend=3,
                units=16, lrs=(3e-3, 6e-3, 1.2e-2, 2.4e-2), lr_seed=100, seeds=(0, 1, 2),
                ema_decay=0.999,
                eval_rows=96, eval_batch=8, time_points=16,
                loop_sweep=(1, 2, 6, 12, 24), taus=(0.05, 0.01), attention_rows=8,
                corpus=DEFAULT_CORPUS),
    # ~90x the cpu preset's training FLOPs: 4x width (~16x per step), 2x batch, 4.5x steps.
    "gpu": dict(model=dict(width=128, num_layers=12, num_heads=4, cond_dim=64),
                seq_len=128, batch_size=64, baseline_steps=1800, warmup_steps=60,
                mdm_extend=3, units=16, lrs=(1e-3, 2e-3, 4e-3), lr_seed=100, seeds=(0, 1, 2),
                ema_decay=0.999, eval_rows=256, eval_batch=32, time_points=32,
                loop_sweep=(1, 2, 6, 12, 24), taus=(0.05, 0.01), attention_rows=32,
                corpus=DEFAULT_CORPUS),
    # Every branch at the fewest programs and checkpoints: two lrs (a choice), two seeds (the
    # per-seed pairing), an MDM curve of 4 checkpoints (3 for its end slope), and loop counts 1,
    # S_max and beyond it (each claim's path).
    "tiny": dict(model=dict(width=16, num_layers=4, num_heads=2, cond_dim=8),
                 seq_len=32, batch_size=4, baseline_steps=32, warmup_steps=2, mdm_extend=2,
                 units=2, lrs=(1e-3, 3e-3), lr_seed=100, seeds=(0, 1), ema_decay=0.9,
                 eval_rows=8, eval_batch=2, time_points=4, loop_sweep=(1, 3, 6),
                 taus=(0.05,), attention_rows=2, corpus=None, block=(1, 3), s_max=3,
                 ablation_s_max=2),
}
