"""Run configuration: defaults below, a YAML file on top (itself on top of the file its `base:`
key names, if any), then dotted `key=value` overrides.

Every valid key has a default here, so an unknown key (a typo) is an error that lists the
valid ones. `model.unet`, `model.vae` and `model.text_encoder` hold diffusers/transformers
config dicts and are passed through as they are.
"""
import copy
import difflib
import logging
import re
from pathlib import Path

import yaml

from cckernels.backend import check_number
from trainer.data import config as data_config
from trainer.diffusion import PREDICTION_TYPES, ddim_timesteps

log = logging.getLogger("trainer.config")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "tiny.yaml"

# Mappings whose keys belong to another library's config and are not checked here.
OPAQUE = {"model.unet", "model.vae", "model.text_encoder"}
# Where an encoder's weights come from (trainer/encoders.py): an override naming one source key
# drops the keys it cannot go with, so model.vae.path=DIR on tiny.yaml's {preset: tiny} means DIR.
SOURCE_CONFLICTS = {"preset": ("config", "path", "open_clip"), "config": ("preset", "path"),
                    "path": ("preset", "config"), "open_clip": ("preset",)}

# Checked here, at load time, so a typo fails before any model is built; the tuples belong
# to the code that uses the values.
CHOICES = {
    "data.format": data_config.FORMATS,
    "data.backend": data_config.BACKENDS,
    "diffusion.prediction_type": PREDICTION_TYPES,
    "train.precision": ("bf16", "bf16-weights", "fp32"),
    "model.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}
# Integer keys and their smallest valid value (the loop divides by the step intervals).
MIN_INT = {
    "train.steps": 1, "train.batch_size": 1, "train.grad_accum": 1, "train.log_every": 1,
    "train.warmup_steps": 0, "train.max_bad_steps": 1, "checkpoint.every": 1, "checkpoint.keep": 0,
    "sample.every": 0, "sample.steps": 1, "sample.n": 1, "ema.start_step": 0, "ema.every": 1, "seed": 0,
}

# Number keys (every key with a float default) and their intervals (low, high, low open, high
# open), checked at load time so the error names the key: a negative train.grad_clip flipped
# every gradient.
INF = float("inf")
NUMBER_RANGES = {
    "train.lr": (0, INF, False, True), "train.weight_decay": (0, INF, False, True),
    "train.grad_clip": (0, INF, True, False), "ema.decay": (0, 1, False, False),
    "diffusion.caption_dropout": (0, 1, False, False), "diffusion.min_snr_gamma": (0, INF, True, True),
    "sample.guidance": (0, INF, False, True), "train.dist_timeout_s": (0, 7 * 24 * 3600, True, False),
}

DEFAULTS = {
    "model": {
        "unet": {},
        "vae": {},  # {path: local diffusers AutoencoderKL folder} or {config: {...}} (random init)
        # {path: local CLIP text model folder} or {config: {...}}; or {open_clip: ViT-H-14, path: file}
        "text_encoder": {},
        # A new run's UNet weights (ignored when resuming): one of our runs or checkpoints (its
        # trained weights), or a diffusers UNet: a folder with diffusion_pytorch_model.safetensors,
        # a pipeline folder holding unet/ (SD2's), or a checkpoint's unet/ (its EMA weights).
        # E.g. the 512 px phase after a 256 px run, or fine-tuning SD2.
        "init_from": None,
        "channels_last": False,
        "gradient_checkpointing": False,
        # torch.compile the UNet: false, true (inductor) or a torch.compile backend name; the
        # cckernels ops are traced into its graph (cckernels/tracing.py), no graph break
        "compile": False,
        # inductor's mode: reduce-overhead replays each step as CUDA graphs (see train.py for
        # where it is refused); max-autotune-no-cudagraphs tunes inductor's own kernels
        "compile_mode": "default",
    },
    "diffusion": {
        "prediction_type": "epsilon",
        "min_snr_gamma": None,  # e.g. 5.0 for min-SNR weighting
        "caption_dropout": 0.1,  # probability of training on the empty caption (for CFG)
    },
    "data": {
        "path": "builtin",  # the Creative-Commons sample images shipped with scikit-image
        "format": "folder",
        "backend": "pil",
        "resolution": 64,
        "random_crop": True,
        "random_flip": True,
        "workers": 2,
        "caption_field": "text",  # or synthetic_text: the BLIP-2 captions of trainer.caption
    },
    "train": {
        "steps": 300,
        "batch_size": 4,  # per rank
        "grad_accum": 1,
        "lr": 1e-4,
        "warmup_steps": 20,
        "weight_decay": 0.01,
        "betas": [0.9, 0.999],
        "grad_clip": 1.0,  # the gradients' largest global L2 norm; .inf: no clipping
        # bf16: autocast with fp32 weights on GPU (a CPU trains in fp32); bf16-weights: autocast
        # with bf16 weights (GroupNorms' stay fp32) and fp32 masters in the optimizer, on any
        # device: no weight casts (~1,100 copy kernels a step for SD2), grads in bf16 (half the
        # memory and all-reduce bytes; with train.grad_accum > 1 they also add up in bf16);
        # checkpoints and exports hold the fp32 masters
        "precision": "bf16",
        # true: torch.use_deterministic_algorithms (cuDNN, cuBLAS, our attention's atomic-free
        # backward), so a GPU run, and its resume, repeat bit for bit; somewhat slower
        "deterministic": False,
        # true (CUDA): the UNet's forward and backward replayed as CUDA graphs
        # (trainer/graphs.py): at small micro-batches the host launching ~4,000 kernels a step
        # is the bottleneck; not with grad_accum > 1, gradient checkpointing or torch.compile
        "cuda_graphs": False,
        "max_bad_steps": 10,  # consecutive non-finite steps before the run stops
        # how long ranks wait for each other (a collective, a barrier while rank 0 writes a
        # checkpoint) before the run fails: a hung rank stops the run after this long
        "dist_timeout_s": 1800,
        "log_every": 10,
    },
    "ema": {
        "decay": 0.999,
        "start_step": 0,  # no EMA memory before this step (CommonCanvas: last ~3.5%)
        "every": 1,  # update every N steps with decay**N (fewer passes over memory, the same average)
        "warmup": False,  # true: decay min(ema.decay, (1 + t) / (10 + t)), t steps after the start
    },
    "checkpoint": {"every": 100, "keep": 2},  # keep: the newest checkpoints kept; 0: all
    "sample": {
        "every": 0,  # 0: only at the end
        "prompts": ["a photograph of an astronaut", "a cup of coffee on a table"],
        "n": 4,  # images per prompt: the grid's columns
        "steps": 25,
        "guidance": 4.0,
        "seed": 0,
    },
    "out_dir": "runs/tiny",
    "resume": True,
    "seed": 0,
}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 3e-4 (no dot) as a string; read it as a float, as YAML 1.2 does. A key
    written twice in one mapping is an error (PyYAML keeps the last in silence)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is written twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml(text, where):
    """The YAML in text (a string or file); a syntax error is a ValueError naming `where`, as
    the config's other mistakes are (train.py says them in one line)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: {_one_line(e)}") from None


def _one_line(e):
    """A YAML error as one line, its places as line and column: PyYAML's own spans up to six,
    repeating the file's name or an override's text and pointing at it with a caret."""
    if not isinstance(e, yaml.MarkedYAMLError):
        return " ".join(str(e).split())
    at = lambda mark: f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""  # noqa: E731
    said = [f"{text}{at(mark)}" for text, mark in ((e.context, e.context_mark), (e.problem, e.problem_mark)) if text]
    return ": ".join(said)


def _flat_keys(tree, prefix=""):
    keys = []
    for k, v in tree.items():
        key = prefix + k
        if isinstance(v, dict) and key not in OPAQUE:
            keys += _flat_keys(v, key + ".")
        else:
            keys.append(key)
    return keys


VALID_KEYS = _flat_keys(DEFAULTS)


def _unknown(key):
    close = difflib.get_close_matches(key, VALID_KEYS, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(VALID_KEYS)}")


def _set(cfg, key, value):
    parts = key.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[:i]) in OPAQUE:  # model.unet.sample_size=32 goes inside the dict
            break
    else:
        i = len(parts)
        if key not in VALID_KEYS:
            raise _unknown(key)
    node = cfg
    for p in parts[: i - 1]:
        node = node[p]
    head, rest = parts[i - 1], parts[i:]
    if not rest:
        node[head] = value
        return
    node = node.setdefault(head, {})
    if ".".join(parts[:i]) in ("model.vae", "model.text_encoder"):
        for other in SOURCE_CONFLICTS.get(rest[0], ()):
            node.pop(other, None)
    for p in rest[:-1]:
        node = node.setdefault(p, {})
    node[rest[-1]] = value


def _merge(cfg, tree, prefix=""):
    for k, v in tree.items():
        key = prefix + k
        section = key not in VALID_KEYS and any(x.startswith(key + ".") for x in VALID_KEYS)
        if section and v is None:  # a section whose keys are all commented out
            continue
        if section and not isinstance(v, dict):
            keys = ", ".join(x for x in VALID_KEYS if x.startswith(key + "."))
            raise ValueError(f"{key} must be a mapping of its keys ({keys}), got {v!r}")
        if isinstance(v, dict) and key not in OPAQUE:
            if not section:
                raise _unknown(key)
            _merge(cfg, v, key + ".")
        else:
            if key == "model.unet" and isinstance(v, dict) and cfg["model"]["unet"]:
                dropped = sorted(set(cfg["model"]["unet"]) - set(v))
                if dropped:  # a UNet config is one whole; said, as a child file may mean to change one key
                    log.warning("model.unet replaces the base config's whole, so its %s take diffusers' defaults; "
                                "model.unet.KEY=VALUE overrides change one key", ", ".join(dropped))
            _set(cfg, key, v)


def parse_overrides(items):
    """['train.lr=3e-4', 'resume=false'] -> [('train.lr', 0.0003), ('resume', False)]."""
    pairs = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. train.steps=100)")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), _yaml(value, f"override {item!r}")))
    return pairs


def _read(path, chain=()):
    """(path, tree) of a YAML file and of the files its `base: FILE` names (relative to it), base
    first: each file's keys go on top of its base's (a model.unet mapping replaces the base's)."""
    path = Path(path).resolve()
    if path in chain:
        raise ValueError(f"config bases form a cycle: {' -> '.join(p.name for p in (*chain, path))}")
    if not path.is_file():
        raise FileNotFoundError(f"config {path} " + ("is a folder, not a YAML file" if path.is_dir() else "not found")
                                + (f" (the base of {chain[-1]})" if chain else ""))
    with open(path) as f:
        tree = _yaml(f, f"config {path}") or {}
    if not isinstance(tree, dict):
        raise ValueError(f"config {path} must be a mapping of config keys, got a {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ValueError(f"config {path}: base must name one file, got {base!r}")
    return (_read(path.parent / base, (*chain, path)) if base else []) + [(path, tree)]


def load(path=None, overrides=()):
    """The full config: DEFAULTS <- YAML file (default configs/tiny.yaml; on top of its base, if
    it names one) <- overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    for file, tree in _read(path or DEFAULT_CONFIG):
        try:
            _merge(cfg, tree)
        except ValueError as e:
            raise ValueError(f"config {file}: {e}") from None
    for key, value in parse_overrides(overrides):
        _set(cfg, key, value)
    for key, allowed in CHOICES.items():
        value = get(cfg, key)
        if value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    for key, low in MIN_INT.items():
        value = get(cfg, key)
        if type(value) is not int or value < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
    for key, (low, high, low_open, high_open) in NUMBER_RANGES.items():
        value = get(cfg, key)
        if not (value is None and key == "diffusion.min_snr_gamma"):  # None: no min-SNR weighting
            check_number(key, value, low, high, low_open=low_open, high_open=high_open)
    betas = get(cfg, "train.betas")
    if not (isinstance(betas, list) and len(betas) == 2):
        raise ValueError(f"train.betas must be a list of two numbers in [0, 1), got {betas!r}")
    for beta in betas:
        check_number("train.betas", beta, 0, 1, high_open=True)
    data_config.DataConfig.from_dict(cfg["data"])  # its checks, before resume=false moves an earlier run aside
    # The run samples at its end, before the export: a bad setting here must not fail it there.
    prompts = get(cfg, "sample.prompts")
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
        raise ValueError(f"sample.prompts must be a non-empty list of strings, got {prompts!r}")
    try:
        ddim_timesteps(get(cfg, "sample.steps"))
    except ValueError as e:
        raise ValueError(f"sample.steps: {e}") from None
    for key in VALID_KEYS:  # a switch by its default (resume=maybe)
        default, value = get(DEFAULTS, key), get(cfg, key)
        if type(default) is bool and type(value) is not bool and not (key == "model.compile" and type(value) is str):
            raise ValueError(f"{key} must be true or false" + " or a torch.compile backend" * (key == "model.compile")
                             + f", got {value!r}")
    backend = get(cfg, "model.compile")
    if isinstance(backend, str):  # torch.compile's own error came after the data and models were loaded
        from torch._dynamo import list_backends

        if backend not in list_backends(exclude_tags=()):
            raise ValueError(f"model.compile={backend!r} is not a torch.compile backend: true (inductor) or a "
                             f"name torch._dynamo.list_backends() gives, e.g. aot_eager, eager, cudagraphs")
    return cfg


def changes(old, new):
    """[(key, old value, new value)] for each valid key whose value differs between two full
    configs (model.unet and the encoders' sections compared whole)."""
    return [(k, get(old, k), get(new, k)) for k in VALID_KEYS if get(old, k) != get(new, k)]


def get(cfg, key):
    node = cfg
    for p in key.split("."):
        node = node[p]
    return node


def dump(cfg, path):
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
