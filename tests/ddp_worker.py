"""Run by test_training.py under `accelerate launch`: trains, records which sample ids this rank saw and its weights."""

import json
import os
import sys

from safetensors.torch import save_file

from nativevl.training.packing import PackingCollator
from nativevl.training.train import build_trainer, export_final, parse


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
trainer.train()
rank = trainer.accelerator.process_index
with open(os.path.join(training_args.output_dir, f"seen_rank{rank}.json"), "w") as f:
    json.dump(recorder.seen, f)
state = {k: v.contiguous() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
save_file(state, os.path.join(training_args.output_dir, f"state_rank{rank}.safetensors"))
export_final(trainer, args, training_args.output_dir)
