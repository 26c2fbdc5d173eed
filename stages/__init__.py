"""The DVC stages, one module each, run as `python -m stages.NAME` (see dvc.yaml)."""
import gc
import sys

# Run as a stage (sys.argv[0] is "-m" while Python locates the module): no garbage collection
# while torch, MLflow and scikit-learn are imported, ~0.35 s of every stage's start-up spent
# walking objects that live until the exit; `run_cli` freezes them and turns it back on.
if sys.argv[:1] == ["-m"]:
    import os
    import signal

    def _interrupted(_signum, _frame):  # Ctrl-C during the imports: one line, not a traceback from
        print("interrupted", file=sys.stderr)  # inside some library (run_cli takes over from here)
        os._exit(130)

    signal.signal(signal.SIGINT, _interrupted)
    gc.disable()
    from pipeline.core.warm import delegate

    delegate()  # under DVC: the stage runs in a fork of a process that has torch & co. imported; exits here
