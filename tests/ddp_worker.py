"""Run by test_training_train.py under `accelerate launch` (or alone, as one process): trains, then writes what this rank
saw (`seen_rank{r}.json`), the loss history (`losses.json`), the full weights (`state_rank{r}.safetensors`: every
rank under DDP and ZeRO-2, rank 0 alone under FSDP and ZeRO-3, which gather) and the final remote-code folder.

`NATIVEVL_FSDP_ON_CPU=1` (tests only): accelerate 1.x turns an FSDP launch on CPU processes into DDP (its
`AcceleratorState` enables FSDP for accelerator devices only, and `nativevl train` refuses that fallback). This
switch keeps accelerate's FSDP on the CPU gloo process group, so the rest of accelerate's and the Trainer's FSDP2 code
(`fully_shard`, sharded checkpoints, state dict gathering) runs as it would on GPUs.
"""

import json
import os
import sys

from safetensors.torch import save_file


if os.environ.get("NATIVEVL_FSDP_ON_CPU") == "1":
    from accelerate import state as accelerate_state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator_state_init = accelerate_state.AcceleratorState.__init__

    def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if os.environ.get("ACCELERATE_USE_FSDP") == "true" and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin or FullyShardedDataParallelPlugin()

    accelerate_state.AcceleratorState.__init__ = fsdp_on_cpu

from nativevl.training.packing import PackingCollator  # noqa: E402
from nativevl.training.train import build_trainer, export_final, parse  # noqa: E402


class RecordingCollator(PackingCollator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def __call__(self, examples):
        self.seen += [example["id"] for example in examples]
        return super().__call__(examples)


training_args, args = parse(sys.argv[1:])
trainer = build_trainer(training_args, args)
recorder = RecordingCollator(trainer.processing_class)
trainer.data_collator = recorder
trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
rank = trainer.accelerator.process_index
with open(os.path.join(training_args.output_dir, f"seen_rank{rank}.json"), "w") as f:
    json.dump(recorder.seen, f)
state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # every rank joins; FSDP, ZeRO-3: rank 0 gets it
if trainer.accelerator.is_main_process:
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    with open(os.path.join(training_args.output_dir, "losses.json"), "w") as f:
        json.dump(losses, f)
if state:
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, os.path.join(training_args.output_dir, f"state_rank{rank}.safetensors"))
export_final(trainer, args, training_args.output_dir)
