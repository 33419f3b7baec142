"""The `scan` command (every subcommand, one argparse home) and the demo."""
