"""`python -m sdcli`: the same as the `sdcli` command."""

from sdcli.cli import main

main()
