"""
Host RAM per rank while FSDP loads --init_from (common.load_model_sharded), measured with real gloo
processes on a CPU: a model of llama1-7b's width (dim 4096, hidden 11008, vocab 32000, GQA off) with
fewer layers, saved as our .pt (fp32), a HuggingFace directory (bf16 safetensors) and a DCP directory
(fp32, written by one process: whole tensors, so DCP reads a whole tensor to cut a rank's rows from
it -- the worst case; a DCP checkpoint written by the same number of FSDP ranks holds each rank's
rows as a piece of its own; dcp_fsdp is that case: the W ranks first load the .pt and save it as
DCP, then load it again, measured), then loaded by W ranks (fork-started, one thread each, FileStore).

    python bench/fsdp_load.py                                   # 2 layers, W = 2, 4, 8
    python bench/fsdp_load.py --n_layers 1 --world_sizes 2 8 --formats pt hf

Per rank, from /proc/self/status around the load (after a gc, with VmHWM reset by clear_refs):
  peak      VmHWM - VmRSS before: the whole growth of resident memory (anonymous + file-mapped)
  anon      the largest RssAnon growth seen (sampled every 2 ms): the shard itself on a CPU run,
            plus the loader's temporaries
  file      the largest RssFile growth seen: pages of the mapped checkpoint this rank touched
  shard     this rank's parameters in fp32 (what FSDP keeps); bytes_read: what it copied from a file
On a GPU the shard lives in GPU memory, so host RAM per rank is about (anon - shard) + file. Linux only.
"""
import argparse
import gc
import os
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common  # noqa: E402
from model import Llama, LlamaConfig  # noqa: E402


def status() -> dict:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if v.strip().endswith("kB")}


def worker(rank, world, store, path, fmt, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    try:
        info = common.DistInfo(rank, rank, world, torch.device("cpu"))
        wrap = lambda m: common.wrap_model(m, info, "fsdp")   # noqa: E731
        if fmt == "dcp_fsdp":   # first write a DCP checkpoint from these W ranks
            model, _ = common.load_model_sharded(path, info, wrap)
            path = common.save_checkpoint(os.path.dirname(store), f"dcp_fsdp_{world}", model, step=0, config={})
            del model
        gc.collect()
        before = status()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # reset VmHWM to the current RSS
        peaks, done = {"RssAnon": 0, "RssFile": 0}, threading.Event()

        def sample():
            while not done.is_set():
                s = status()
                for k in peaks:
                    peaks[k] = max(peaks[k], s[k])
                time.sleep(0.002)
        t = threading.Thread(target=sample)
        t.start()
        t0 = time.time()
        model, meta = common.load_model_sharded(path, info, wrap)
        seconds = time.time() - t0
        done.set()
        t.join()
        after = status()
        shard = sum(p.to_local().numel() * 4 for p in model.parameters())
        queue.put((rank, {"peak": after["VmHWM"] - before["VmRSS"], "anon": peaks["RssAnon"] - before["RssAnon"],
                          "file": peaks["RssFile"] - before["RssFile"], "shard": shard,
                          "bytes_read": meta.get("bytes_read"), "seconds": seconds}, None))
    except Exception:
        queue.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_layers", type=int, default=2)
    p.add_argument("--world_sizes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--formats", nargs="+", default=["pt", "hf", "dcp", "dcp_fsdp"],
                   choices=["pt", "hf", "dcp", "dcp_fsdp"],
                   help="dcp: written by one process (whole tensors); dcp_fsdp: written by the same W FSDP ranks")
    args = p.parse_args()
    torch.set_num_threads(1)   # forked children must not inherit a multi-threaded runtime
    tmp = tempfile.mkdtemp(prefix="fsdp_load_")
    config = LlamaConfig.from_preset("llama1-7b", n_layers=args.n_layers)
    model = Llama(config)
    n = model.num_params()
    paths = {}
    t0 = time.time()
    if "pt" in args.formats or "dcp_fsdp" in args.formats:
        paths["pt"] = paths["dcp_fsdp"] = common.save_checkpoint(tmp, "model", model, step=0, config={})
    if "hf" in args.formats:
        paths["hf"] = os.path.join(tmp, "hf")
        model.save_hf(paths["hf"], dtype=torch.bfloat16)
    if "dcp" in args.formats:
        import torch.distributed.checkpoint as dcp
        paths["dcp"] = os.path.join(tmp, "dcp")
        dcp.save({"model": model.state_dict()}, checkpoint_id=paths["dcp"], no_dist=True)
        meta = {"format": common.CKPT_FORMAT, "model_config": config.to_dict(), "step": 0, "config": {},
                "metrics": {}, "tokenizer": None}
        common._atomic_torch_save(meta, os.path.join(paths["dcp"], "meta.pt"))
    del model
    gc.collect()
    print(f"llama1-7b width, {args.n_layers} layers: {n / 1e6:.0f}M parameters ({4 * n / 1e9:.2f} GB fp32); "
          f"checkpoints written in {time.time() - t0:.0f}s under {tmp}")
    print(f"{'format':<9}{'W':>3}{'shard GB':>10}{'read GB':>9}{'peak GB':>9}{'anon GB':>9}{'file GB':>9}"
          f"{'peak/shard':>12}{'(anon-shard+file)/shard':>25}{'s':>6}")
    ctx = torch.multiprocessing.get_context("fork")
    for fmt in args.formats:
        for world in args.world_sizes:
            queue = ctx.SimpleQueue()
            store = os.path.join(tmp, f"store_{fmt}_{world}")
            torch.multiprocessing.start_processes(worker, args=(world, store, paths[fmt], fmt, queue), nprocs=world,
                                                  start_method="fork")
            results = dict((r, (out, err)) for r, out, err in (queue.get() for _ in range(world)))
            errors = [err for _, err in results.values() if err]
            if errors:
                raise SystemExit("\n".join(errors))
            worst = max((out for out, _ in results.values()), key=lambda o: o["peak"] / o["shard"])
            g = 1e9
            print(f"{fmt:<9}{world:>3}{worst['shard'] / g:>10.3f}{(worst['bytes_read'] or 0) / g:>9.3f}"
                  f"{worst['peak'] / g:>9.3f}{worst['anon'] / g:>9.3f}{worst['file'] / g:>9.3f}"
                  f"{worst['peak'] / worst['shard']:>12.2f}"
                  f"{(worst['anon'] - worst['shard'] + worst['file']) / worst['shard']:>25.2f}{worst['seconds']:>6.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
