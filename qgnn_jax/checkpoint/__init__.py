"""A run's checkpoints: orbax steps written atomically and asynchronously, verified by their
checksums, restored with a fallback from a corrupt step (manager.py has the whole story);
the errors (errors.py), tree paths and init_from's merge (trees.py), the checksums
(checksums.py)."""
from qgnn_jax.checkpoint.checksums import CHECKSUMS, verify_checksums, write_checksums
from qgnn_jax.checkpoint.errors import (CheckpointError, CheckpointWriteError,
                                        CorruptCheckpointError, IncompatibleCheckpointError,
                                        NonFiniteStateError, short_error)
from qgnn_jax.checkpoint.manager import (DATA, ITEM, META, Restored, all_finite,
                                         check_compatible, check_finite, make_manager,
                                         resolve_checkpoint_dir, restore, restore_data_state,
                                         restore_from, restore_latest, save,
                                         set_aside_steps_after, wait)
from qgnn_jax.checkpoint.trees import Path, flatten_with_paths, merge_matching

__all__ = ["CHECKSUMS", "DATA", "ITEM", "META", "Path", "Restored", "CheckpointError",
           "CheckpointWriteError", "CorruptCheckpointError", "IncompatibleCheckpointError",
           "NonFiniteStateError", "all_finite", "check_compatible", "check_finite",
           "flatten_with_paths", "make_manager", "merge_matching", "resolve_checkpoint_dir",
           "restore", "restore_data_state", "restore_from", "restore_latest", "save",
           "set_aside_steps_after", "short_error", "verify_checksums", "wait",
           "write_checksums"]
