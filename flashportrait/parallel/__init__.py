"""Several GPUs of one host: sequence parallelism for one request, one instance per GPU for many.

`ulysses.py`: `SequenceParallel(dit, group)` shards a DiT call's tokens over a process group
(all-to-all over heads around self-attention). `driver.py`: the driving rank broadcasts its DiT calls
(`CallBroadcaster`), the followers replay them (`serve_calls`). `launch.py`: `spawn` / `init_from_env`
(NVLink multicast off). `generate.py`: `flashportrait generate --gpus N`. `instances.py`:
`device_for_instance(args)` for Triton's one-instance-per-GPU `instance_group`.
"""

from flashportrait.parallel.instances import device_for_instance

__all__ = ["device_for_instance"]
