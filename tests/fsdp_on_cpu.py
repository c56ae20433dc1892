"""``transformer_ln.train`` under accelerate's FSDP2 on CPU processes (gloo): the launch target of tests/test_fsdp.py.

    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 tests/fsdp_on_cpu.py CONFIG [overrides] --cpu

accelerate turns a launch with an FSDP plugin into ``DistributedType.FSDP`` only on accelerator devices (its
``AcceleratorState`` checks MULTI_GPU, MULTI_NPU, ..., never MULTI_CPU), so without GPUs an FSDP launch trains
plain DDP (and the trainer refuses it in one line). torch's ``fully_shard`` runs on CPU with gloo, so this lifts
that one check: once accelerate has built its state, a MULTI_CPU state with an FSDP plugin becomes FSDP. From there
on it is accelerate's code (``prepare`` -> ``fully_shard``, ``clip_grad_norm_``, ``no_sync``, ``get_state_dict``) and
torch's (DTensor shards, all-gathers, reduce-scatters) that run, as on GPUs; what a CPU test cannot show is NCCL,
device placement and mixed precision on GPUs.
"""
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_fsdp_on_cpu

if __name__ == "__main__":
    from transformer_ln.cli import run_command
    from transformer_ln.train import main

    sys.exit(run_command(main, sys.argv[1:]))
