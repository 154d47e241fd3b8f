"""The collective report read from optimised HLO (loopjax.parallel.hlo) and the roofline bound.

The snippet below is written in the forms the TPU compiler (libtpu 0.0.52) prints for the train
step: an S_max loop as a `while` whose body runs the block under a `conditional`, a layer scan
`while` outside it, async collective-permute pairs, TPU's reduce-scatter as a kCustom fusion
around an all-reduce, tuple all-reduces, and mesh / explicit / iota replica groups; plus the
generic `async-start` wrapper and an NCCL-style custom call other compilers emit.
"""

import os
import re

import pytest

from loopjax.parallel import hlo, roofline
from loopjax.parallel.topology import have_libtpu

LOOP = 'op_name="jit(train_step)/jvp(LoopedTransformer)/loop/while'
HLO = f"""HloModule jit_train_step, entry_computation_layout={{()->f32[]}}

%add.1 (x: f32[], y: f32[]) -> f32[] {{
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add = f32[] add(%x, %y)
}}

%all-reduce-scatter.3 (input.3: bf16[64,2,32]) -> bf16[16,2,32] {{
  %input.3 = bf16[64,2,32]{{2,0,1:T(8,128)(2,1)}} parameter(0)
  %all-reduce.180 = bf16[64,2,32]{{2,0,1:T(8,128)(2,1)}} all-reduce(%input.3), channel_id=68, replica_groups={{{{0,1,2,3}}}}, use_global_device_ids=true, to_apply=%add.1, frontend_attributes={{from-cross-replica-sharding="true"}}
  %partition-id.65 = u32[] partition-id()
  ROOT %dynamic-slice.1 = bf16[16,2,32]{{2,0,1:T(8,128)(2,1)}} dynamic-slice(%all-reduce.180, %partition-id.65), dynamic_slice_sizes={{16,2,32}}
}}

%run_block (p.1: f32[4,81,64], w.1: bf16[16,2,32], g.1: bf16[64,2,32]) -> (f32[4,81,64]) {{
  %p.1 = f32[4,81,64]{{1,2,0:T(8,128)}} parameter(0)
  %w.1 = bf16[16,2,32]{{2,0,1:T(8,128)(2,1)}} parameter(1)
  %g.1 = bf16[64,2,32]{{2,0,1:T(8,128)(2,1)}} parameter(2)
  %all-gather.7 = bf16[64,2,32]{{1,2,0:T(8,128)(2,1)}} all-gather(%w.1), channel_id=14, replica_groups=mesh['axis_0'=4] {{'axis_0'}}, dimensions={{0}}, use_global_device_ids=true, metadata={{{LOOP}/body/closed_call/scan/cond/branch_1_fun/scan.run/block/layer/attn/dot_general"}}
  %bitcast.1414 = bf16[1,4,16]{{2,1,0:T(4,128)(2,1)}} bitcast(%w.1)
  %collective-permute-start = (bf16[1,4,16]{{2,1,0:T(4,128)(2,1)S(1)}}, bf16[1,4,16]{{2,1,0:T(4,128)(2,1)}}, u32[]{{:S(2)}}, u32[]{{:S(2)}}) collective-permute-start(%bitcast.1414), channel_id=2, source_target_pairs={{{{0,1}},{{1,2}},{{2,3}},{{3,0}}}}, metadata={{{LOOP}/body/closed_call/scan/cond/branch_1_fun/scan.run/block/layer/adaln/dot_general"}}
  %collective-permute-done = bf16[1,4,16]{{2,1,0:T(4,128)(2,1)}} collective-permute-done(%collective-permute-start)
  %fusion.7 = bf16[16,2,32]{{2,0,1:T(8,128)(2,1)}} fusion(%g.1), kind=kCustom, calls=%all-reduce-scatter.3, metadata={{{LOOP}/body/closed_call/scan/cond/branch_1_fun/scan.run/block/layer/attn/dot_general"}}
  ROOT %tuple.1 = (f32[4,81,64]{{1,2,0:T(8,128)}}) tuple(%p.1)
}}

%skip_block (p.2: f32[4,81,64], w.2: bf16[16,2,32], g.2: bf16[64,2,32]) -> (f32[4,81,64]) {{
  %p.2 = f32[4,81,64]{{1,2,0:T(8,128)}} parameter(0)
  ROOT %tuple.2 = (f32[4,81,64]{{1,2,0:T(8,128)}}) tuple(%p.2)
}}

%loop_body (wide.param.1: (s32[], f32[4,81,64])) -> (s32[], f32[4,81,64]) {{
  %wide.param.1 = (s32[]{{:T(128)}}, f32[4,81,64]{{1,2,0:T(8,128)}}) parameter(0)
  %i.1 = s32[]{{:T(128)}} get-tuple-element(%wide.param.1), index=0
  %h.1 = f32[4,81,64]{{1,2,0:T(8,128)}} get-tuple-element(%wide.param.1), index=1
  %all-reduce.200 = (f32[64]{{0:T(128)}}, f32[64]{{0:T(128)}}) all-reduce(%h.1, %h.1), channel_id=278, replica_groups=mesh['axis_0'=4] {{'axis_0'}}, use_global_device_ids=true, to_apply=%add.1, metadata={{{LOOP}/body/closed_call/scan/norm/mul"}}
  %run.1 = pred[] constant(true)
  %conditional.26 = (f32[4,81,64]{{1,2,0:T(8,128)}}) conditional(%run.1, %h.1, %h.1), branch_computations={{%skip_block, %run_block}}, metadata={{{LOOP}/body/closed_call/scan/cond"}}
  ROOT %tuple.3 = (s32[]{{:T(128)}}, f32[4,81,64]{{1,2,0:T(8,128)}}) tuple(%i.1, %h.1)
}}

%loop_cond (wide.param.2: (s32[], f32[4,81,64])) -> pred[] {{
  %constant.3989 = s32[]{{:T(128)}} constant(12)
  %wide.param.2 = (s32[]{{:T(128)}}, f32[4,81,64]{{1,2,0:T(8,128)}}) parameter(0)
  %gte.2 = s32[]{{:T(128)}} get-tuple-element(%wide.param.2), index=0
  ROOT %lt.379 = pred[]{{:T(512)}} compare(%gte.2, %constant.3989), direction=LT, metadata={{{LOOP}/cond/lt"}}
}}

%tail_body (wide.param.3: (s32[], bf16[1,768,768])) -> (s32[], bf16[1,768,768]) {{
  %wide.param.3 = (s32[]{{:T(128)}}, bf16[1,768,768]{{2,1,0}}) parameter(0)
  %k.3 = bf16[1,24,768]{{2,1,0}} get-tuple-element(%wide.param.3), index=1
  %all-gather.71 = bf16[1,768,768]{{1,0,2:T(8,128)(2,1)}} all-gather(%k.3), channel_id=3, replica_groups=[1,32]<=[32], dimensions={{1}}, metadata={{op_name="jit(train_step)/jvp(LoopedTransformer)/LoopedTransformer.decode/tail/while/body/closed_call/scan/layer/attn/convert_element_type"}}
  ROOT %t.3 = (s32[]{{:T(128)}}, bf16[1,768,768]{{2,1,0}}) tuple(%k.3, %all-gather.71)
}}

%tail_cond (wide.param.4: (s32[], bf16[1,768,768])) -> pred[] {{
  %wide.param.4 = (s32[]{{:T(128)}}, bf16[1,768,768]{{2,1,0}}) parameter(0)
  %gte.4 = s32[] get-tuple-element(%wide.param.4), index=0
  %constant.9 = s32[] constant(9)
  ROOT %lt.4 = pred[] compare(%gte.4, %constant.9), direction=LT
}}

%wrapped_all_to_all (p.5: f32[32,16,1,144]) -> f32[32,16,1,144] {{
  %p.5 = f32[32,16,1,144]{{3,2,1,0}} parameter(0)
  ROOT %all-to-all.18 = f32[32,16,1,144]{{3,2,1,0}} all-to-all(%p.5), channel_id=7, replica_groups={{{{0,1,2,3,4,5,6,7}}}}, dimensions={{0}}
}}

ENTRY %main.195_spmd (param.1: f32[32,16,1,144], param.2: bf16[16,1024,768], param.3: bf16[1,768,768]) -> f32[] {{
  %param.1 = f32[32,16,1,144]{{3,2,1,0}} parameter(0)
  %param.2 = bf16[16,1024,768]{{2,1,0}} parameter(1)
  %param.3 = bf16[1,768,768]{{2,1,0}} parameter(2)
  %init.1 = (s32[]{{:T(128)}}, f32[4,81,64]{{1,2,0:T(8,128)}}) tuple(%param.1)
  %while.46 = (s32[]{{:T(128)}}, f32[4,81,64]{{1,2,0:T(8,128)}}) while(%init.1), condition=%loop_cond, body=%loop_body, metadata={{{LOOP}" stack_frame_id=218}}
  %init.2 = (s32[]{{:T(128)}}, bf16[1,768,768]{{2,1,0}}) tuple(%param.3)
  %while.47 = (s32[]{{:T(128)}}, bf16[1,768,768]{{2,1,0}}) while(%init.2), condition=%tail_cond, body=%tail_body, metadata={{op_name="jit(train_step)/jvp(LoopedTransformer)/LoopedTransformer.decode/tail/while"}}
  %all-gather-start.1 = (bf16[16,1024,768]{{2,1,0}}, bf16[64,1024,768]{{2,1,0}}) all-gather-start(%param.2), channel_id=9, replica_groups=[2,4]<=[8], dimensions={{0}}
  %all-gather-done.1 = bf16[64,1024,768]{{2,1,0}} all-gather-done(%all-gather-start.1)
  %all-reduce.63 = bf16[16,1024,768]{{2,1,0}} all-reduce(%param.2), channel_id=12, replica_groups={{{{0,1}},{{2,3}},{{4,5}},{{6,7}}}}, to_apply=%add.1
  %a2a-start = ((f32[32,16,1,144]{{3,2,1,0}}), f32[32,16,1,144]{{3,2,1,0}}, u32[]) async-start(%param.1), calls=%wrapped_all_to_all
  %a2a-done = f32[32,16,1,144]{{3,2,1,0}} async-done(%a2a-start)
  %nccl.1 = bf16[16,1024,768]{{2,1,0}} custom-call(%param.2), custom_call_target="__nccl_all_reduce_start"
  %cudnn.1 = bf16[16,1024,768]{{2,1,0}} custom-call(%param.2), custom_call_target="__cudnn$fmhaSoftmax"
  ROOT %r = f32[] constant(0)
}}
"""


def _by_name(colls):
  return {c["name"]: c for c in colls}


def test_every_collective_form_is_found_once_with_its_op_and_bytes():
  c = _by_name(hlo.collectives(HLO, loop_fraction=0.5))
  assert set(c) == {"all-gather.7", "collective-permute-start", "fusion.7", "all-reduce.200",
                    "all-gather.71", "all-gather-start.1", "all-reduce.63", "a2a-start",
                    "nccl.1"}  # not the all-reduce inside the fusion, nor the wrapped all-to-all
  ops = {n: x["op"] for n, x in c.items()}
  assert ops["fusion.7"] == "reduce-scatter" and ops["a2a-start"] == "all-to-all"
  assert ops["nccl.1"] == "all-reduce" and ops["collective-permute-start"] == "collective-permute"
  # A reduce-scatter reduces its full operand; a gather produces its full result; a tuple
  # all-reduce moves every element; a permute's (operand, result, context) counts once.
  assert c["fusion.7"]["bytes"] == 64 * 2 * 32 * 2
  assert c["all-gather-start.1"]["bytes"] == 64 * 1024 * 768 * 2
  assert c["all-reduce.200"]["bytes"] == max(2 * 64 * 4, 2 * 4 * 81 * 64 * 4)
  assert c["collective-permute-start"]["bytes"] == 4 * 16 * 2
  assert c["a2a-start"]["bytes"] == 32 * 16 * 144 * 4
  async_ = {n for n, x in c.items() if x["async"]}
  assert async_ == {"collective-permute-start", "all-gather-start.1", "a2a-start", "nccl.1"}


def test_loop_membership_and_runs_follow_the_call_graph():
  c = _by_name(hlo.collectives(HLO, loop_fraction=0.5))
  in_loop = {n for n, x in c.items() if x["in_loop"]}
  assert in_loop == {"all-gather.7", "collective-permute-start", "fusion.7", "all-reduce.200"}
  # Trip count 12 from the condition; the block's branch runs half the iterations; the tail
  # scan's 9 layers each gather once; ENTRY runs once.
  assert c["all-reduce.200"]["runs"] == 12
  assert c["all-gather.7"]["runs"] == c["fusion.7"]["runs"] == 6
  assert c["all-gather.71"]["runs"] == 9 and c["all-reduce.63"]["runs"] == 1
  t = hlo.totals(list(c.values()))
  assert t["in_loop"]["count"] == 4 and t["count"] == 9
  assert t["in_loop"]["bytes"] == sum(c[n]["bytes"] * c[n]["runs"] for n in in_loop)
  assert t["sync"]["count"] + t["async"]["count"] == t["count"]


def test_group_sizes_and_wire_bytes_use_the_ring_factors():
  c = _by_name(hlo.collectives(HLO))
  assert c["all-gather.7"]["group"] == 4  # mesh['axis_0'=4] {'axis_0'}
  assert c["fusion.7"]["group"] is None  # inner replica group is not the fusion's
  assert c["all-gather-start.1"]["group"] == 4  # iota [2,4]<=[8]
  assert c["all-gather.71"]["group"] == 32
  assert c["all-reduce.63"]["group"] == 2  # {{0,1},{2,3},...}
  assert c["all-gather.7"]["wire_bytes"] == pytest.approx(c["all-gather.7"]["bytes"] * 3 / 4)
  assert c["all-reduce.63"]["wire_bytes"] == pytest.approx(c["all-reduce.63"]["bytes"] * 2 / 2)
  assert c["collective-permute-start"]["wire_bytes"] == c["collective-permute-start"]["bytes"]


def test_activation_flags_global_per_shard_and_expected():
  colls = hlo.collectives(HLO)
  # Global batch 64 x 1024 over 4 batch shards: 16 rows per device.
  c = _by_name(hlo.classify(colls, batch=64, length=1024, batch_shards=4))
  assert c["all-gather-start.1"]["activation"] == "global"
  assert c["all-reduce.63"]["activation"] == "per_shard"
  assert c["all-reduce.63"]["expected"] is None  # no tensor axis: nothing calls for it
  assert c["all-gather.71"]["activation"] is None and c["fusion.7"]["activation"] is None
  # With tensor = 2 the same per-shard all-reduce (group 2) is tensor parallelism's.
  c = _by_name(hlo.classify(hlo.collectives(HLO), batch=64, length=1024, batch_shards=4,
                            tensor=2))
  assert c["all-reduce.63"]["expected"] and c["all-gather-start.1"]["expected"] is None
  # A weight gradient whose dimension happens to equal rows x length (8 x 1024 = 8192, the
  # adaLN kernel of a 4096-wide model) is not an activation.
  weight = ("  %all-reduce.9 = (f32[128,8192]{1,0}, f32[8192]{0}) all-reduce(%a, %b), "
            "replica_groups={{0,1}}, to_apply=%add.1")
  (w,) = hlo.classify(hlo.collectives(weight), batch=512, length=1024, batch_shards=64)
  assert w["activation"] is None


def test_roofline_against_a_hand_computed_bound():
  peak, hbm, ici = roofline.CHIPS["v5p"]
  flops, model = 2 * peak * 0.010, peak * 0.015  # 20 ms of compute, 15 of it useful
  r = roofline.estimate("v5p", flops=flops, hbm_bytes=hbm * 0.005, model_flops=model,
                        loop_share=0.25, sync_wire=ici * 0.002, async_loop_wire=ici * 0.008,
                        async_other_wire=ici * 0.001)
  # loop region: max(5 ms, 8 ms); rest: max(15 ms, 1 ms); plus 2 ms synchronous.
  assert r["step_s_lower_bound"] == pytest.approx(0.008 + 0.015 + 0.002)
  assert r["exposed_comm_share"] == pytest.approx((0.025 - 0.020) / 0.025)
  assert r["mfu_upper_bound"] == pytest.approx(0.015 / 0.025)
  assert r["bound"] == "compute"
  hidden = roofline.estimate("v5p", flops=flops, hbm_bytes=0, model_flops=model, loop_share=0.5,
                             sync_wire=0, async_loop_wire=ici * 0.001, async_other_wire=0)
  assert hidden["exposed_comm_share"] == 0 and hidden["step_s_lower_bound"] == pytest.approx(0.02)
  assert roofline.generation("TPU v5 lite") == "v5e" and roofline.generation("TPU v5") == "v5p"
  with pytest.raises(ValueError, match="no published peaks"):
    roofline.estimate("cpu", flops=1, hbm_bytes=1, model_flops=1, loop_share=0, sync_wire=0,
                      async_loop_wire=0, async_other_wire=0)


@pytest.mark.skipif(not have_libtpu(), reason="TPU compiles need the libtpu wheel (test extra)")
@pytest.mark.parametrize("loop_weights", ["gathered", "per_iteration"])
def test_report_of_a_real_tpu_compile(loop_weights):
  from loopjax.parallel.topology import tpu_topology_devices
  from loopjax.train import memory
  from loopjax.config.load import load_config
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  tiny = ["--config.model.width=64", "--config.model.num_layers=3", "--config.model.num_heads=2",
          "--config.model.cond_dim=16", "--config.train.batch_size=16",
          "--config.loops.train=uniform:1:2", "--config.model.dtype=bfloat16",
          f"--config.model.loop_weights={loop_weights}", "--config.model.loss_chunk=27"]
  config = load_config(os.path.join(root, "experiments", "sudoku.py"), tiny)
  r = memory.memory_report(config, tpu_topology_devices("v5p:2x2x1"),
                           {"data": 1, "fsdp": 4, "tensor": 1})
  c = r["collectives"]
  assert c["by_op"].get("reduce-scatter", 0) > 0  # TPU's kCustom fusions, seen as such
  # The call graph and the source scopes agree on what is inside the loop (a collective the
  # compiler hoisted out of the loop may keep its loop scope, so only one way round).
  for x in c["list"]:
    assert not x["in_loop"] or re.search(r"/loop/(vmap\(\)/)?while/body/", x["scope"]), x
    if not x["in_loop"]:  # no E[S] / S_max factor outside the loop: whole trip counts
      assert x["runs"] == int(x["runs"]) >= 1, x
  # The loss runs in 3 chunks of the length (a loop of its own): the output head's weight is
  # gathered once before it and its gradient reduced once after it, never per chunk.
  assert not [x for x in c["list"] if "/output/while/body/" in x["scope"]], "per-chunk collective"
  if loop_weights == "gathered":  # the block's weights are gathered once, before the loop
    assert c["in_loop"]["count"] == 0, [x for x in c["list"] if x["in_loop"]][:4]
  else:  # gathered in the block's branch: E[S] = 1.5 of the S_max = 2 iterations
    assert c["in_loop"]["count"] > 0
    assert {x["runs"] for x in c["list"] if x["in_loop"]} <= {1.5, 2.0, 3.0}
  assert r["activation_collectives"] == [], r["activation_collectives"][:4]
  rl = r["roofline"]
  assert rl["chip"] == "v5p" and 0 < rl["mfu_upper_bound"] <= 1
  assert rl["step_s_lower_bound"] >= r["flops"]["executed"] / rl["peak_flops"]


def test_a_snippet_of_lines_without_computations_is_read_too():
  line = next(l for l in HLO.splitlines() if "%all-gather.71 =" in l)
  (c,) = hlo.collectives(line)
  assert c["op"] == "all-gather" and c["bytes"] == 768 * 768 * 2 and c["group"] == 32
  assert not c["in_loop"] and c["runs"] == 1


CPU_FORMS = """HloModule m

%wrapped_compare_computation.5 (p.0: s32[], p.1: s32[]) -> pred[] {
  %p.0 = s32[] parameter(0)
  %p.1 = s32[] parameter(1)
  ROOT %lt.1 = pred[] compare(%p.0, %p.1), direction=LT
}

%region_31 (param.17: (s32[], f32[8,81,64])) -> pred[] {
  %param.17 = (s32[], f32[8,81,64]{2,1,0}) parameter(0)
  %constant.1385 = s32[] constant(5)
  %gte.1 = s32[] get-tuple-element(%param.17), index=0
  ROOT %wrapped_compare.5 = pred[] fusion(%gte.1, %constant.1385), kind=kLoop, calls=%wrapped_compare_computation.5
}

%body_a (param.1: (s32[], f32[8,81,64])) -> (s32[], f32[8,81,64]) {
  %param.1 = (s32[], f32[8,81,64]{2,1,0}) parameter(0)
  %h.1 = f32[8,81,64]{2,1,0} get-tuple-element(%param.1), index=1
  %all-reduce.1 = f32[8,81,64]{2,1,0} all-reduce(%h.1), replica_groups={{0,1}}, to_apply=%wrapped_compare_computation.5
  ROOT %t.1 = (s32[], f32[8,81,64]{2,1,0}) tuple(%h.1, %all-reduce.1)
}

%body_b (param.2: (s32[], f32[8,81,64])) -> (s32[], f32[8,81,64]) {
  %param.2 = (s32[], f32[8,81,64]{2,1,0}) parameter(0)
  %h.2 = f32[8,81,64]{2,1,0} get-tuple-element(%param.2), index=1
  %all-reduce.2 = f32[8,81,64]{2,1,0} all-reduce(%h.2), replica_groups={{0,1}}, to_apply=%wrapped_compare_computation.5
  ROOT %t.2 = (s32[], f32[8,81,64]{2,1,0}) tuple(%h.2, %all-reduce.2)
}

ENTRY %main (p: (s32[], f32[8,81,64])) -> (s32[], f32[8,81,64]) {
  %p = (s32[], f32[8,81,64]{2,1,0}) parameter(0)
  %w.1 = (s32[], f32[8,81,64]{2,1,0}) while(%p), condition=%region_31, body=%body_a
  ROOT %w.2 = (s32[], f32[8,81,64]{2,1,0}) while(%w.1), condition=%region_31, body=%body_b, backend_config={"known_trip_count":{"n":"3"}}
}
"""


def test_trip_counts_from_a_fused_compare_or_the_compilers_record():
  c = _by_name(hlo.collectives(CPU_FORMS))
  assert c["all-reduce.1"]["runs"] == 5  # i < 5, the compare inside a fusion (XLA:CPU's form)
  assert c["all-reduce.2"]["runs"] == 3  # known_trip_count wins over the condition
