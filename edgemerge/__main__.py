"""`python -m edgemerge ...`: the same command line as the `edgemerge` script, for environments without it on PATH."""

from edgemerge.cli import main

main()
