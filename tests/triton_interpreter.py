"""Triton's interpreter made to compute as a GPU does, so that CPU tests run what it would
otherwise get wrong or lack. It stores bf16 values as their uint16 bit patterns and
- multiplies those patterns as integers in tl.dot (triton-lang/triton#11584): here the operands
  go to fp32 first, exactly, as tensor cores multiply bf16 exactly and add in fp32;
- casts fp32 to bf16 by truncation: here by rounding to nearest even, as GPUs do;
- has no tensor-descriptor reductions (sm90's TMA reduce-add): here element atomics over the
  descriptor's tile, clipped at the tensor's bounds as TMA clips.
conftest.py applies this before any kernel runs; then cckernels' Triton attention takes bf16 on
the CPU too (INTERPRETER_BF16_DOT, which users' unmended interpreters leave off)."""
import numpy as np
import torch


def compute_as_a_gpu():
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    dot, cast = builder.create_dot, builder.cast_impl

    def fp32(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = np.asarray(handle.data).astype(np.uint32) << 16  # a bf16 is the high half of its fp32
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):
        return dot(self, fp32(a), fp32(b), d, *args)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            values = torch.from_numpy(np.array(src.data, dtype=np.float32))
            bits = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, dst_type.scalar)
        return cast(self, src, dst_type)

    def create_descriptor_reduce(self, kind, desc, value, indices):
        assert kind == ir.DESCRIPTOR_REDUCE_KIND.ADD, kind
        ptrs, mask = desc.materialize_pointers(indices)  # out-of-bounds elements masked off
        return self.create_atomic_rmw(ir.ATOMIC_OP.FADD, ptrs, value, interpreter.TensorHandle(mask, tl.int1),
                                      ir.MEM_SEMANTIC.RELAXED, None)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    builder.create_descriptor_reduce = create_descriptor_reduce
    from cckernels.triton import attention

    attention.INTERPRETER_BF16_DOT = True
