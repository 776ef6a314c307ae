"""`python -m tdq` is the `tdq` command."""

import sys

from tdq.cli import main

sys.exit(main())
