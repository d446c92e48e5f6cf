"""``python -m orchestrator.tasks DIR``: the task runner in the foreground (what the daemon runs)."""

import sys

from orchestrator.tasks.runner import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
