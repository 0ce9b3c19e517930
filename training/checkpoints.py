"""Checkpoints that are complete or absent.

transformers' `Trainer._save_checkpoint` writes `checkpoint-N/` in place: a crash in the middle leaves a folder that
`resume_from_checkpoint=True` (`get_last_checkpoint`) would pick up. `AtomicCheckpointMixin` lets the Trainer write
it under `<run_dir>/.staging-N/` (ignored by `get_last_checkpoint` and checkpoint rotation) and renames it into
place once every process has written its part (model, optimizer, scheduler, RNG states, trainer state); an older
folder of the same step is renamed aside before it is deleted (`replace_checkpoint`, through `nativevl.runs`'
one writer of files and folders).
"""

import json
import os
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from nativevl.runs import atomic_write, replace_folder


TRAINER_STATE = "trainer_state.json"


class AtomicCheckpointMixin:
    """Put before the Trainer class: `class MyTrainer(AtomicCheckpointMixin, SFTTrainer)`."""

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f".staging-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(run_dir):  # staging folders of a killed run: never mixed in
            for leftover in os.listdir(run_dir):
                if leftover.startswith(".staging-"):
                    shutil.rmtree(os.path.join(run_dir, leftover), ignore_errors=True)
        self.accelerator.wait_for_everyone()  # no rank writes into staging before the leftovers are gone
        self._get_output_dir = lambda trial=None: staging  # instance attribute shadows the method for this call
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank's shards and RNG state are in staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            del self._get_output_dir
        if self.args.should_save:
            target = os.path.join(run_dir, name)
            written = os.path.join(staging, name)
            if self.state.best_model_checkpoint == written:  # transformers recorded the staging path
                self.state.best_model_checkpoint = target
                _fix_best_checkpoint(os.path.join(written, TRAINER_STATE), target)
            replace_checkpoint(written, target)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


def replace_checkpoint(written: str, target: str) -> None:
    """Renames the finished checkpoint folder `written` to `target` (`nativevl.runs.replace_folder`). An existing
    `target` (the same step saved again, e.g. at the end of training) is first renamed aside to a hidden sibling,
    which `get_last_checkpoint` and rotation ignore, and only then deleted: a kill at any point leaves `target`
    either the complete old checkpoint, the complete new one, or absent (resume then takes the previous checkpoint),
    never a half-deleted folder that looks valid. What a killed run left aside is deleted here."""
    replace_folder(written, target)


def _fix_best_checkpoint(state_file: str, best: str) -> None:
    """Rewrites `best_model_checkpoint` in a saved trainer state (before the folder is renamed into place)."""
    if os.path.exists(state_file):
        with open(state_file) as f:
            state = json.load(f)
        state["best_model_checkpoint"] = best
        atomic_write(state_file, lambda tmp: tmp.write_text(json.dumps(state, indent=2, sort_keys=True)))
