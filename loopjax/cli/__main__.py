"""`python -m loopjax.cli ...`: the `loopjax` command (launchers call it this way)."""

import sys

from loopjax.cli.main import main

sys.exit(main())
