import os
import sys

# ``python -m machinable`` puts the working directory first on sys.path (the installed
# ``machinable`` command does not). In a project directory that would let a project
# file named like a standard module (wave.py) replace that module for the process;
# project modules are imported as a package of their own instead (project.py).
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from machinable.cli import main  # noqa: E402

main()
