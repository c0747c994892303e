"""cckernels.triton.launch: the host-side integer helpers match triton's, and Tuned launches
an autotuned kernel with the meta-parameters Triton's own launch path would give it, going
through Triton's path only on a call signature's first launch (CPU: Triton's interpreter; on
a GPU the same code with compiled kernels)."""
import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from cckernels.triton.launch import Tuned, cdiv, next_power_of_2

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_integer_helpers_match_triton():
    assert [next_power_of_2(n) for n in range(0, 2100)] == [triton.next_power_of_2(n) for n in range(0, 2100)]
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in range(1, 40))


@triton.autotune(configs=[triton.Config({"BLOCK": 16}, num_warps=1)], key=["n"])
@triton.heuristics({"EVEN": lambda a: a["n"] % a["BLOCK"] == 0})
@triton.jit
def _meta_kernel(out, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    """Writes the meta-parameters it was launched with, and n, into out[0:3]."""
    offs = tl.arange(0, 4)
    even = 1 if EVEN else 0
    values = tl.where(offs == 0, BLOCK, tl.where(offs == 1, even, n))
    tl.store(out + offs, values, mask=offs < 3)


def test_tuned_launch_remembers_triton_choice(monkeypatch):
    runs = []
    autotuner_run = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **k: runs.append(1) or autotuner_run(self, *a, **k))
    launch = Tuned(_meta_kernel)

    def meta(n):
        out = torch.full((3,), -1, dtype=torch.int32, device=DEVICE)  # poisoned
        launch[(1,)](out, n)
        return out.tolist()

    assert meta(32) == [16, 1, 32]  # first launch of this signature: Triton's path
    assert runs == [1]
    assert meta(32) == [16, 1, 32]  # remembered: straight to the JIT function
    assert runs == [1]
    assert meta(33) == [16, 0, 33]  # another signature: its own heuristics
    assert runs == [1, 1]
    assert meta(33) == [16, 0, 33] and meta(32) == [16, 1, 32]
    assert runs == [1, 1]
    assert len(launch.meta) == 2


@triton.autotune(configs=[triton.Config({"BLOCK": 16}, num_warps=1)], key=["n"])
@triton.heuristics({
    "BLOCK": lambda a: 32 if a["wide"] else a["BLOCK"],  # overrides the config's value
    "EVEN": lambda a: a["n"] % a["BLOCK"] == 0,  # and must see the override, as in Triton
})
@triton.jit
def _override_kernel(out, n, wide, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    offs = tl.arange(0, 4)
    even = 1 if EVEN else 0
    values = tl.where(offs == 0, BLOCK, tl.where(offs == 1, even, n))
    tl.store(out + offs, values, mask=offs < 3)


def test_tuned_launch_applies_heuristics_in_order():
    launch = Tuned(_override_kernel)

    def meta(n, wide):
        out = torch.full((3,), -1, dtype=torch.int32, device=DEVICE)
        launch[(1,)](out, n, wide)
        return out.tolist()

    assert meta(48, 1) == [32, 0, 48]  # Triton's path: 48 % 32 != 0
    assert meta(48, 1) == [32, 0, 48]  # remembered, with EVEN from the overridden BLOCK
    assert meta(48, 0) == [16, 1, 48]
