"""`make openapi`: write the API's OpenAPI document to docs/openapi.json (or check it).

Apart from `appliance.http.openapi_doc` because it needs every blueprint (through the
app), while the blueprints need the documentation decorators of openapi_doc.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Final

from appliance.http.app import document_app
from appliance.http.openapi_doc import build_document, render

DOCUMENT_PATH: Final = Path("docs/openapi.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.http.openapi_file",
        description="Write the API's OpenAPI document (what `make openapi` does).",
    )
    parser.add_argument("--output", type=Path, default=DOCUMENT_PATH, help="%(default)s")
    parser.add_argument(
        "--check", action="store_true", help="only say whether the file is up to date"
    )
    args = parser.parse_args(argv)
    text = render(build_document(document_app()))
    output: Path = args.output
    current = output.read_text(encoding="utf-8") if output.exists() else None
    if args.check:
        if current != text:
            print(f"{output} is out of date: run `make openapi`", file=sys.stderr)
            return 1
        return 0
    if current != text:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
