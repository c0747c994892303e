"""trainer.ema.ScheduledEMA: schedule (start, interval, warm-up), swap, state_dict, fused vs unfused."""
import copy

import pytest
import torch

import cckernels as ck
from trainer.ema import ScheduledEMA


# The schedule is under test here, not the kernels (test_ema_update.py, test_fused_adamw_ema.py).
pytestmark = pytest.mark.usefixtures("torch_kernels")


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.SiLU(), torch.nn.Linear(7, 3))


def train(ema, opt, net, steps, seed=1):
    """`steps` training steps on random data (opt.step(), then ema.step()); returns the
    weights after each step."""
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 5, generator=gen).to(next(net.parameters()).dtype)
        net(x).square().mean().backward()
        opt.step()
        ema.step()
        history.append([p.detach().clone() for p in net.parameters()])
    return history


def expected_shadow(ema, history):
    """The EMA by its definition; history[s]: the weights after step s (0: initial)."""
    shadow = None
    for step, weights in enumerate(history):
        if step == ema.start_step:
            shadow = [w.double() for w in weights]
        decay = ema.decay_at(step)
        if decay is not None:
            shadow = [decay * s + (1 - decay) * w.double() for s, w in zip(shadow, weights)]
    return shadow


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("start_step, every, warmup", [(3, 1, False), (2, 3, True), (0, 2, False)])
def test_schedule_matches_definition(fused, start_step, every, warmup):
    net = model()
    opt = ck.FusedAdamWEMA(net.parameters(), lr=0.1) if fused else torch.optim.AdamW(net.parameters(), lr=0.1)
    ema = ScheduledEMA(net, decay=0.8, start_step=start_step, every=every, warmup=warmup, optimizer=opt)
    history = [[p.detach().clone() for p in net.parameters()]]
    if start_step > 1:
        history += train(ema, opt, net, start_step - 1)
    if start_step > 0:  # no EMA memory before the start step
        assert not ema.started and ema.shadow is None and ema.state_tensors() is None
        assert not fused or not opt.ema_started
    history += train(ema, opt, net, 10 - len(history), seed=2)
    expected = expected_shadow(ema, history)
    for s, e in zip(ema.shadow, expected):
        assert s.dtype == torch.float32
        torch.testing.assert_close(s.double(), e, rtol=1e-6, atol=1e-6)


def test_decay_at():
    net = model()
    ema = ScheduledEMA(net, decay=0.99, start_step=10, every=4, warmup=True, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    assert [ema.decay_at(s) for s in (0, 9, 10, 11, 13)] == [None] * 5
    assert ema.decay_at(14) == pytest.approx((5 / 14) ** 4)  # warm-up: (1 + t) / (10 + t), t = 4
    assert ema.decay_at(10 + 4 * 1000) == pytest.approx(0.99**4)


def test_fused_and_unfused_agree():
    nets = [model(), model()]
    opts = [torch.optim.AdamW(nets[0].parameters(), lr=0.05), ck.FusedAdamWEMA(nets[1].parameters(), lr=0.05)]
    emas = [ScheduledEMA(net, decay=0.9, start_step=2, every=2, optimizer=opt) for net, opt in zip(nets, opts)]
    for ema, opt, net in zip(emas, opts, nets):
        train(ema, opt, net, 7)
    for a, b in zip(*(ema.shadow for ema in emas)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("every, warmup", [(2, False), (1, True)])
def test_skipped_steps_do_not_count_fused_or_not(every, warmup):
    # The training loop skips optimizer.step() and ema.step() on non-finite gradients: the
    # fused pre-hook and the unfused update must still agree on each step's decay.
    nets = [model(), model()]
    opts = [torch.optim.AdamW(nets[0].parameters(), lr=0.05), ck.FusedAdamWEMA(nets[1].parameters(), lr=0.05)]
    emas = [ScheduledEMA(net, decay=0.9, start_step=1, every=every, warmup=warmup, optimizer=opt)
            for net, opt in zip(nets, opts)]
    x = torch.randn(4, 5)
    for i in range(7):
        skipped = i in (2, 3)
        for ema, opt, net in zip(emas, opts, nets):
            opt.zero_grad()
            net(x).square().sum().backward()
            if not skipped:
                opt.step()
                ema.step()
    assert emas[0].steps == emas[1].steps == 5
    for a, b in zip(*(ema.shadow for ema in emas)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_in_puts_ema_in_and_restores(dtype):
    net = model().to(dtype)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    ema = ScheduledEMA(net, decay=0.5, start_step=2, optimizer=opt)
    before = [p.detach().clone() for p in net.parameters()]
    with ema.swapped_in() as swapped:  # before the start: the model keeps its weights
        assert not swapped and all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    train(ema, opt, net, 4)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(KeyError):  # restored even when the block raises
        with ema.swapped_in() as swapped:
            assert swapped
            for p, s in zip(net.parameters(), ema.shadow):
                assert torch.equal(p, s.to(dtype))
            raise KeyError
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


@pytest.mark.parametrize("fused", [False, True])
def test_state_dict_resume_continues_identically(fused):
    def setup():
        net = model()
        opt = ck.FusedAdamWEMA(net.parameters(), lr=0.1) if fused else torch.optim.AdamW(net.parameters(), lr=0.1)
        return net, opt, ScheduledEMA(net, decay=0.7, start_step=2, every=2, warmup=True, optimizer=opt)

    net, opt, ema = setup()
    train(ema, opt, net, 5)
    # As through the checkpoint files: no tensors shared with the running objects.
    state, tensors, opt_state = copy.deepcopy((ema.state_dict(), ema.state_tensors(), opt.state_dict()))
    assert set(tensors) == {n for n, _ in net.named_parameters()}

    net2, opt2, ema2 = setup()
    net2.load_state_dict(net.state_dict())
    opt2.load_state_dict(opt_state)
    ema2.load_state_dict(state, tensors)
    assert ema2.steps == 5
    train(ema, opt, net, 4, seed=3)
    train(ema2, opt2, net2, 4, seed=3)
    for a, b in zip(ema.shadow, ema2.shadow):
        assert torch.equal(a, b)


def test_resume_before_the_start_has_no_tensors():
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ema = ScheduledEMA(net, start_step=10, optimizer=opt)
    train(ema, opt, net, 3)
    ema2 = ScheduledEMA(net, start_step=10, optimizer=opt)
    ema2.load_state_dict(ema.state_dict(), ema.state_tensors())
    assert ema2.steps == 3 and not ema2.started


def test_load_rejects_other_model():
    net = model()
    ema = ScheduledEMA(net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="do not match"):
        ema.load_state_dict({"steps": 1}, {"nope": torch.zeros(1)})


@pytest.mark.parametrize("kwargs, match", [(dict(decay=1.5), "decay"), (dict(start_step=-1), "start_step"), (dict(every=0), "every")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduledEMA(model(), **kwargs)


def test_fused_optimizer_must_hold_the_parameters():
    net = model()
    with pytest.raises(ValueError, match="not in the FusedAdamWEMA"):
        ScheduledEMA(net, optimizer=ck.FusedAdamWEMA(list(net.parameters())[:2]))
