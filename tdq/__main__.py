"""`python -m tdq` is the `tdq` command."""

import sys

from tdq.run.cli import main

sys.exit(main())
