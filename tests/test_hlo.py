"""Reading compiled programs (vidlankd_jax/hlo.py): per-instruction FLOPs and bytes, and matmul
FLOPs per step with loops counted by their trip counts. No TPU or libtpu needed."""

import jax
import jax.numpy as jnp

from vidlankd_jax import hlo

# A fused batched matmul as XLA on TPU writes it: a convolution over a dilated input whose window
# touches one real element in four (out[o] = lhs[o] x rhs[o]^T: 4 batches of [16, 8] x [8, 16]),
# an in-place update of one row of a large buffer, and a dynamic slice read of one row (also
# from inside a nested fusion).
SNIPPET = """HloModule snippet

%fused_conv (param_0: bf16[4,16,8], param_1: bf16[4,16,8]) -> f32[4,16,16] {
  %param_0 = bf16[4,16,8]{2,1,0} parameter(0)
  %param_1 = bf16[4,16,8]{2,1,0} parameter(1)
  ROOT %convolution-base-dilated.1 = f32[4,16,16]{2,1,0} convolution(%param_1, %param_0), window={size=4 stride=3 lhs_dilate=4}, dim_labels=0bf_0oi->0bf
}

%fused_update (param_0.1: f32[1024,256], param_1.1: f32[1,256], param_2: s32[]) -> f32[1024,256] {
  %param_0.1 = f32[1024,256]{1,0} parameter(0)
  %param_1.1 = f32[1,256]{1,0} parameter(1)
  %param_2 = s32[] parameter(2)
  %constant.0 = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[1024,256]{1,0} dynamic-update-slice(%param_0.1, %param_1.1, %param_2, %constant.0)
}

%fused_read (param_0.2: f32[1024,256], param_1.2: s32[]) -> f32[1,256] {
  %param_0.2 = f32[1024,256]{1,0} parameter(0)
  %param_1.2 = s32[] parameter(1)
  %constant.1 = s32[] constant(0)
  ROOT %dynamic-slice.1 = f32[1,256]{1,0} dynamic-slice(%param_0.2, %param_1.2, %constant.1), dynamic_slice_sizes={1,256}
}

%fused_outer (param_0.3: f32[1024,256], param_1.3: s32[]) -> f32[1,256] {
  %param_0.3 = f32[1024,256]{1,0} parameter(0)
  %param_1.3 = s32[] parameter(1)
  %inner = f32[1,256]{1,0} fusion(%param_0.3, %param_1.3), kind=kLoop, calls=%fused_read
  ROOT %negate.1 = f32[1,256]{1,0} negate(%inner)
}

ENTRY %main (a: bf16[4,16,8], b: bf16[4,16,8], buffer: f32[1024,256], row: f32[1,256], i: s32[]) -> (f32[4,16,16], f32[1024,256], f32[1,256], f32[1,256]) {
  %a = bf16[4,16,8]{2,1,0} parameter(0)
  %b = bf16[4,16,8]{2,1,0} parameter(1)
  %buffer = f32[1024,256]{1,0} parameter(2)
  %row = f32[1,256]{1,0} parameter(3)
  %i = s32[] parameter(4)
  %conv = f32[4,16,16]{2,1,0} fusion(%a, %b), kind=kOutput, calls=%fused_conv
  %update = f32[1024,256]{1,0} fusion(%buffer, %row, %i), kind=kLoop, calls=%fused_update
  %read = f32[1,256]{1,0} fusion(%buffer, %i), kind=kLoop, calls=%fused_read
  %nested = f32[1,256]{1,0} fusion(%buffer, %i), kind=kLoop, calls=%fused_outer
  ROOT %out = (f32[4,16,16]{2,1,0}, f32[1024,256]{1,0}, f32[1,256]{1,0}, f32[1,256]{1,0}) tuple(%conv, %update, %read, %nested)
}
"""


def costs(text):
  return {op.name: op for op in hlo.op_costs(hlo.parse(text))}


def test_a_dilated_convolution_counts_only_the_taps_on_real_elements():
  ops = costs(SNIPPET)
  # 4 batches of a [16, 8] x [8, 16] matmul: 2 x 4 x 16 x 16 x 8, not 4x that (the window).
  assert ops["conv"].flops == 2 * 4 * 16 * 16 * 8
  assert ops["conv"].bytes == 2 * 4 * 16 * 8 * 2 + 4 * 16 * 16 * 4


def test_an_in_place_update_and_a_slice_move_only_their_rows():
  ops = costs(SNIPPET)
  row = 256 * 4
  assert ops["update"].bytes == 2 * row + 4  # the row read and written, and the index
  assert ops["read"].bytes == 2 * row + 4
  assert ops["nested"].bytes == 2 * row + 4  # the slice taken inside a nested fusion
  assert ops["update"].flops == ops["read"].flops == 0


def test_matmul_flops_of_a_jitted_program_count_each_dot_and_each_loop_iteration():
  """A scan of 3 matmuls [8, 32] x [32, 16] after one [8, 16] x [16, 32]: XLA's text holds the
  loop body once; the count runs it 3 times."""
  w1 = jnp.ones((16, 32), jnp.float32)
  ws = jnp.ones((3, 32, 32), jnp.float32)

  def step(x, w1, ws):
    y = x @ w1

    def body(carry, w):
      return jnp.tanh(carry @ w), None

    return jax.lax.scan(body, y, ws)[0]

  text = jax.jit(step).lower(jnp.ones((8, 16)), w1, ws).compile().as_text()
  expected = 2 * 8 * 16 * 32 + 3 * 2 * 8 * 32 * 32
  assert hlo.matmul_flops(hlo.parse(text)) == expected
  dots = [op for op in hlo.op_costs(hlo.parse(text)) if op.flops]
  assert max(op.flops for op in dots) <= 2 * 8 * 32 * 32


def test_mesh_replica_groups_with_a_device_order():
  """A collective over axis_0 of a (2, 1, 2) mesh whose positions hold devices 0, 2, 1, 3."""
  inst = hlo.parse_instruction(
      "%ag = f32[4]{0} all-gather(f32[2]{0} %x), channel_id=1, "
      "replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=2], device_ids=([2,2]T(1,0)) "
      "{'axis_0'}, dimensions={0}, use_global_device_ids=true"
  )
  assert hlo.replica_groups(inst, 4) == [[0, 1], [2, 3]]
  plain = hlo.parse_instruction(
      "%ar = f32[4]{0} all-reduce(f32[4]{0} %x), replica_groups=mesh['a'=2,'b'=2] {'b'}"
  )
  assert hlo.replica_groups(plain, 4) == [[0, 1], [2, 3]]
  iota = hlo.parse_instruction(
      "%ar = f32[4]{0} all-reduce(f32[4]{0} %x), replica_groups=[2,2]<=[2,2]T(1,0), to_apply=%add"
  )
  assert hlo.replica_groups(iota, 4) == [[0, 2], [1, 3]]
