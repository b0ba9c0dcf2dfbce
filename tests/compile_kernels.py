"""Compiles every Triton kernel for an sm_90 GPU (Hopper) without one: Triton's frontend, its
NVIDIA passes and the ptxas bundled with the triton wheel. The interpreter CI runs the kernels
through accepts code the compiler rejects; this catches that before a GPU session does.

Run as a script in a process without TRITON_INTERPRET (test_kernels_compile.py does): prints
one line per compiled variant with its shared memory and whether its main loop is pipelined
(cp.async copies), and exits non-zero on the first failure. To check another Triton, e.g. the
GPU image's 3.6, without touching the venv:

    pip install --target /tmp/triton36 --no-deps triton==3.6.0      # ~650 MB, once
    env -u TRITON_INTERPRET PYTHONPATH=/tmp/triton36 python tests/compile_kernels.py
"""

import os
import sys
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") != "1", "the interpreter replaces the compiler"
# Run as a script, sys.path starts at tests/: the checkout this file is in must be the fastalign
# it compiles, not another one an editable install points at (a git worktree's main checkout).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastalign.kernels import divergence, linear_logprobs, policy, token_logprobs  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOAT_SCALARS = {"inv_temperature", "softcap", "teacher_softcap", "beta", "one_minus_beta",
                 "clip_low", "clip_high", "dual_clip", "kl_coef", "log_min_p"}
WIDE_SCALARS = {"stride_outer", "teacher_stride_outer", "grad_stride_outer"}  # can pass 2**31
# Pointers to the inputs' dtype; every other pointer is float32 (statistics) or int64 (ids).
INPUT_POINTERS = {"hidden_ptr", "weight_ptr", "bias_ptr", "grad_tile_ptr", "logits_ptr",
                  "teacher_ptr", "grad_ptr", "logprobs_ptr", "old_ptr", "advantages_ptr"}


def signature(fn, dtype: str, weight_dtype: str):
    """Argument types of ``fn`` and the 16-divisibility a launch with aligned tensors and
    D, V multiples of 16 gets (what makes the main loops vectorize and pipeline)."""
    types, divisible = {}, []
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            types[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            if name in ("weight_ptr", "bias_ptr"):
                types[name] = f"*{weight_dtype}"
            elif name in INPUT_POINTERS:
                types[name] = f"*{dtype}"
            elif name == "targets_ptr":
                types[name] = "*i64"
            elif name == "mask_ptr":  # bool for the divergence kernels, 0/1 floats for the policy ones
                types[name] = "*fp32" if fn.fn.__name__.startswith("_policy") else "*i1"
            else:
                types[name] = "*fp32"
            divisible.append(index)
        else:
            types[name] = ("fp32" if name in FLOAT_SCALARS else
                           "i64" if name in WIDE_SCALARS else "i32")
            if types[name] != "fp32":
                divisible.append(index)
    return types, {(index,): [["tt.divisibility", 16]] for index in divisible}


def compile_variant(fn, constexprs: dict, dtype="bf16", weight_dtype=None, num_warps=8,
                    num_stages=3) -> str:
    types, attrs = signature(fn, dtype, weight_dtype or dtype)
    source = ASTSource(fn=fn, signature=types, constexprs=constexprs, attrs=attrs)
    # As the launchers do (kernels/_math.py fp_fusion): no FMA fusion in the softcap variants.
    kernel = triton.compile(source, target=TARGET,
                            options={"num_warps": num_warps, "num_stages": num_stages,
                                     "enable_fp_fusion": not constexprs.get("HAS_SOFTCAP", False)})
    pipelined = "async_copy" in kernel.asm["ttgir"]
    return f"shared {kernel.metadata.shared // 1024} KiB, pipelined {pipelined}"


def sampler_flags(on: bool) -> dict:
    """The per-row temperature and the sampler's support (top-k and min-p), all on or off."""
    return dict(ROW_TEMPERATURE=on, SUPPORT=on, HAS_TOP_K=on, HAS_MIN_P=on)


def variants():
    """(name, kernel, constexprs, dtype, weight dtype): each kernel with no optional feature and
    with all of them, in the dtype pairs that ship (bf16 activations with fp32 weights is
    autocast's), about 30 compiles (~50 s on 2 cores)."""
    for dtype, weight_dtype in (("bf16", "bf16"), ("fp32", "fp32"), ("bf16", "fp32")):
        dot = dict(UPCAST=False, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                   BLOCK_N=linear_logprobs.FORWARD_BLOCK_N,
                   BLOCK_V=linear_logprobs.FORWARD_BLOCK_V,
                   BLOCK_D=linear_logprobs.FORWARD_BLOCK_D)
        for on in (False, True):
            flags = dict(HAS_BIAS=on, HAS_SOFTCAP=on, **sampler_flags(on))
            yield ("linear forward", linear_logprobs._linear_logprobs_forward_kernel,
                   dict(flags, RETURN_ENTROPY=on, ROW_STATS=False, **dot), dtype, weight_dtype)
            yield ("linear grad tile", linear_logprobs._linear_logprobs_grad_tile_kernel,
                   dict(flags, HAS_LOGPROB_GRAD=True, HAS_ENTROPY_GRAD=on, **dot),
                   dtype, weight_dtype)
        # The row statistics TRL logs (never with the sampler), and the sampler's logits tiles.
        yield ("linear forward row stats", linear_logprobs._linear_logprobs_forward_kernel,
               dict(HAS_BIAS=False, HAS_SOFTCAP=False, RETURN_ENTROPY=True, ROW_STATS=True,
                    **sampler_flags(False), **dot), dtype, weight_dtype)
        yield ("linear logits tile", linear_logprobs._linear_logits_tile_kernel,
               dict(HAS_BIAS=True, **dot), dtype, weight_dtype)
    for dtype, on in (("bf16", True), ("fp32", False)):
        caps = dict(HAS_MASK=on, HAS_SOFTCAP=on, HAS_TEACHER_SOFTCAP=on,
                    BLOCK_V=divergence.FORWARD_BLOCK_V)
        # Every mode once: the forward KL and the JSD with every feature, the reverse KL
        # without (token_kl's variant).
        for mode in (0, 1, 2):
            features = on if mode != 1 else False
            flags = dict(caps, HAS_MASK=features, HAS_SOFTCAP=features,
                         HAS_TEACHER_SOFTCAP=features)
            yield (f"divergence forward mode {mode}", divergence._divergence_forward_kernel,
                   dict(flags, MODE=mode, RETURN_ENTROPY=features), dtype, dtype)
            yield (f"divergence backward mode {mode}", divergence._divergence_backward_kernel,
                   dict(flags, MODE=mode, HAS_DIVERGENCE_GRAD=True, HAS_ENTROPY_GRAD=features),
                   dtype, dtype)
        yield "divergence mixture", divergence._mixture_kernel, caps, dtype, dtype
        yield ("token forward", token_logprobs._token_logprobs_forward_kernel,
               dict(HAS_SOFTCAP=on, RETURN_ENTROPY=on, PARTIALS=False,
                    BLOCK_V=token_logprobs.FORWARD_BLOCK_V, **sampler_flags(on)), dtype, dtype)
        # A vocabulary slice's partials (the cuBLAS path of linear_logprobs: float32 tiles).
        yield ("token forward slice partials", token_logprobs._token_logprobs_forward_kernel,
               dict(HAS_SOFTCAP=on, RETURN_ENTROPY=on, PARTIALS=True,
                    BLOCK_V=token_logprobs.FORWARD_BLOCK_V, **sampler_flags(on)), "fp32", "fp32")
        yield ("token backward", token_logprobs._token_logprobs_backward_kernel,
               dict(HAS_SOFTCAP=on, HAS_LOGPROB_GRAD=True, HAS_ENTROPY_GRAD=on,
                    BLOCK_V=token_logprobs.BACKWARD_BLOCK_V, **sampler_flags(on)), dtype, dtype)
        # min-p alone (the other branch of _math.in_support).
        yield ("token forward min-p", token_logprobs._token_logprobs_forward_kernel,
               dict(HAS_SOFTCAP=False, RETURN_ENTROPY=False, ROW_TEMPERATURE=False,
                    SUPPORT=True, HAS_TOP_K=False, HAS_MIN_P=True, PARTIALS=False,
                    BLOCK_V=token_logprobs.FORWARD_BLOCK_V), dtype, dtype)
    for kl_kind, dual, sequence in ((0, False, False), (3, True, True), (2, True, False),
                                    (1, False, True)):
        flags = dict(HAS_DUAL_CLIP=dual, KL_KIND=kl_kind, SEQUENCE_LEVEL=sequence,
                     BLOCK_T=policy.BLOCK_T)
        yield "policy forward", policy._policy_forward_kernel, flags, "fp32", "fp32"
        yield "policy backward", policy._policy_backward_kernel, flags, "fp32", "fp32"


def main() -> int:
    for name, fn, constexprs, dtype, weight_dtype in variants():
        flags = ",".join(k for k, v in constexprs.items() if v is True)
        try:
            report = compile_variant(fn, constexprs, dtype, weight_dtype)
        except Exception as error:  # the compiler's message is the point
            print(f"FAILED {name} {dtype}/{weight_dtype} {flags}: {error}")
            return 1
        print(f"ok {name} {dtype}/{weight_dtype} {flags}: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
