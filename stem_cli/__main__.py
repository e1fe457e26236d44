"""`python -m stem_cli ...`: the `stem` command, as torchrun and `accelerate launch -m stem_cli` start it."""

from stem_cli.cli import main

if __name__ == "__main__":
    main()
