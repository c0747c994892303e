"""The three timings of a kernel benchmark case (bench_attention, bench_group_norm).

    eager  triton.testing.do_bench of the call as a training step makes it, L2 flushed before
           each call. When the host takes longer to enqueue a call (Python, autograd, launch
           overhead) than the GPU takes to run it, this is the host's time, not the kernels'.
    graph  the same call captured once in a CUDA graph; each replay timed the same way
           (do_bench, L2 flushed). One graph launch per call, queued while the L2 flush runs,
           so this is the GPU's time alone: what the kernels cost, and what a training step
           captured in a CUDA graph pays.
    host   median wall time to enqueue one call, the GPU left running behind (no sync between
           calls): the floor under the eager time, hidden by it whenever it is the larger.

Why not triton.testing.do_bench_cudagraph (triton 3.6 and 3.8 alike): it does not flush the L2
(small inputs would stay cached, unlike in the eager column), it unrolls rep / eager-estimate
calls into one graph, so a host-bound op captures hundreds of calls per case and its quantiles
are of 10 replay means rather than of single calls, and its side stream does not wait for
the stream that made the inputs.
"""
import statistics
import time

import torch

QUANTILES = [0.5, 0.2, 0.8]  # -> (median, q20, q80)
NO_GRAPH_IN_TINY_MODE = "not timed in tiny mode (the CPU smoke run; CUDA graphs need a GPU)"


def clear(grads):
    for t in grads:
        t.grad = None


def eager_ms(fn, warmup, rep, grads=()):
    """(median, q20, q80) milliseconds of fn(); grads are set to None before each call."""
    import triton.testing

    return tuple(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grads), quantiles=QUANTILES))


def capture(fn, grads=(), warmups=2):
    """(graph, output): one fn() call captured in a torch.cuda.CUDAGraph, and what that call
    returned (its tensors live in the graph's memory; each replay rewrites them).

    As PyTorch's recipe asks (autograd's backward included), `warmups` eager calls run first
    on a side stream (autotuning, compiling and lazy initialization happen there, never in the
    capture), and the capture runs on that stream. grads are set to None before each call, so
    a backward() inside fn allocates them in the graph's memory and every replay writes them
    afresh instead of adding to them. The caller's stream is restored whatever fn raises."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            clear(grads)
            fn()
        clear(grads)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        try:
            out = fn()
        finally:  # ends the capture even when fn raised, so the stream leaves capture mode
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, out


def failure(e):
    """One line for an exception, and for the one it interrupted: when fn fails inside the
    capture, capture_end's error ("operation failed due to a previous error during capture")
    is raised while handling fn's, which names the operation that cannot be captured."""

    def line(e):
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__

    return line(e) if e.__context__ is None else f"{line(e)} (during {line(e.__context__)})"


def graph_ms(fn, warmup, rep, grads=()):
    """((median, q20, q80) milliseconds per replay of fn captured in a CUDA graph, None), or
    (None, why) when fn cannot be captured or replayed: the caller records it and goes on."""
    try:
        graph, _ = capture(fn, grads)
        import triton.testing

        return tuple(triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, quantiles=QUANTILES)), None
    except Exception as e:  # noqa: BLE001 (a backend that cannot be captured must not end the run)
        return None, failure(e)


def timings(fn, tiny, grads=(), eager=(10, 50), graph=(5, 25), calls=10):
    """(eager, graph, why, host_us) of fn: eager and graph (median, q20, q80) milliseconds,
    graph None with the reason in `why`, host_us as host_us(). eager and graph: (warmup, rep)
    milliseconds of do_bench. Tiny mode (CPU) times 3 wall-clock calls, which are also the host
    time (a CPU call runs as it is enqueued), and has no graph."""
    if tiny:
        times = []
        for _ in range(3):
            clear(grads)
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        q = statistics.quantiles(times, n=5)
        return (statistics.median(times), q[0], q[3]), None, NO_GRAPH_IN_TINY_MODE, statistics.median(times) * 1e3
    return (eager_ms(fn, *eager, grads), *graph_ms(fn, *graph, grads), host_us(fn, calls, grads))


def time_fields(eager, graph, rate_key, rate):
    """A benchmark row's fields for both timings, eager and graph_-prefixed: ms, ms_q20,
    ms_q80 (the 20% and 80% quantiles) and rate_key = rate(ms) (TFLOP/s, GB/s), each None
    where that timing has no time."""
    fields = {}
    for prefix, times in (("", eager), ("graph_", graph)):
        ms, low, high = times or (None, None, None)
        fields |= {f"{prefix}ms": ms, f"{prefix}ms_q20": low, f"{prefix}ms_q80": high,
                   f"{prefix}{rate_key}": ms and rate(ms)}
    return fields


def graph_cell(row):
    """A table's "graph ms (20-80)" cell of a row with time_fields()."""
    if row["graph_ms"] is None:
        return "-"
    return f"{row['graph_ms']:.4f} ({row['graph_ms_q20']:.4f}-{row['graph_ms_q80']:.4f})"


def fmt(value, spec, missing="-", suffix=""):
    """value in format `spec` (then suffix), or `missing` where there is none."""
    return missing if value is None else format(value, spec) + suffix


def host_us(fn, calls=10, grads=()):
    """Median microseconds to enqueue one fn() call on the GPU (wall clock, no sync between
    calls). Few calls: where the GPU is the slower side, the final sync waits for all of them.
    Without a GPU, the time of a call (a CPU call runs as it is enqueued)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    times = []
    for _ in range(calls):
        clear(grads)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    sync()
    return statistics.median(times) * 1e6


def print_missing_graphs(rows, describe):
    """One line per reason why rows have no graph time, naming them by describe(row)."""
    missing = {}
    for r in rows:
        if r["graph_error"]:
            missing.setdefault(r["graph_error"], set()).add(describe(r))
    for why, which in missing.items():
        everything = len(missing) == 1 and all(r["graph_error"] for r in rows)
        print(f"no graph time for {'any row' if everything else ', '.join(sorted(which))}: {why}")


def host_times(rows, name_key, mode_key, ours):
    """Per mode (rows' mode_key: "fwd", "fwd+bwd"): the median host time per call over the
    shapes of each of our implementations (ours(row[name_key])) and of the best peer."""
    out = []
    for mode in ("fwd", "fwd+bwd"):
        per_name = {}
        for r in rows:
            if r[mode_key] == mode:
                per_name.setdefault(r[name_key], []).append(r["host_us"])
        median = {name: statistics.median(us) for name, us in per_name.items()}
        peers = {name: us for name, us in median.items() if not ours(name)}
        best = min(peers, key=peers.get) if peers else None
        out.append({mode_key: mode, "ours_us": {name: us for name, us in median.items() if ours(name)},
                    "best_peer": best, "best_peer_us": peers.get(best)})
    return out


def print_host_times(hosts):
    """host_times()' entries, one line per mode."""
    print("host time to enqueue one call (us, median over shapes): the eager time cannot go below it")
    for h in hosts:
        mode = next(iter(h.values()))  # the first key is the mode's
        ours = ", ".join(f"{name} {us:.1f}" for name, us in h["ours_us"].items())
        best = "-" if h["best_peer"] is None else f"{h['best_peer']} {h['best_peer_us']:.1f}"
        print(f"  {mode:9}{ours}  |  best peer: {best}")
