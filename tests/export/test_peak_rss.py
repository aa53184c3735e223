"""Peak host memory of `prepare_weights`, measured in a fresh process (Linux `VmHWM`).

The claim: tensors are streamed, so preparing needs the interpreter and torch plus a few copies of the
largest tensor plus the read window (`read_budget`), whatever the model's size. Each test runs one
child process that first pays every one-time cost (imports, kernels' first use, building the models
on the meta device), then resets its high-water mark (`/proc/self/clear_refs`) and records its
resident size, then does the measured work; the growth of the high-water mark over that resident
size is what the work needed:

- the DiT stage on a DiT 300x the demo's (read, convert, merge the LoRA, quantise to fp8, write
  three files), after the same stage on the demo DiT: below `read_budget + 6 x largest tensor +
  16 MiB`, which is less than ONE bf16 copy of that DiT, so holding the model would fail;
- the whole command on the demo weights, after building every model on the meta device: below
  `read_budget + 6 x the largest tensor of any component + 32 MiB`.

`VmHWM` (/proc/self/status), not `ru_maxrss`: Python starts children with vfork, and the kernel
carries the parent's high-water mark into the child's `ru_maxrss` at exec, so under pytest
`ru_maxrss` reports the test process's own peak (hundreds of MiB of loaded models).
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
import json, sys
from pathlib import Path
import torch
from flashportrait.components import WeightPaths, resolve_config
from flashportrait.components.prepared import TENSOR_COMPONENTS, PreparedPaths
from flashportrait.components.prepared_check import component_specs
from flashportrait.export.prepare_weights import PrepareOptions, prepare_dit, prepare_weights

what, small, large, out, budget = sys.argv[1], *map(Path, sys.argv[2:5]), int(sys.argv[5])
options = PrepareOptions(fp8=True, read_budget=budget, verify=False)


def dit_stage(release, target):
    paths = WeightPaths.under(release)
    target.mkdir(parents=True)
    prepare_dit(paths, resolve_config(paths), options, PreparedPaths(target))


def status(field):
    lines = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))


if what == "dit":
    dit_stage(small, out / "small")
else:  # every model built on the meta device, no tensor read
    config = resolve_config(WeightPaths.under(small))
    for component in TENSOR_COMPONENTS:
        component_specs(component, config, torch.bfloat16)
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
base = status("VmRSS")
if what == "dit":
    dit_stage(large, out / "large")
else:
    prepare_weights(small, out / "all", options)
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""


def growth(what: str, small: Path, large: Path, out: Path) -> tuple[int, int]:
    """(resident bytes before the measured work, their growth to the peak) in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, what, str(small), str(large), str(out), str(READ_BUDGET)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0 and "clear_refs" in done.stderr:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["base"], result["peak"] - result["base"]


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
    base, grown = growth("dit", release.root, paths.root, tmp_path)
    largest = largest_tensor(dit_files(paths))
    bound = READ_BUDGET + 6 * largest + 16 * MIB
    dit_bf16 = 2 * sum(math.prod(shape) for shape in module_tensor_shapes(build_meta(sizes.dit)).values())
    assert bound < dit_bf16, "the bound must be able to catch a whole copy of the model"
    print(
        f"\nDiT stage of a {dit_bf16 / MIB:.0f} MiB (bf16) DiT: +{grown / MIB:.1f} MiB over "
        f"{base / MIB:.0f} MiB (largest tensor {largest / MIB:.1f} MiB, read budget "
        f"{READ_BUDGET / MIB:.0f} MiB, bound +{bound / MIB:.0f} MiB)"
    )
    assert grown < bound


def test_peak_rss_of_the_whole_command_on_the_demo_weights(release, tmp_path):
    base, grown = growth("all", release.root, release.root, tmp_path)
    files = [p for p in release.root.rglob("*") if p.suffix in (".pth", ".pt", ".safetensors")]
    largest = largest_tensor(files)
    bound = READ_BUDGET + 6 * largest + 32 * MIB
    print(
        f"\nwhole command on the demo weights: +{grown / MIB:.1f} MiB over {base / MIB:.0f} MiB "
        f"(largest tensor {largest / MIB:.1f} MiB, bound +{bound / MIB:.0f} MiB)"
    )
    assert grown < bound
