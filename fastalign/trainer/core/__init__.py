"""The training loop and its services: ``loop.Trainer`` (steps, schedule, evaluation), the
options (``config``), checkpoints and resume (``checkpoint``, ``resume``), the run directory
(``run_dir``), metrics (``metrics``), processes (``distributed``), checksums (``integrity``),
data files (``data``) and memory given back to the system (``memory``)."""
