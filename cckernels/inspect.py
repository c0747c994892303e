"""Compile every kernel ahead of time for sm80/sm90 (no GPU needed) and check its machine code.

    python -m cckernels.inspect                                  # everything, sm80 and sm90
    python -m cckernels.inspect --arch 90 --op attention --json out.json
    python -m cckernels.inspect --markdown > docs/inspect.md     # the README's table

Triton kernels go through `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`
once per (autotune config, dtype, variant, arch); csrc/*.cu through `nvcc -cubin`. Each cubin
is read with cuobjdump (Triton's wheel carries it): registers, shared and local memory per
thread (spills land in local memory) and the SASS instruction mix that decides speed:
HGMMA (sm90) / HMMA (sm80) for matrix work, 128-bit global loads and stores for streaming.
Without Triton nothing runs; without nvcc on PATH the csrc rows are skipped, and a note says so.

What to compile and what must hold lives next to each op, in an `INSPECT` list at the end of
each cckernels/triton/*.py module (Triton kernels) and of cckernels/cuda.py (csrc files); this
module is only the machinery. A Triton entry:

    {"op": "attention", "kernel": _attn_fwd_kernel,   # JITFunction, maybe autotuned/heuristics
     "dtypes": (torch.float16, ...),                  # "*T" pointers take each in turn
     "args": {"Q": "*T", "LSE": "*fp32", "stride_*": "i32:16", "scale": "fp32", "EVEN_N": True},
     "variants": {"d64": {...}, "d128": {...}},        # optional, merged over args
     "configs": fn(configs, arch, dtype, args),  # optional: the configs the kernel keeps on arch 80/90
     "options": {"num_warps": 8},                     # optional: launch options, if not autotuned
     "expect": {"sm90": {"hgmma": True}}}             # or fn(dtype) -> dict

`args` (or a function of the dtype returning it) gives each argument a Triton type ("*fp16",
"i32", "fp32"; "i32:16" = divisible by 16 as Triton specializes it at run time) or a Python
value (a constexpr; an int 1 is what Triton makes of a unit stride), or a function of the
other arguments, the config's included, giving one (a block size that follows BLOCK_N, as a
heuristic would). Keys may be globs (the
longest match wins) and name arguments a kernel lacks, so one dict serves all kernels of a
file; unlisted arguments are i32. A csrc entry: {"op": ..., "source": "csrc/x.cu", "expect": {regex: expect}} with
the regex matched against demangled kernel names.

Always checked: the config compiles, fits the target's shared memory, and does not touch
local memory (no spills). Expect keys: any SASS count below (True: > 0, False: == 0, int:
equal), under "sm80"/"sm90" or at the top level for both archs. "archs": (90,) limits an entry
to those archs (code that only sm90 runs).
"""
import argparse
import concurrent.futures
import fnmatch
import hashlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory one block may use
NVCC_FLAGS = ["-O3", "-std=c++17"]  # as setup.py builds the extension
ROOT = Path(__file__).resolve().parent.parent
CACHE_VERSION = 1  # bump when a cached row's fields change

# SASS instruction families worth counting, by opcode (modifiers included) -> counter.
COUNTERS = {
    "hgmma": lambda op: op.startswith("HGMMA"),
    "hmma": lambda op: op.startswith("HMMA"),
    "ldg128": lambda op: op.startswith("LDG.") and ".128" in op,
    "stg128": lambda op: op.startswith("STG.") and ".128" in op,
    "ldg": lambda op: op.startswith("LDG."),
    "stg": lambda op: op.startswith("STG."),
    "ldgsts": lambda op: op.startswith("LDGSTS"),  # cp.async global -> shared (sm80 pipelining)
    "tma": lambda op: op.startswith("UTMALDG"),
    "tma_reduce": lambda op: op.startswith("UTMAREDG"),  # TMA reduction global <- shared (atomic tiles)
    "stl": lambda op: op.startswith("STL"),  # local-memory stores: spills
    "ldl": lambda op: op.startswith("LDL"),
}
DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # torch name -> Triton name


def torch_name(dtype):
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------
# Tools and cubin analysis
# ----------------------------------------------------------------------------------------
def tool(name):
    """Path of a CUDA binary tool: Triton's bundled copy first, then PATH; None in neither."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def blockers(cuda=True):
    """(why no row can be made here, why no csrc row can), None where nothing stands in the
    way; checked before compiling. Every row needs Triton: it compiles the Triton kernels and
    its wheel carries the cuobjdump that reads every cubin. csrc also needs nvcc."""
    from cckernels.backend import triton_interpreting

    no_csrc = "nvcc is not on PATH" if cuda and shutil.which("nvcc") is None else None
    try:
        import triton  # noqa: F401
    except ImportError as e:
        why = f"Triton is needed (it compiles the kernels, its wheel carries cuobjdump) but does not import: {e}"
        return f"{why}; pip install triton", no_csrc
    if triton_interpreting():
        return "unset TRITON_INTERPRET: the interpreter replaces kernels and their autotune configs", no_csrc
    if tool("cuobjdump") is None:
        return "cuobjdump is neither in Triton's wheel nor on PATH", no_csrc
    return None, no_csrc


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return dict(zip(names, names))
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, out.stdout.splitlines()))


def parse_resource_usage(text):
    """{mangled kernel name: {"regs", "static_smem", "local", "counts"}} from cuobjdump --dump-resource-usage."""
    kernels = {}
    for name, fields in re.findall(r"Function ([^\s:]+):\s*\n\s*(REG:.*)", text):
        values = dict(re.findall(r"(\w+):(\d+)", fields))
        # spills live in the stack frame (STACK) or other local memory (LOCAL), per thread
        kernels[name] = {
            "regs": int(values["REG"]),
            "static_smem": int(values["SHARED"]),
            "local": int(values["STACK"]) + int(values["LOCAL"]),
            "counts": dict.fromkeys(COUNTERS, 0),
        }
    return kernels


def count_instructions(sass, kernels):
    """Add the SASS (cuobjdump -sass) instruction counts of each function to kernels[name]["counts"]."""
    counts = None
    for line in sass.splitlines():
        header = re.match(r"\s*Function : (\S+)", line)
        if header:
            counts = kernels[header.group(1)]["counts"]
            continue
        ins = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if ins and counts is not None:
            for key, match in COUNTERS.items():
                counts[key] += match(ins.group(1))
    return kernels


def analyze_cubin(path):
    cuobjdump = tool("cuobjdump")
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True)
    return count_instructions(sass.stdout, parse_resource_usage(usage.stdout))


# ----------------------------------------------------------------------------------------
# Result cache: a row per compiled kernel, keyed by everything that determines its code
# ----------------------------------------------------------------------------------------
def cache_dir():
    return Path(os.environ.get("CCKERNELS_CACHE_DIR", Path.home() / ".cache" / "cckernels")) / "inspect"


def cached(key, compute, use_cache=True):
    path = cache_dir() / f"{hashlib.sha256(json.dumps([CACHE_VERSION, key]).encode()).hexdigest()}.json"
    if use_cache and path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)  # atomic: parallel runs never read half a file
    return value


# ----------------------------------------------------------------------------------------
# Specs: collect INSPECT entries and expand them into compile jobs
# ----------------------------------------------------------------------------------------
def spec_modules():
    """cckernels.triton.* modules and cckernels.cuda: every module that may hold INSPECT."""
    import cckernels.triton

    names = [f"cckernels.triton.{m.name}" for m in pkgutil.iter_modules(cckernels.triton.__path__)]
    return names + ["cckernels.cuda"]


def specs():
    """[(module name, index, entry)] of every INSPECT entry."""
    found = []
    for name in spec_modules():
        for i, entry in enumerate(getattr(importlib.import_module(name), "INSPECT", [])):
            found.append((name, i, entry))
    return found


def missing_specs():
    """Kernels without an INSPECT entry: module-level Triton kernels named *_kernel in
    cckernels.triton.*, and csrc/*.cu files absent from cckernels.cuda.INSPECT."""
    from triton.runtime.jit import KernelInterface

    covered = {id(jit_parts(e["kernel"])[0]) for _, _, e in specs() if "kernel" in e}
    sources = {e["source"] for _, _, e in specs() if "source" in e}
    missing = []
    for name in spec_modules():
        for attr, value in vars(importlib.import_module(name)).items():
            if isinstance(value, KernelInterface) and attr.endswith("_kernel"):
                if id(jit_parts(value)[0]) not in covered:
                    missing.append(f"{name}.{attr}")
    for path in sorted((ROOT / "csrc").glob("*.cu")):
        if str(path.relative_to(ROOT)) not in sources:
            missing.append(str(path.relative_to(ROOT)))
    return missing


def jit_parts(kernel):
    """(JITFunction, autotune configs or None) of a possibly autotuned / heuristics kernel."""
    from triton.runtime.jit import JITFunction

    configs = None
    while not isinstance(kernel, JITFunction):
        if configs is None and hasattr(kernel, "configs"):
            configs = kernel.configs
        kernel = kernel.fn
    return kernel, configs


def config_label(config):
    if config is None:
        return "-"
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks} w{config.num_warps} s{config.num_stages}".strip()


def resolve_args(entry, variant, dtype):
    args = entry.get("args", {})
    args = dict(args(dtype) if callable(args) else args)
    extra = entry.get("variants", {}).get(variant, {}) if variant != "-" else {}
    args.update(extra(dtype) if callable(extra) else extra)
    return args


def triton_jobs(module, index, entry, archs, dtypes=None, quick=False):
    """One job per (variant, dtype, config, arch) of a Triton INSPECT entry; quick: only the
    first config the kernel keeps (the one CCKERNELS_AUTOTUNE=0 runs)."""
    import torch

    fn, configs = jit_parts(entry["kernel"])
    variants = list(entry.get("variants", {})) or ["-"]
    # a kernel with none of the requested dtypes still runs once, in its first
    chosen = [d for d in entry["dtypes"] if not dtypes or DTYPE_NAMES[torch_name(d)] in dtypes]
    for variant in variants:
        for dtype in chosen or entry["dtypes"][:1]:
            for arch in (a for a in archs if a in entry.get("archs", archs)):
                indices = range(len(configs)) if configs else [None]
                if quick and configs:
                    kept = kept_configs(entry, arch, dtype, resolve_args(entry, variant, dtype))
                    indices = [next((i for i in indices if config_label(configs[i]) in kept), 0)]
                for c in indices:
                    yield {"kind": "triton", "module": module, "index": index, "op": entry["op"],
                           "kernel": fn.__name__, "variant": variant, "dtype": torch_name(dtype),
                           "config_index": c, "arch": arch}  # fmt: skip


def kernel_variants(ops, archs):
    """{(Triton kernel name, variant)} of the INSPECT entries of these ops (None: all) that
    compile for any of these archs; "-" stands for no variants."""
    found = set()
    for _, _, entry in specs():
        if "kernel" in entry and (not ops or entry["op"] in ops) and set(archs) & set(entry.get("archs", archs)):
            name = jit_parts(entry["kernel"])[0].__name__
            found.update((name, variant) for variant in entry.get("variants") or ["-"])
    return found


def kept_configs(entry, arch, dtype, args):
    """Labels of the configs the kernel itself would run on this arch (all by default)."""
    _, configs = jit_parts(entry["kernel"])
    if configs is None:
        return None
    keep = entry.get("configs")
    return {config_label(c) for c in (keep(configs, arch, dtype, args) if keep else configs)}


# ----------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------
def triton_signature(fn, args, dtype_name):
    """(signature, constexprs, attrs) for ASTSource from an INSPECT args dict."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        # the exact name, else the longest (most specific) matching glob, else i32
        globs = sorted((k for k in args if fnmatch.fnmatchcase(name, k)), key=lambda k: (k != name, -len(k)))
        value = args[globs[0]] if globs else "i32"
        if isinstance(value, str) and re.fullmatch(r"\*?T|\*?(fp|bf|i|u)\d+(:16)?", value):
            ty, _, div = value.partition(":")
            ty = ty.replace("T", dtype_name)
            signature[name] = ty
            if ty.startswith("*") or div:  # torch allocations are 16-byte aligned
                attrs[(i,)] = [["tt.divisibility", 16]]  # what Triton's "D" specialization means
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    return signature, constexprs, attrs


def compile_triton(job, use_cache=True):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    entry = importlib.import_module(job["module"]).INSPECT[job["index"]]
    fn, configs = jit_parts(entry["kernel"])
    dtype = getattr(torch, job["dtype"])
    args = resolve_args(entry, job["variant"], dtype)
    config = configs[job["config_index"]] if configs else None
    options = {"num_warps": 4, "num_stages": 3, **entry.get("options", {})}  # Triton's launch defaults
    if config is not None:
        args.update(config.kwargs)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    args = {name: value(args) if callable(value) and name in fn.arg_names else value for name, value in args.items()}
    signature, constexprs, attrs = triton_signature(fn, args, DTYPE_NAMES[job["dtype"]])
    key = [triton.__version__, job["arch"], fn.cache_key, signature, repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), options]  # fmt: skip

    def compute():
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", job["arch"], 32), options=options)
        except Exception as e:  # a config that does not compile is a finding, not a crash
            return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            Path(path).write_bytes(compiled.asm["cubin"])
            (info,) = analyze_cubin(path).values()
        info["smem"] = compiled.metadata.shared  # what a launch asks for (Triton's smem is dynamic)
        return info

    row = {**job, "config": config_label(config), **cached(key, compute, use_cache)}
    row.pop("config_index")
    return row


def compile_cuda(job, use_cache=True):
    """Rows for every kernel of one csrc/*.cu file for one arch, via nvcc -cubin."""
    source = ROOT / job["source"]
    headers = sorted(p for p in source.parent.glob("*") if p.suffix in (".h", ".cuh"))
    nvcc = shutil.which("nvcc")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = [version, job["arch"], NVCC_FLAGS, source.read_text(), [(p.name, p.read_text()) for p in headers]]

    def compute():
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "k.cubin")
            cmd = [nvcc, "-cubin", *NVCC_FLAGS, f"-arch=sm_{job['arch']}", "--resource-usage",
                   f"-I{source.parent}", str(source), "-o", out]  # fmt: skip
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                return [{"kernel": "?", "error": f"nvcc failed: {run.stderr.strip()[-500:]}"}]
            kernels = analyze_cubin(out)
        names = demangle(list(kernels))
        rows = []
        for mangled, info in sorted(kernels.items(), key=lambda kv: names[kv[0]]):
            full = names[mangled]
            match = re.match(r"(?:void )?(?:\w+::)*(\w+)(?:<(.*)>)?\(", full)
            kernel, template = (match.group(1), match.group(2) or "-") if match else (full, "-")
            dtype = next((d for t, d in (("__nv_bfloat16", "bfloat16"), ("__half", "float16"), ("float", "float32"))
                          if re.search(rf"\b{t}\b", template)), "-")  # fmt: skip
            rows.append({"kernel": kernel, "config": re.sub(r"\bcck::", "", template).strip(), "dtype": dtype,
                         "name": full, **info, "smem": info["static_smem"]})  # fmt: skip
        return rows

    return [{**job, "variant": "-", **row} for row in cached(key, compute, use_cache)]


def run_job(job, use_cache):
    return [compile_triton(job, use_cache)] if job["kind"] == "triton" else compile_cuda(job, use_cache)


# ----------------------------------------------------------------------------------------
# Expectations
# ----------------------------------------------------------------------------------------
def check(row, expect, kept=None):
    """(status, [failure messages]) of one row against the generic rules and its expectations."""
    if kept is not None and row["config"] not in kept:
        return "pruned", []  # the kernel's own rule never runs this config on this arch
    if "error" in row:
        return "FAIL", [f"does not compile: {row['error']}"]
    failures = []
    if row["smem"] > SMEM_LIMIT[row["arch"]]:
        failures.append(f"shared memory {row['smem']} B > {SMEM_LIMIT[row['arch']]} B")
    if row["local"] or row["counts"]["stl"] or row["counts"]["ldl"]:
        stl, ldl = row["counts"]["stl"], row["counts"]["ldl"]
        failures.append(f"spills: {row['local']} B local memory per thread, {stl} STL, {ldl} LDL")
    wanted = {k: v for k, v in expect.items() if not k.startswith("sm")}
    wanted.update(expect.get(f"sm{row['arch']}", {}))
    for counter, want in wanted.items():
        have = row["counts"][counter]
        if want is True and have == 0 or want is False and have > 0 or type(want) is int and have != want:
            failures.append(f"{counter}: {have} (expected {'> 0' if want is True else 0 if want is False else want})")
    return ("FAIL" if failures else "ok"), failures


def expectations(entry, dtype):
    expect = entry.get("expect", {})
    return expect(dtype) if callable(expect) else expect


def evaluate(rows):
    """Add "status" and "failures" to every row, from the INSPECT entry that produced it."""
    import torch

    for row in rows:
        entry = importlib.import_module(row["module"]).INSPECT[row["index"]]
        if row["kind"] == "triton":
            dtype = getattr(torch, row["dtype"])
            kept = kept_configs(entry, row["arch"], dtype, resolve_args(entry, row["variant"], dtype))
            expect = expectations(entry, dtype)
        else:
            kept = None
            expect = {}
            for pattern, e in entry.get("expect", {}).items():
                if re.search(pattern, row.get("name", "")):
                    expect.update(e)
        row["status"], row["failures"] = check(row, expect, kept)
    return rows


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------
def collect(ops=None, archs=ARCHS, dtypes=None, kernels=None, variants=None, cuda=True, jobs=None, use_cache=True,
            quick=False, cuda_archs=None):  # fmt: skip
    """Compile and check; returns the rows (dicts), sorted as printed.

    ops / dtypes ("fp16") / kernels / variants: None for all (dtypes does not filter csrc).
    cuda: include csrc/*.cu, for cuda_archs (default: archs). quick: one config per Triton
    kernel (see triton_jobs).
    """
    problem = next(filter(None, blockers(cuda)), None)
    if problem:  # here, not in a worker's traceback
        raise RuntimeError(problem)
    todo = []
    for module, index, entry in specs():
        if ops and entry["op"] not in ops:
            continue
        if "source" in entry:
            if cuda:
                job = {"kind": "cuda", "module": module, "index": index, "op": entry["op"], "source": entry["source"]}
                todo += [{**job, "arch": arch} for arch in cuda_archs or archs]
        elif not kernels or jit_parts(entry["kernel"])[0].__name__ in kernels:
            new = triton_jobs(module, index, entry, archs, dtypes, quick)
            todo += [j for j in new if not variants or j["variant"] in variants]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        results = [run_job(j, use_cache) for j in todo]
    else:
        # fork: workers inherit the imported modules; each compile is independent
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(run_job, todo, [use_cache] * len(todo)))
    rows = [row for result in results for row in result]
    order = {"triton": 0, "cuda": 1}
    rows.sort(key=lambda r: (r["op"], order[r["kind"]], r["kernel"], r["variant"], r["config"], r["dtype"], r["arch"]))
    return evaluate(rows)


COLUMNS = ["op", "kind", "kernel", "variant", "config", "dtype", "arch", "regs", "smem", "local",
           "hgmma", "hmma", "ldg128", "stg128", "ldg", "stg", "ldgsts", "status"]  # fmt: skip


def cells(row):
    counts = row.get("counts", {})
    values = {**row, **counts, "dtype": DTYPE_NAMES.get(row["dtype"], row["dtype"]), "arch": f"sm{row['arch']}"}
    if "error" in row:
        values.update(dict.fromkeys(["regs", "smem", "local", *COUNTERS], "?"))
    return [str(values.get(c, "")) for c in COLUMNS]


def table(rows, markdown=False):
    lines = [COLUMNS] + [cells(r) for r in rows]
    if markdown:
        out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines[1:]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def failures(rows):
    return [f"{r['op']} {r['kernel']} [{r['config']}] {r['dtype']} {r['variant']} sm{r['arch']}: {f}"
            for r in rows for f in r["failures"]]  # fmt: skip


MARKDOWN_HEADER = """# Compiled kernels: registers, shared memory, spills, instruction mix

Generated by `python -m cckernels.inspect {args} > docs/inspect.md` (no GPU needed: every
kernel compiled ahead of time; --dtype picks the Triton kernels' dtypes, the CUDA kernels come
in every dtype they are built for). Columns: registers per thread,
shared memory per block in bytes (Triton: what the launch requests; CUDA: static only, which
on sm90 includes the 1 KB the system reserves), local memory per thread in bytes (spills),
then SASS instruction counts: HGMMA (sm90 warpgroup MMA), HMMA (sm80 tensor-core MMA), 128-bit
global loads/stores, all global loads/stores, LDGSTS (cp.async global->shared). status: ok,
FAIL (listed below), or pruned (a config the kernel's own rule never runs on that arch).
"""


def at_least_one(text):
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cckernels.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS,
                        help=f"target archs (default: {' '.join(map(str, ARCHS))})")
    parser.add_argument("--op", nargs="+", default=["all"],
                        help="attention, group_norm, ema_update_, ... (default: all)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPE_NAMES.values()),
                        help="the Triton kernels' dtypes (default: all); csrc's come in every dtype they are built for")
    parser.add_argument("--kernel", nargs="+", help="Triton kernel names, e.g. _ema_kernel (default: all); "
                        "csrc rows are not filtered by it (--no-cuda leaves them out)")
    parser.add_argument("--variant", nargs="+", help="variants of the Triton kernels' specs, e.g. d64, or - for "
                        "kernels without (default: all); csrc rows are not filtered by it")
    parser.add_argument("--no-cuda", action="store_true",
                        help="skip csrc/*.cu (without nvcc on PATH they are skipped with a note)")
    parser.add_argument("--cuda-arch", type=int, nargs="+", choices=ARCHS, help="archs for csrc (default: --arch)")
    parser.add_argument("--quick", action="store_true", help="one config per Triton kernel: the first it keeps")
    parser.add_argument("--jobs", type=at_least_one, default=os.cpu_count() or 1,
                        help="parallel compiles, >= 1 (default: the CPU count, %(default)s here)")
    parser.add_argument("--no-cache", action="store_true", help=f"recompile everything (cache: {cache_dir()})")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON (its folder is created)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown page instead of the table")
    args = parser.parse_args(argv)
    if args.json:
        try:  # fail now, not after the compiling; "a" leaves an existing file as it is
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).open("a").close()
        except OSError as e:
            parser.error(f"--json {args.json}: cannot write there ({e.strerror or e})")
    no_rows, no_csrc = blockers(cuda=not args.no_cuda)
    if no_rows:
        parser.exit(2, f"{parser.prog}: error: {no_rows}\n")
    # without nvcc the Triton rows are still worth having
    skipped = no_csrc and (f"csrc rows skipped: {no_csrc} (put the CUDA toolkit's bin on PATH to get them; "
                           "--no-cuda leaves them out without this note)")
    ops = None if "all" in args.op else args.op
    known = {entry["op"] for _, _, entry in specs()}
    if ops and set(ops) - known:
        parser.error(f"unknown --op {sorted(set(ops) - known)}; known: {sorted(known)}")
    choices = kernel_variants(ops, args.arch)
    kernels = {k for k, _ in choices}
    variants = {v for k, v in choices if not args.kernel or k in args.kernel}
    for flag, picked, known in (("--kernel", args.kernel, kernels), ("--variant", args.variant, variants)):
        if picked and set(picked) - known:
            unknown = sorted(set(picked) - known)
            parser.error(f"unknown {flag} {unknown}; known, given the other options: {sorted(known)}")
    rows = collect(ops, args.arch, args.dtype, args.kernel, args.variant, not (args.no_cuda or no_csrc), args.jobs,
                   not args.no_cache, args.quick, args.cuda_arch)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    failed = failures(rows) + [f"{kernel}: no INSPECT entry" for kernel in missing_specs()]
    if args.markdown:
        print(MARKDOWN_HEADER.format(args=" ".join(sys.argv[1:] if argv is None else argv)))
        print(table(rows, markdown=True))
        if skipped:
            print(f"\n{skipped}.")
        print("\n## Failed expectations\n")
        print("\n".join(f"- {f}" for f in failed) or "None.")
    else:
        print(table(rows))
        print(f"\n{len(rows)} kernels, {sum(r['status'] == 'pruned' for r in rows)} pruned configs, "
              f"{len(failed)} failed expectations", file=sys.stderr)  # fmt: skip
        for f in failed:
            print(f"FAIL {f}", file=sys.stderr)
    if skipped:
        print(f"note: {skipped}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
