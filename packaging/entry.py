"""The frozen program's entry point: what `python -m appliance` runs (appliance/__main__.py).

PyInstaller runs this file as `__main__`. It lives here rather than pointing PyInstaller at
appliance/__main__.py because PyInstaller puts the entry script's folder on the module search
path, and appliance/http/ would then shadow the standard library's `http` package.
"""

from __future__ import annotations

import sys

from appliance.cli import main

if __name__ == "__main__":
    sys.exit(main())
