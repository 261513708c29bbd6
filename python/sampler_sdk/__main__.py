"""`python -m sampler_sdk ...`: the `sampler-sdk` command, for environments whose scripts
directory is not on PATH."""

import sys

from sampler_sdk.cli import main

sys.exit(main())
