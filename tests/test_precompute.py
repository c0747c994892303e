import gc
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from test_data import BACKENDS, REPO, encode, make_folder, repo_env, smooth_image
from tiny_models import TINY_UNET, StandInUNet, needs_open_clip, tiny_open_clip_arch

from trainer import checkpoint, train
from trainer import precompute as pc
from trainer.data import build_index, builtin_dataset_path, make_loader
from trainer.data.latents import TEXT_KEY, latent_key, prefetched, shard_file
from trainer.data import decode_once
from trainer.diffusion import NoiseSchedule, training_loss
from trainer.encoders import (decode_latents, encode_images, encoder_config, load_open_clip_tower,
                              load_text_encoder, load_vae)

N, SHARD, RESOLUTIONS = 7, 3, [32, 64]


@pytest.fixture(scope="module")
def tiny():
    return encoder_config("tiny")


@pytest.fixture(scope="module")
def encoders(tiny):
    return load_vae(tiny["vae"]), load_text_encoder(tiny["text_encoder"])


def data_cfg(root, **kw):
    return {"path": str(root), "backend": "pil", "workers": 0, **kw}


def run(tiny, root, out, cache, **kw):
    kw = {"batch_size": 2, "shard_size": SHARD, **kw}
    pc.precompute(data_cfg(root), tiny["vae"], tiny["text_encoder"], RESOLUTIONS, out,
                  cache_dir=cache, **kw)


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory, tiny):
    """N images (one more unreadable) precomputed at 32 and 64 px in shards of 3."""
    tmp = tmp_path_factory.mktemp("pre")
    root = make_folder(tmp / "images", N, captions="jsonl")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    run(tiny, root, tmp / "latents", str(tmp / "cache"))
    return root, tmp / "latents", str(tmp / "cache")


def read_shard(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads((f.metadata() or {}).get("samples", "[]"))


def test_index_describes_the_shards(precomputed, encoders):
    _, out, _ = precomputed
    meta = json.loads((out / "index.json").read_text())
    assert meta["count"] == N and [s["count"] for s in meta["shards"]] == [3, 3, 1]
    assert meta["resolutions"] == RESOLUTIONS and meta["dtype"] == "float16"
    assert meta["latent_shapes"] == {"32": [4, 4, 4], "64": [4, 8, 8]}
    assert meta["text_embedding_shape"] == [77, 32] and meta["scaling_factor"] == 3.3
    assert meta["skipped_images"][0][0] == "broken.jpg"
    for s in meta["shards"]:
        assert (out / s["file"]).stat().st_size == s["bytes"]
        assert pc.hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]


def test_round_trip(precomputed, encoders):
    root, out, cache = precomputed
    vae, text = encoders
    tensors, samples = read_shard(out / shard_file(1))
    assert [s["name"] for s in samples] == ["img03.png", "img04.jpg", "img05.jpg"]
    assert [s["caption"] for s in samples] == ["caption 3", "caption 4", "caption 5"]
    assert samples[0]["license"] == "CC0" and samples[0]["source"] == "https://example.org/3"
    for r in RESOLUTIONS:
        z = tensors[latent_key(r)]
        assert z.dtype == torch.float16 and z.shape == (3, 4, r // 8, r // 8)
        assert decode_latents(vae, z.float()).shape == (3, 3, r, r)
        # What a fresh encode of the centre-cropped images gives, up to float16 rounding.
        index = build_index(root, cache_dir=cache)
        (images, _), = decode_once(index, data_cfg(root, resolution=r), [3, 4, 5], 3)
        torch.testing.assert_close(z, encode_images(vae, images).half(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(tensors[TEXT_KEY], text.encode([s["caption"] for s in samples]).half(),
                               atol=1e-3, rtol=1e-3)
    empty, _ = read_shard(out / "empty.safetensors")
    torch.testing.assert_close(empty[TEXT_KEY], text.empty_embedding().half(), atol=1e-3, rtol=1e-3)


@needs_open_clip
def test_round_trip_with_open_clip(tmp_path, tiny):
    """Captions through an OpenCLIP checkpoint: stored embeddings are what a fresh encode gives."""
    arch = tiny_open_clip_arch()
    torch.save(load_open_clip_tower({"open_clip": arch, "config": {}}).state_dict(), tmp_path / "text.bin")
    text_cfg = {"open_clip": arch, "path": str(tmp_path / "text.bin")}
    root = make_folder(tmp_path / "images", 3, captions="jsonl")
    out = tmp_path / "latents"
    pc.precompute(data_cfg(root), tiny["vae"], text_cfg, [32], out, batch_size=2, shard_size=2,
                  cache_dir=str(tmp_path / "cache"))
    meta = json.loads((out / "index.json").read_text())
    assert meta["text_embedding_shape"] == [77, 32] and meta["text_encoder"] == text_cfg
    text = load_text_encoder(text_cfg)
    for k in range(2):
        tensors, samples = read_shard(out / shard_file(k))
        torch.testing.assert_close(tensors[TEXT_KEY], text.encode([s["caption"] for s in samples]).half(),
                                   atol=1e-3, rtol=1e-3)
    empty, _ = read_shard(out / "empty.safetensors")
    torch.testing.assert_close(empty[TEXT_KEY], text.empty_embedding().half(), atol=1e-3, rtol=1e-3)


def test_decode_once_every_sample_once_in_order(tmp_path):
    root = make_folder(tmp_path / "d", 5)
    index = build_index(root, cache_dir=str(tmp_path / "c"))
    for backend in [b if isinstance(b, str) else b.values[0] for b in BACKENDS]:
        batches = list(decode_once(index, data_cfg(root, backend=backend, resolution=24), [4, 0, 2, 1, 3], 2))
        assert [ids for _, ids in batches] == [[4, 0], [2, 1], [3]]
        assert [x.shape[0] for x, _ in batches] == [2, 2, 1] and batches[0][0].shape[1:] == (3, 24, 24)


def test_resume_keeps_finished_shards(tmp_path, tiny, monkeypatch, caplog):
    root = make_folder(tmp_path / "images", N)
    (root / "img01.txt").write_text("a long caption " * 10)  # 150 bytes: the byte tokenizer keeps 75
    out, cache = tmp_path / "latents", str(tmp_path / "cache")
    written, write = [], pc._write_shard

    def killed_after_one(out_, k, *a):
        if written:
            raise KeyboardInterrupt  # the process dies after its first shard
        written.append(k)
        write(out_, k, *a)

    monkeypatch.setattr(pc, "_write_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, root, out, cache)
    assert written == [0] and not (out / "index.json").exists()
    first = (out / shard_file(0)).stat().st_mtime_ns

    def counting(out_, k, *a):
        written.append(k)
        write(out_, k, *a)

    monkeypatch.setattr(pc, "_write_shard", counting)
    written.clear()
    with caplog.at_level("WARNING", logger="trainer.precompute"):
        run(tiny, root, out, cache)
    assert written == [1, 2] and (out / shard_file(0)).stat().st_mtime_ns == first
    assert json.loads((out / "index.json").read_text())["count"] == N
    # The long caption was encoded before the kill: its shard's entry still counts it.
    assert f"precompute: 1 of {N} captions are longer than the text encoder's 77 tokens" in caplog.text
    with pytest.raises(ValueError, match="other data or settings.*shard_size"):
        run(tiny, root, out, cache, shard_size=4)
    with pytest.raises(ValueError, match=r"other data or settings \(differing: \['precision'\]"):
        run(tiny, root, out, cache, precision="bf16")
    # Another decoder (DALI's resize is not PIL's) would mix its images in too.
    monkeypatch.setattr(pc, "decoder_name", lambda backend, device: "dali cpu")
    with pytest.raises(ValueError, match=r"other data or settings \(differing: \['decoder'\]"):
        run(tiny, root, out, cache)
    monkeypatch.undo()
    # A cache (the benchmarks') is written anew instead.
    run(tiny, root, out, cache, shard_size=4, replace_other=True)
    assert json.loads((out / "plan.json").read_text())["shard_size"] == 4
    assert not (out / shard_file(2)).exists() and json.loads((out / "index.json").read_text())["count"] == N


def counting_writes(monkeypatch):
    written, write = [], pc._write_shard
    monkeypatch.setattr(pc, "_write_shard", lambda o, k, *a: (written.append(k), write(o, k, *a)))
    return written


def test_rerun_encodes_the_shards_whose_samples_changed(tmp_path, tiny, monkeypatch, caplog):
    """An edited caption and a replaced image: their shards, and only those, are encoded again."""
    root = make_folder(tmp_path / "images", 10)
    out, cache = tmp_path / "latents", str(tmp_path / "cache")
    run(tiny, root, out, cache, shard_size=4)
    written = counting_writes(monkeypatch)
    (root / "img01.txt").write_text("edited")
    (root / "img08.jpg").write_bytes(encode(smooth_image(3, 40, 40)))
    with caplog.at_level("INFO", logger="trainer.precompute"):
        run(tiny, root, out, cache, shard_size=4)
    assert written == [0, 2] and "2 shards to encode again: their samples' captions or image files changed" in caplog.text
    assert read_shard(out / shard_file(0))[1][1]["caption"] == "edited"
    meta = json.loads((out / "index.json").read_text())
    assert [s["sha256"] for s in meta["shards"]] == [pc.hashlib.sha256((out / shard_file(k)).read_bytes()).hexdigest()
                                                     for k in range(3)]
    run(tiny, root, out, cache, shard_size=4)
    assert written == [0, 2]  # nothing changed since


def test_rerun_repairs_what_training_finds_damaged(precomputed, tiny, tmp_path, monkeypatch, caplog):
    """A shard of the right size with other bytes, and a cut empty-caption embedding: training
    skips the one and refuses the other, asking for a rerun; the rerun writes both anew."""
    root, good, cache = precomputed
    out = tmp_path / "latents"
    shutil.copytree(good, out)
    data = bytearray((out / shard_file(1)).read_bytes())
    data[-5] ^= 0xFF
    (out / shard_file(1)).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        make_loader(latents_cfg(out), 1, cache_dir=cache)
    assert "checksum mismatch (trainer.precompute run again with the same --out and --verify encodes it anew)" in caplog.text
    (out / "empty.safetensors").write_bytes((out / "empty.safetensors").read_bytes()[:-10])
    with pytest.raises(ValueError, match="empty caption's embedding.*damaged.*run trainer.precompute again"):
        make_loader(latents_cfg(out), 1, cache_dir=cache)
    written = counting_writes(monkeypatch)
    run(tiny, root, out, cache)  # sizes only: the shard of the right size is taken as it is
    assert written == []
    with caplog.at_level("INFO", logger="trainer.precompute"):
        run(tiny, root, out, cache, verify=True)
    assert written == [1] and "1 shards to encode again: their files do not match" in caplog.text
    for name in (shard_file(1), "empty.safetensors", "index.json"):
        assert (out / name).read_bytes() == (good / name).read_bytes(), name
    assert len(make_loader(latents_cfg(out), 1, cache_dir=cache).index) == N


def test_a_failed_write_leaves_no_temporary_file(tmp_path, tiny, monkeypatch):
    root = make_folder(tmp_path / "images", 4)
    out, cache = tmp_path / "latents", str(tmp_path / "cache")
    write_bytes = pc.Path.write_bytes

    def disk_full(path, data):
        if path.name.startswith(".shard-00001."):
            write_bytes(path, data[:10])
            raise OSError(28, "No space left on device")
        return write_bytes(path, data)

    monkeypatch.setattr(pc.Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(tiny, root, out, cache)
    monkeypatch.undo()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    (out / f".{shard_file(0)}.tmp99999").write_bytes(b"from a killed run")
    run(tiny, root, out, cache)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_out_holding_other_files_is_refused(tmp_path, tiny):
    root = make_folder(tmp_path / "images", 2)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "index.json").write_text("the user's own")
    with pytest.raises(ValueError, match=f"{out} is not empty and holds no plan.json.*give an empty or new --out"):
        run(tiny, root, out, str(tmp_path / "cache"))
    assert [p.name for p in out.iterdir()] == ["index.json"] and (out / "index.json").read_text() == "the user's own"


def test_ranks_split_the_shards(tmp_path, tiny, monkeypatch):
    root = make_folder(tmp_path / "images", N)
    out, cache = tmp_path / "latents", str(tmp_path / "cache")
    written = counting_writes(monkeypatch)
    # Rank 0 alone (rank 1 died): its shards, and no index while rank 1's shard is missing.
    with pytest.raises(RuntimeError, match=r"shards \[1\] .* are not finished; run again"):
        run(tiny, root, out, cache, rank=0, world_size=2)
    run(tiny, root, out, cache, rank=1, world_size=2)
    assert written == [0, 2, 1] and not (out / "index.json").exists()
    run(tiny, root, out, cache, rank=0, world_size=2)
    assert written == [0, 2, 1] and json.loads((out / "index.json").read_text())["count"] == N


def test_bad_arguments(tmp_path, tiny):
    root = make_folder(tmp_path / "images", 2)
    with pytest.raises(ValueError, match="multiples of the VAE's downsampling factor 8"):
        pc.precompute(data_cfg(root), tiny["vae"], tiny["text_encoder"], [30], tmp_path / "o",
                      cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="precision='fp8'"):
        pc.precompute(data_cfg(root), tiny["vae"], tiny["text_encoder"], [32], tmp_path / "o",
                      precision="fp8")


# ---- several processes ------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_after_torchrun(rank, ports, precompute_argv, train_argv):
    """One spawned rank: precompute.main again (the rerun), then train.main on the latents.
    Each main() starts its own process group, on its own port (a process group cannot be
    started twice through torchrun's store). Spawned, not forked: a fork of a pytest worker
    whose earlier tests ran autograd (its threads) fails in the child's first backward."""
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1 in the first run: the same bits
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(ports[0])
    pc.main(precompute_argv)
    os.environ["MASTER_PORT"] = str(ports[1])
    train.main(train_argv)


def test_two_ranks_precompute_resume_and_train_on_latents(tmp_path, tiny, monkeypatch):
    """The built-in images precomputed by 2 ranks under torch.distributed.run equal a
    single-process run; a rerun after a finished shard was deleted encodes only that shard;
    2 ranks then train on the latents."""
    cache, out = tmp_path / "cache", tmp_path / "latents"
    argv = ["--encoders", "tiny", "--data", "builtin", "--backend", "pil", "--workers", "0",
            "--resolutions", "32", "64", "--shard-size", "5", "--batch-size", "2",
            "--cache-dir", str(cache), "--out", str(out)]
    env = repo_env(CCKERNELS_CACHE=str(cache), CCKERNELS_BACKEND="torch")
    launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "-m", "trainer.precompute", *argv],
                            env=env, capture_output=True, text=True, timeout=300)
    assert launch.returncode == 0, launch.stderr[-3000:]
    # 12 images in shards of 5, 5, 2: shards 0 and 2 to rank 0, shard 1 to rank 1.
    assert "rank 0 of 2: 12 samples in 3 shards, 7 samples in 2 of them" in launch.stderr
    assert "rank 1 of 2: 12 samples in 3 shards, 5 samples in 1 of them" in launch.stderr

    index = build_index(builtin_dataset_path(str(cache)), cache_dir=str(cache))
    meta = json.loads((out / "index.json").read_text())
    shards = [read_shard(out / s["file"]) for s in meta["shards"]]
    assert [s["file"] for s in meta["shards"]] == [shard_file(k) for k in range(3)]
    assert [s["count"] for s in meta["shards"]] == [len(rows) for _, rows in shards] == [5, 5, 2]
    assert [row["name"] for _, rows in shards for row in rows] == [s.name for s in index.samples]
    for s in meta["shards"]:
        assert json.loads((out / s["file"].replace(".safetensors", ".json")).read_text()) == s
        assert pc.hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() == s["sha256"]

    # The same numbers as one process writing every shard (same batches, one thread each).
    single = tmp_path / "single"
    pc.precompute({"path": "builtin", "backend": "pil", "workers": 0}, tiny["vae"], tiny["text_encoder"],
                  [32, 64], single, batch_size=2, shard_size=5, cache_dir=str(cache))
    for (got, got_rows), k in zip(shards, range(3)):
        want, want_rows = read_shard(single / shard_file(k))
        assert got_rows == want_rows and got.keys() == want.keys()
        assert all(torch.equal(got[key], want[key]) for key in want), k
    assert json.loads((single / "index.json").read_text()) == meta

    # Rerun with shard 1 (rank 1's) deleted, in spawned ranks: only shard 1 is encoded again.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("shard-")}
    before = (out / shard_file(1)).read_bytes()
    (out / shard_file(1)).unlink()
    monkeypatch.setenv("CCKERNELS_CACHE", str(cache))
    monkeypatch.setenv("CCKERNELS_BACKEND", "torch")  # the interpreter would take minutes to train
    run_dir = tmp_path / "run"
    train_argv = ["data.format=latents", f"data.path={out}", "data.resolution=64", "train.steps=2",
                  "train.batch_size=2", "checkpoint.every=2", "ema.start_step=1", "train.log_every=1",
                  "sample.prompts=[a cat]", "sample.steps=2", f"out_dir={run_dir}"]
    mp.start_processes(_rank_after_torchrun, args=([_free_port(), _free_port()], argv, train_argv),
                       nprocs=2, start_method="spawn")
    assert (out / shard_file(1)).read_bytes() == before
    kept = {name: t for name, t in stamps.items() if not name.startswith("shard-00001.")}
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept and len(kept) == 4
    assert json.loads((out / "index.json").read_text()) == meta

    # Training: 2 ranks x 2 samples per step, 2 steps, from every rank's share of the 12 latents.
    ckpt = checkpoint.load(checkpoint.latest(run_dir))
    assert ckpt["state"]["step"] == 2 and ckpt["state"]["data_position"] == [0, 4]
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
    assert (run_dir / "samples" / "step_0000002.png").is_file()


# ---- data.format=latents --------------------------------------------------------------------


def latents_cfg(out, **kw):
    return {"path": str(out), "format": "latents", "resolution": 64, **kw}


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_latents_loader_batches_and_empty_embedding(precomputed, encoders):
    _, out, cache = precomputed
    loader = make_loader(latents_cfg(out, dtype="bfloat16", layout="NHWC"), 2, cache_dir=cache)
    (z, emb), = take(loader, 1)
    assert z.shape == (2, 8, 8, 4) and z.dtype == torch.bfloat16 and emb.shape == (2, 77, 32)
    assert loader.empty_embedding.shape == (1, 77, 32)
    torch.testing.assert_close(loader.empty_embedding.float(), encoders[1].empty_embedding(),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("batch", [7, 1])  # rows of three shards; of one (gathered in one take)
def test_latents_loader_rows_match_the_shards(precomputed, batch):
    _, out, cache = precomputed
    loader = make_loader(latents_cfg(out, resolution=32), batch, seed=4, cache_dir=cache)
    (z, emb), = take(loader, 1)
    rows = [read_shard(out / shard_file(k))[0] for k in range(3)]
    order = loader.shards(0)[0][:batch]
    for j, i in enumerate(order):
        assert torch.equal(z[j], rows[i // SHARD][latent_key(32)][i % SHARD].float())
        assert torch.equal(emb[j], rows[i // SHARD][TEXT_KEY][i % SHARD].float())


def test_latents_loader_shards_and_resume(precomputed):
    _, out, cache = precomputed
    kw = dict(seed=3, world_size=2, cache_dir=cache)
    loaders = [make_loader(latents_cfg(out), 1, rank=r, **kw) for r in range(2)]
    a, b = loaders[0].shards(0)
    assert not set(a) & set(b) and len(a) == len(b) == 3
    full = take(loaders[0], 7)  # 3 per epoch: into epoch 2
    assert loaders[0].position() == (2, 1)
    resumed = make_loader(latents_cfg(out), 1, rank=0, start=(1, 2), **kw)
    rest = take(resumed, 2)
    for (z, e), (z2, e2) in zip(full[5:], rest):
        assert torch.equal(z, z2) and torch.equal(e, e2)
    first = loaders[0]
    assert not np.array_equal(np.concatenate(first.shards(0)), np.concatenate(first.shards(1)))  # reshuffled


def test_prefetched_keeps_order_and_raises_at_the_failed_item():
    def items():
        yield from range(5)
        raise ValueError("shard 3 unreadable")

    got = []
    with pytest.raises(ValueError, match="shard 3 unreadable"):
        for x in prefetched(items(), 2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]
    assert list(prefetched(iter(range(3)), 1)) == [0, 1, 2]


def test_prefetched_reads_ahead_while_the_caller_works():
    made = []

    def items():
        for i in range(6):
            made.append(i)
            yield i

    it = prefetched(items(), 2)
    assert next(it) == 0
    deadline = time.monotonic() + 10
    while len(made) < 4 and time.monotonic() < deadline:  # the caller "trains" on item 0
        time.sleep(0.01)
    time.sleep(0.3)  # time enough to make a fifth, were the thread not waiting
    assert made == [0, 1, 2, 3]  # two queued, one waiting for room, no more
    assert list(it) == [1, 2, 3, 4, 5]


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "latents-prefetch"]


def test_latents_loader_thread_stops_when_the_iterator_is_dropped(precomputed):
    _, out, cache = precomputed
    before = len(prefetch_threads())
    it = iter(make_loader(latents_cfg(out), 2, cache_dir=cache))
    next(it)
    assert len(prefetch_threads()) == before + 1
    del it
    gc.collect()
    assert len(prefetch_threads()) == before


@pytest.mark.parametrize("device,gpu", [("cuda", 0), ("cuda:1", 1)])
def test_latents_prefetch_thread_sets_an_indexed_cuda_device(precomputed, monkeypatch, device, gpu):
    """The thread makes the loader's GPU current before pinning; torch.cuda.set_device refuses a
    device without an index, so plain "cuda" means the caller's current GPU. CUDA calls faked:
    set_device checks its argument as torch does, pinning and the copy are left out."""
    from torch.cuda._utils import _get_device_index

    from trainer.data.latents import LatentReader

    current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(_get_device_index(d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, pin_memory=False, **kwargs: empty(*args, **kwargs))
    monkeypatch.setattr(LatentReader, "_finish", lambda self, x, key: x)
    _, out, cache = precomputed
    take(make_loader(latents_cfg(out), 2, device=device, cache_dir=cache), 1)
    assert current == [gpu]


def test_training_on_latents_runs(precomputed):
    _, out, cache = precomputed
    loader = make_loader(latents_cfg(out, resolution=32), 2, cache_dir=cache)
    unet = StandInUNet({**TINY_UNET, "sample_size": 4})
    schedule = NoiseSchedule()
    for z, emb in take(loader, 2):
        loss = training_loss(unet, schedule, z, emb)
        loss.backward()
        assert torch.isfinite(loss)


@pytest.mark.usefixtures("torch_kernels")
def test_training_on_latents_resumes(precomputed, tmp_path, monkeypatch):
    """train.main on latents, stopped after 2 steps and resumed to 3 (the epoch's end: 3 batches
    of 2 per epoch), ends where an unbroken run does."""
    _, out, cache = precomputed
    monkeypatch.setenv("CCKERNELS_CACHE", cache)
    common = ["data.format=latents", f"data.path={out}", "data.resolution=32", "train.batch_size=2",
              "checkpoint.every=2", "ema.start_step=1", "sample.prompts=[a cat]", "sample.steps=2"]
    train.main([*common, "train.steps=3", f"out_dir={tmp_path / 'a'}"])
    train.main([*common, "train.steps=2", f"out_dir={tmp_path / 'b'}"])
    train.main([*common, "train.steps=3", f"out_dir={tmp_path / 'b'}"])
    a, b = (checkpoint.load(checkpoint.latest(tmp_path / d)) for d in "ab")
    assert a["state"] == b["state"] and a["state"]["step"] == 3 and a["state"]["data_position"] == [1, 0]
    assert all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"])


def test_a_run_on_latents_samples_with_the_encoders_that_made_them(precomputed, tmp_path, monkeypatch, capsys):
    """model.vae / model.text_encoder left empty (as sd2-base.yaml leaves them): the samples and
    the export use the encoders recorded in the latents' index; others named get a warning."""
    _, out, cache = precomputed
    monkeypatch.setenv("CCKERNELS_CACHE", cache)
    common = ["data.format=latents", f"data.path={out}", "data.resolution=32", "train.batch_size=2",
              "train.steps=1", "sample.prompts=[a cat]", "sample.steps=2"]
    train.main([*common, "model.vae={}", "model.text_encoder={}", f"out_dir={tmp_path / 'a'}"])
    log = capsys.readouterr().out
    assert f"model.vae: the one that encoded {out}" in log and f"model.text_encoder: the one that encoded {out}" in log
    assert "warning" not in log and (tmp_path / "a" / "samples" / "step_0000001.png").is_file()
    from trainer.sample import load_checkpoint  # the checkpoint names them: sampling from it works
    assert load_checkpoint(tmp_path / "a")[3]["model"]["vae"] == json.loads((out / "index.json").read_text())["vae"]
    train.main([*common, "model.text_encoder={preset: tiny, init_seed: 3}", f"out_dir={tmp_path / 'b'}"])
    log = capsys.readouterr().out
    assert "warning: model.text_encoder" in log and "will not condition as training did" in log
    assert "model.vae" not in log  # the tiny preset is what encoded the latents


def test_damaged_shards_are_skipped_and_listed(precomputed, tmp_path, caplog):
    _, good, cache = precomputed
    out = tmp_path / "latents"
    shutil.copytree(good, out)
    data = bytearray((out / shard_file(0)).read_bytes())
    data[-5] ^= 0xFF  # same size, other bytes
    (out / shard_file(0)).write_bytes(bytes(data))
    (out / shard_file(2)).write_bytes((out / shard_file(2)).read_bytes()[:-10])  # truncated
    with caplog.at_level(logging.INFO, logger="trainer.data"):
        loader = make_loader(latents_cfg(out), 1, cache_dir=cache, out_dir=str(tmp_path / "run"))
    assert len(loader.index) == 3 and [s["file"] for s in loader.index.shards] == [shard_file(1)]
    listed = (tmp_path / "run" / "skipped_shards.txt").read_text()
    assert f"{shard_file(0)}\tchecksum mismatch" in listed and f"{shard_file(2)}\tsize" in listed
    assert "damaged shard" in caplog.text
    # precompute's own skipped images are repeated where training on the latents starts
    assert f"images precompute skipped as unreadable: 1 (listed in {out / 'skipped_files.txt'})" in caplog.text
    (out / shard_file(1)).unlink()
    with pytest.raises(ValueError, match="no usable shard"):
        make_loader(latents_cfg(out), 1, cache_dir=cache)


def test_latents_bad_config(precomputed, tmp_path):
    _, out, cache = precomputed
    with pytest.raises(ValueError, match="data.resolution=128 was not precomputed"):
        make_loader(latents_cfg(out, resolution=128), 1, cache_dir=cache)
    with pytest.raises(ValueError, match="caption_field='synthetic_text'"):
        make_loader(latents_cfg(out, caption_field="synthetic_text"), 1, cache_dir=cache)
    with pytest.raises(ValueError, match="data.caption_field='alt'"):
        make_loader(latents_cfg(out, caption_field="alt"), 1, cache_dir=cache)
    with pytest.raises(ValueError, match="no index.json"):
        make_loader(latents_cfg(tmp_path), 1, cache_dir=cache)


@pytest.mark.usefixtures("torch_kernels")
def test_latents_that_do_not_fit_the_unet_say_so(precomputed, tmp_path, monkeypatch):
    _, out, cache = precomputed
    monkeypatch.setenv("CCKERNELS_CACHE", cache)
    with pytest.raises(ValueError, match=f"the latents in {out} have 4 channels but model.unet's in_channels is 8"):
        train.main(["data.format=latents", f"data.path={out}", "data.resolution=32", "train.batch_size=2",
                    "model.unet.in_channels=8", "train.steps=1", f"out_dir={tmp_path}"])


def test_cli(tmp_path, caplog):
    root = make_folder(tmp_path / "images", 2)
    out = tmp_path / "latents"
    common = ["--data", str(root), "--backend", "pil", "--workers", "0", "--resolutions", "32",
              "--cache-dir", str(tmp_path / "cache")]
    with caplog.at_level("INFO", logger="trainer.precompute"):
        pc.main(["--encoders", "tiny", "--out", str(out), *common])
    assert json.loads((out / "index.json").read_text())["count"] == 2
    assert ("precompute: VAE randomly initialized from its config (init_seed 0); text encoder randomly "
            "initialized from its config (init_seed 0); resolutions [32]; decoder pil") in caplog.text
    # A run config's encoders ({preset: tiny} in configs/tiny.yaml): the same random weights.
    pc.main(["--config", str(pc.run_config.DEFAULT_CONFIG), "--out", str(tmp_path / "from_config"), *common])
    a, b = (read_shard(d / shard_file(0))[0] for d in (out, tmp_path / "from_config"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # sd2-base.yaml leaves the encoders to the command line: said before any image is read.
    with pytest.raises(SystemExit, match="sd2-base.yaml gives no model.vae: give --vae"):
        pc.main(["--config", str(pc.run_config.ROOT / "configs" / "sd2-base.yaml"), "--out", str(tmp_path / "x"), *common])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_precompute_on_gpu_matches_cpu(precomputed, tiny, tmp_path, backend):
    """bf16 encoders on the GPU (DALI: mixed decoding) store what fp32 on the CPU stored, up to
    bf16 rounding; the latents loader delivers on the GPU."""
    root, cpu_out, cache = precomputed
    out = tmp_path / "latents"
    pc.precompute(data_cfg(root, backend=backend), tiny["vae"], tiny["text_encoder"], RESOLUTIONS,
                  out, batch_size=2, shard_size=SHARD, device="cuda", cache_dir=cache)
    for k in range(3):
        got, _ = read_shard(out / shard_file(k))
        want, _ = read_shard(cpu_out / shard_file(k))
        for key in want:
            # bf16 encoders: about 1% off on average; DALI's resize also differs from PIL's by a
            # few levels at edges, so its latents get a looser bound.
            bound = 0.15 if backend == "dali" and key != TEXT_KEY else 0.05
            g, w = got[key].float(), want[key].float()
            assert (g - w).abs().mean() <= bound * w.abs().mean() + 1e-3, key
    loader = make_loader(latents_cfg(out), 2, device="cuda", cache_dir=cache)
    z, emb = next(iter(loader))
    assert z.is_cuda and emb.is_cuda and loader.empty_embedding.is_cuda


@pytest.mark.gpu
def test_latents_loader_on_gpu_matches_cpu(precomputed):
    """Rows gathered in the prefetch thread, pinned there and copied without blocking: the same
    batches as on the CPU, and the thread stops with the iterator."""
    _, out, cache = precomputed
    before = len(prefetch_threads())
    kw = dict(seed=5, cache_dir=cache)
    cpu = take(make_loader(latents_cfg(out, dtype="bfloat16"), 2, **kw), 5)
    gpu = take(make_loader(latents_cfg(out, dtype="bfloat16"), 2, device="cuda", **kw), 5)
    for (z, e), (zg, eg) in zip(cpu, gpu):
        assert zg.is_cuda and eg.is_cuda
        assert torch.equal(z, zg.cpu()) and torch.equal(e, eg.cpu())
    gc.collect()
    assert len(prefetch_threads()) == before


def test_bench_precompute_tiny(tmp_path):
    out = tmp_path / "bench"
    # Plain torch ops: the smoke test checks the benchmark, not the kernels (Triton's CPU
    # interpreter would take minutes).
    env = repo_env(CCKERNELS_CACHE=str(tmp_path / "cache"), CCKERNELS_BACKEND="torch")
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_precompute.py"), "--tiny",
                    "--out", str(out)], check=True, env=env, timeout=600)
    result = json.loads((out / "bench_precompute.json").read_text())
    assert [r["data"] for r in result["rows"]] == ["online", "latents"]
    assert all(r["images_per_s"] > 0 for r in result["rows"]) and (out / "bench_precompute.png").exists()


def test_cli_open_clip_checkpoint(tmp_path, monkeypatch):
    """Encoder paths are recorded absolute (training may run elsewhere)."""
    seen = {}
    monkeypatch.setattr(pc, "precompute", lambda data, vae, text, *args, **kw: seen.update(vae=vae, text=text))
    monkeypatch.chdir(tmp_path)
    pc.main(["--vae", "sd2/vae", "--text-encoder", "open_clip_pytorch_model.bin", "--open-clip", "ViT-H-14",
             "--out", str(tmp_path)])
    assert seen == {"vae": {"path": str(tmp_path / "sd2" / "vae")},
                    "text": {"path": str(tmp_path / "open_clip_pytorch_model.bin"), "open_clip": "ViT-H-14"}}
    with pytest.raises(SystemExit):  # --open-clip names the architecture of --text-encoder's file
        pc.parse_args(["--open-clip", "ViT-H-14", "--out", str(tmp_path)])


def test_cli_one_encoder_needs_the_other(tmp_path, capsys):
    """--vae alone would encode captions with tiny.yaml's random text encoder."""
    for given, other in (("--vae", "--text-encoder"), ("--text-encoder", "--vae")):
        with pytest.raises(SystemExit):
            pc.parse_args([given, "x", "--out", str(tmp_path)])
        assert f"{given} without {other}" in capsys.readouterr().err
    assert pc.parse_args(["--vae", "x", "--encoders", "tiny", "--out", str(tmp_path)]).vae == "x"
