"""Time to load the full-size DiT from a prepared safetensors file straight to the GPU.

    python bench/load_dit.py                          # H200: ~32 GiB random bf16 DiT on local disk
    python bench/load_dit.py --dir /mnt/nvme/tmp      # somewhere with more free space
    python bench/load_dit.py --tiny --device cpu      # smoke test of this script (seconds)

1. Checks the free space in --dir (the file's size + 2 GiB), then writes a random bf16 DiT
   (Wan2.1-I2V-14B + the expression projections, 17.2B parameters) in the format
   `prepare_weights` writes (`dit_fast.safetensors`, config in the metadata): tensor by tensor,
   each generated on --device and streamed to disk, so the host never holds the model; fsync.
2. For each reader of `flashportrait.components.prepared.load_prepared_dit`:
   "mmap" (the default: `load_dit`, one memory-mapped tensor at a time, converted and copied to the
   GPU) and "direct" (`read_safetensors`: large reads through pinned buffers into one GPU buffer),
   loads the file twice: "cold" after dropping it from the page cache (posix_fadvise DONTNEED, no
   root needed; the disk's own cache is not controlled, hence cold-ish) and "warm" right after.
   Each load is timed until the model is on the GPU (synchronised), checked (sample tensors equal
   the random source bit for bit), and freed; the process's peak resident memory during the load
   (VmHWM, reset before it) is reported.
3. Prints a table and the exact command; deletes the file unless --keep.

Needs torch and this repository only (the "mmap" reader also needs the `safetensors` package, and is
skipped with a note without it). A load that would end after --time-limit seconds (default 450,
judged by the last load from the same cache, or the write) is skipped, so the run ends within about
8 minutes even on a slow disk.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from flashportrait.components.prepared import READERS, load_prepared_dit
from flashportrait.models.dit_loading import RandomSource, prepared_metadata
from flashportrait.models.transformer import DiTConfig, build_meta
from flashportrait.weights import module_tensor_shapes

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
MARGIN = 2 * GIB  # free space kept beyond the file
SAMPLES = 8  # tensors compared with the random source after each load


def ensure_export_package() -> None:
    """`flashportrait.export` is the top-level `export/` folder (setup.py maps it); make it importable
    from a checkout that is not installed."""
    try:
        importlib.import_module("flashportrait.export")
    except ModuleNotFoundError:
        folder = REPO / "export"
        spec = importlib.util.spec_from_file_location(
            "flashportrait.export", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["flashportrait.export"] = module
        spec.loader.exec_module(module)


def tiny_config() -> DiTConfig:
    return DiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, in_dim=36, out_dim=16, freq_dim=32,
                     text_len=16, text_dim=32, clip_dim=48, emo_dim=40)  # fmt: skip


def write_random_dit(config: DiTConfig, path: Path, device: torch.device, seed: int) -> tuple[int, float]:
    """Stream a random bf16 DiT to `path`; returns (bytes, seconds)."""
    ensure_export_package()
    from flashportrait.export.safetensors_writer import SafetensorsWriter, TensorSpec

    shapes = module_tensor_shapes(build_meta(config))
    source = RandomSource(shapes, seed=seed, dtype=torch.bfloat16, device=device)
    specs = [TensorSpec(k, torch.bfloat16, tuple(s)) for k, s in shapes.items()]
    start = time.perf_counter()
    with SafetensorsWriter(path, specs, prepared_metadata(config), digest=False) as writer:
        for spec in writer.order:
            writer.write(spec.name, source[spec.name].cpu())
        written = writer.close()
    return written.size, time.perf_counter() - start


def space_problem(directory: Path, size: int) -> str | None:
    """Why a file of `size` bytes (plus the margin) cannot be written in `directory`, or None."""
    free = shutil.disk_usage(directory).free
    if free >= size + MARGIN:
        return None
    return (
        f"{directory} has {free / GIB:.1f} GiB free, the file needs {size / GIB:.1f} GiB + "
        f"{MARGIN / GIB:.0f} GiB margin: pass --dir on a larger disk"
    )


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux 4.0+)
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    return math.nan


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_load(path: Path, config: DiTConfig, device: torch.device, reader: str, seed: int) -> dict:
    """Load once; returns seconds, peak RSS and whether the sampled tensors are the written ones."""
    resettable = reset_peak_rss()
    synchronize(device)
    start = time.perf_counter()
    model = load_prepared_dit(path, config, dtype=torch.bfloat16, device=device, reader=reader)
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = peak_rss_gib() if resettable else math.nan
    state = model.state_dict()
    names = sorted(state)
    sample = [names[i * (len(names) - 1) // (SAMPLES - 1)] for i in range(SAMPLES)]
    # the same source as the writer's (each key's generator is seeded by its index among all keys)
    source = RandomSource({k: tuple(v.shape) for k, v in state.items()}, seed=seed, dtype=torch.bfloat16,
                          device=device)  # fmt: skip
    exact = all(torch.equal(state[k], source[k]) for k in sample)
    on_device = all(t.device.type == device.type for t in state.values())
    del model, state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"seconds": seconds, "peak_rss_gib": peak, "exact": exact and on_device}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-block DiT (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/flashportrait-bench"), help="where to write")
    parser.add_argument("--readers", nargs="+", choices=READERS, default=list(READERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the written file")
    parser.add_argument(
        "--time-limit", type=float, default=450.0, help="start no load that would end later (s)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    begin = time.perf_counter()
    device = torch.device(args.device)
    config = tiny_config() if args.tiny else DiTConfig.wan_i2v_14b()
    shapes = module_tensor_shapes(build_meta(config))
    parameters = sum(math.prod(s) for s in shapes.values())
    size = 2 * parameters
    args.dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    free = shutil.disk_usage(args.dir).free
    print(f"device {name}; torch {torch.__version__}; DiT {parameters / 1e9:.2f}B parameters, "
          f"{size / GIB:.1f} GiB bf16; {args.dir}: {free / GIB:.1f} GiB free")  # fmt: skip
    problem = space_problem(args.dir, size)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    path = args.dir / "dit_fast.safetensors"
    rows, last = [], {}
    try:
        written, seconds = write_random_dit(config, path, device, args.seed)
        print(
            f"wrote {path}: {written / GIB:.2f} GiB in {seconds:.1f} s ({written / GIB / seconds:.2f} GiB/s)"
        )
        for reader in args.readers:
            if reader == "mmap" and importlib.util.find_spec("safetensors") is None:
                print("mmap reader skipped: the safetensors package is not installed")
                continue
            for cache in ("cold", "warm"):
                # a load takes about as long as the last one from the same cache (the write, at first)
                expected = last.get(cache, seconds)
                if time.perf_counter() - begin + expected > args.time_limit:
                    print(f"{reader}/{cache} skipped: it would end past --time-limit {args.time_limit:.0f} s")
                    continue
                if cache == "cold":
                    drop_from_page_cache(path)
                result = timed_load(path, config, device, reader, args.seed)
                rows.append((reader, cache, result))
                last[cache] = result["seconds"]
                print(f"  {reader:6s} {cache}: {result['seconds']:.2f} s", flush=True)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    print(f"\n| reader | page cache | seconds | GiB/s | peak host RSS GiB | tensors exact on {device.type} |")
    print("|---|---|---|---|---|---|")
    for reader, cache, r in rows:
        print(f"| {reader} | {cache} | {r['seconds']:.2f} | {written / GIB / r['seconds']:.2f} | "
              f"{r['peak_rss_gib']:.2f} | {'yes' if r['exact'] else 'NO'} |")  # fmt: skip
    given = sys.argv[1:] if argv is None else argv
    print(f"\ncommand: {shlex.join(['python', 'bench/load_dit.py', *given])}")
    print(f"total {time.perf_counter() - begin:.0f} s")
    return 0 if rows and all(r["exact"] for _, _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
