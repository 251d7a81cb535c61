"""The commands of `appliance`: one module each, with `add_parser(commands)` and `run(args)`.

`appliance.cli` lists them. They are light to import (the CLI builds every parser at each
start, the inference worker's included): `run()` imports the subsystem that does the work
(`backup/commands.py`, `llm/commands.py`, `ops/update.py`, ...) only when it runs. No
subsystem imports this package.
"""
