"""Loop counts S of the looped block: the training distribution and the inference policies.

Training draws one S per step from a `LoopDistribution`, parsed once from config `loops.train`:
  "S" or "fixed:S"     always S
  "uniform:LO:HI"      S ~ Uniform{LO..HI} (paper: uniform:1:12)
  "table:p1,p2,..."    P(S = k) = p_k for k = 1..len(table) (normalised)
Its largest S is the model's S_max.

At inference, loops are a knob: any S >= 1 works, S > S_max included. A `LoopPolicy` says how
many loops run at each denoising step and is parsed from one spec string (the `--loops` flag):

  "8" or "fixed:8"        fixed S = 8 at every step (the same grammar as training's
                          `loops.train`, where "8" is fixed:8 too).
  "adaptive:TAU[:MIN[:MAX]]"  per sequence, stop once the relative change of the looped block's
                          hidden state on masked positions, ||h_i - h_{i-1}|| / ||h_{i-1}||,
                          falls below TAU; at least MIN (default 1) and at most MAX (default
                          S_max of the model) iterations.
  "time:A:B"              S ramps linearly with the diffusion time t: S = round(A + (B - A) t),
                          so A loops near the clean end (t = 0), B near all-masked (t = 1).
  "mask:A:B"              the same with r = the fraction of the initially masked positions that
                          are still masked (1 at the first step, -> 0 at the last).
  "time:S1,S2,...,Sk"     a table: [0, 1] cut into k equal bins, bin j (in t or r) runs S_{j+1}.

Each form is one class (`FixedLoops`, `AdaptiveLoops`, `ScheduledLoops`) registered under its
prefix; `LoopPolicy.parse` dispatches on the prefix, and everything downstream (the denoiser,
the likelihood, legends) calls the policy's methods, so a new policy is one registered class.
`resolve_policy(cfg, spec)` binds a spec to one model (its S_max fills the defaults; a learned
loop-embedding table refuses S > S_max). A loaded model's `Loaded.policy` (loopjax.io.load)
calls it once per `--loops` value; the evaluations take the policy it returns. The one other
caller is the end-of-training report, for the model still in memory (evaluate/final.py).

`run_loops` is the executor every policy shares: a `lax.while_loop` over single iterations that
continues while any sequence is active, with finished sequences frozen by `jnp.where`. So the work
follows the loops actually executed, never a fixed maximum, and one compiled program serves every
S. It is a pure function of a per-iteration step callback: the diffusion package stays
independent of the model (the binding lives in loopjax.inference.denoiser).

Per-sequence and executed compute. The loop body runs on the whole batch (static shapes), so a
model call costs the loops of its slowest sequence for every row: `batch_loops` = max over the
sequences. An adaptive policy's per-sequence loop counts are what each sequence needed (its
result is frozen there), not what was spent; the executed figure is the batch maximum. A "time"
schedule gives every sequence of a call the same S (t is shared by the batch), so its
per-sequence and executed compute are equal by construction, and "mask" schedules are equal
whenever the sequences' masked fractions fall in the same bin. `time_table` turns the loops an
adaptive run spent per denoising step into such a schedule.
"""

from loopjax.loops.executor import batch_loops, relative_change, run_loops, time_table
from loopjax.loops.policies import (S_MAX_WORDS, AdaptiveLoops, FixedLoops, LoopPolicy,
                                    PolicyArgError, ScheduledLoops, register, resolve_policy,
                                    split_specs)
from loopjax.loops.training import LoopDistribution
