"""Peak host memory of `prepare_weights`, measured in fresh processes (Linux `VmHWM`).

The claim: tensors are streamed, so preparing needs the interpreter and torch plus a few copies of the
largest tensor plus the read window (`read_budget`), whatever the model's size. Measured as a
difference, which cancels the interpreter, torch and every one-time cost:

- the DiT stage on the demo DiT (baseline) and on a DiT 300x larger (same code path: read, convert,
  merge the LoRA, quantise to fp8, write three files): the difference must stay below
  `read_budget + 6 x largest tensor + 16 MiB`, which is smaller than ONE bf16 copy of the larger DiT,
  so any implementation that holds the model would fail;
- the whole command on the demo weights, against a process that only imports and builds every model
  on the meta device: below `read_budget + 6 x the largest tensor of any component + 32 MiB`.

The peak is the child's `VmHWM` (/proc/self/status), not `ru_maxrss`: Python starts children with
vfork, and the kernel carries the parent's high-water mark into the child's `ru_maxrss` at exec, so
under pytest `ru_maxrss` reports the test process's own peak (hundreds of MiB of loaded models).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from flashportrait.export import demo_weights

from flashportrait.components import DeploymentConfig, WeightPaths
from flashportrait.models.transformer import build_meta
from flashportrait.weights import SafetensorsFile, module_tensor_shapes, open_checkpoint

MIB = 2**20
READ_BUDGET = 8 * MIB

CHILD = """
import json, resource, sys
from pathlib import Path
import torch
from flashportrait.components import WeightPaths, resolve_config
from flashportrait.components.prepared import TENSOR_COMPONENTS, PreparedPaths
from flashportrait.components.prepared_check import component_specs
from flashportrait.export.prepare_weights import PrepareOptions, prepare_dit, prepare_weights

what, release, out, budget = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
options = PrepareOptions(fp8=True, read_budget=budget, verify=False)
if what == "meta":  # the one-time costs: every model built on the meta device, no tensor read
    config = resolve_config(WeightPaths.under(release))
    for component in TENSOR_COMPONENTS:
        component_specs(component, config, torch.bfloat16)
elif what == "dit":
    paths = WeightPaths.under(release)
    out.mkdir(parents=True)
    prepare_dit(paths, resolve_config(paths), options, PreparedPaths(out))
else:
    prepare_weights(release, out, options)
# VmHWM: this process's own high-water mark (see the module docstring for why not ru_maxrss)
status = Path("/proc/self/status").read_text()
peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
print(json.dumps({"peak": peak * 1024, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def peak_rss(what: str, release: Path, out: Path) -> int:
    """Peak RSS in bytes of a fresh interpreter preparing `what` ("dit" or "all")."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, what, str(release), str(out), str(READ_BUDGET)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["peak"]


def largest_tensor(paths: list[Path]) -> int:
    sizes = []
    for path in paths:
        # SafetensorsFile, not open_checkpoint: a library-written shard whose header size ends in
        # 0x80 is taken for a pickle by open_checkpoint's first-byte sniffing
        source = SafetensorsFile(path) if path.suffix == ".safetensors" else open_checkpoint(path)
        sizes += [math.prod(source.info(k).shape) * source.info(k).dtype.itemsize for k in source]
    return max(sizes)


@pytest.fixture(scope="module")
def large_dit(tmp_path_factory) -> tuple[WeightPaths, DeploymentConfig]:
    """The demo release's DiT files at width 512, FFN 2048, 8 blocks (~40M parameters, 300x the demo's):
    deep enough that one bf16 copy of it outweighs the bound's multiples of its largest tensor."""
    tiny = DeploymentConfig.tiny()
    sizes = replace(tiny, dit=replace(tiny.dit, dim=512, ffn_dim=2048, num_heads=4, num_layers=8), name="rss")
    paths = WeightPaths.under(tmp_path_factory.mktemp("large_dit") / "weights")
    demo_weights.write_wan_dit(sizes, paths, 0)
    demo_weights.write_transformer(sizes, paths, 0)
    demo_weights.write_fast_lora(sizes, paths, 0)
    paths.config.write_text(sizes.to_json())
    return paths, sizes


def dit_files(paths: WeightPaths) -> list[Path]:
    return [*paths.wan_config.parent.glob("diffusion_pytorch_model-*.safetensors"), paths.transformer]


def test_peak_rss_grows_with_the_largest_tensor_not_the_model(release, large_dit, tmp_path):
    paths, sizes = large_dit
    baseline = peak_rss("dit", release.root, tmp_path / "small")
    large = peak_rss("dit", paths.root, tmp_path / "large")
    largest = largest_tensor(dit_files(paths))
    bound = READ_BUDGET + 6 * largest + 16 * MIB
    dit_bf16 = 2 * sum(math.prod(shape) for shape in module_tensor_shapes(build_meta(sizes.dit)).values())
    assert bound < dit_bf16, "the bound must be able to catch a whole copy of the model"
    print(f"\nDiT stage: baseline {baseline / MIB:.0f} MiB, large DiT {large / MIB:.0f} MiB "
          f"(+{(large - baseline) / MIB:.1f} MiB; largest tensor {largest / MIB:.1f} MiB, "
          f"bf16 DiT {dit_bf16 / MIB:.0f} MiB, bound +{bound / MIB:.0f} MiB)")  # fmt: skip
    assert large - baseline < bound


def test_peak_rss_of_the_whole_command_on_the_demo_weights(release, tmp_path):
    baseline = peak_rss("meta", release.root, tmp_path / "meta")
    whole = peak_rss("all", release.root, tmp_path / "all")
    files = [p for p in release.root.rglob("*") if p.suffix in (".pth", ".pt", ".safetensors")]
    largest = largest_tensor(files)
    bound = READ_BUDGET + 6 * largest + 32 * MIB
    print(
        f"\nwhole command on the demo weights: peak {whole / MIB:.0f} MiB, baseline (imports, meta models) "
        f"{baseline / MIB:.0f} MiB, largest tensor {largest / MIB:.1f} MiB, bound +{bound / MIB:.0f} MiB"
    )
    assert whole - baseline < bound
