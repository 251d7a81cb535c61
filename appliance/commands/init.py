"""`appliance init`: a new env file with generated secrets and the first admin API key."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.commands.common import EXIT_ERROR, EXIT_OK, error
from appliance.envfile import DEFAULT_ENV_FILE, generate_env_file_text, write_new_env_file

if TYPE_CHECKING:
    from appliance.commands.common import Subparsers


def add_parser(commands: Subparsers) -> None:
    init = commands.add_parser("init", help="write a new env file with generated secrets")
    init.add_argument(
        "--development", action="store_true", help="APPLIANCE_ENV=development instead"
    )


def run(args: argparse.Namespace) -> int:
    path: Path = args.env_file or DEFAULT_ENV_FILE
    if path.exists():
        error(f"{path} already exists; it is left as it is (remove it first to start over)")
        return EXIT_ERROR
    text, admin_key = _env_text_with_admin_key(production=not args.development)
    try:
        write_new_env_file(path, text)
    except FileExistsError:
        error(f"{path} already exists; it is left as it is")
        return EXIT_ERROR
    except PermissionError:
        error(f"cannot write {path}: permission denied (run as root, or pass --env-file)")
        return EXIT_ERROR
    print(f"wrote {path} (mode 0600) with new SECRET_KEY and PRIVACY_SALT")
    print(f"first admin API key (shown only now; the daemon records it at start): {admin_key}")
    return EXIT_OK


def _env_text_with_admin_key(production: bool) -> tuple[str, str]:
    """The env file's text with the first admin key's id and hash; and the key."""
    from appliance.auth.apikeys import hash_token, new_token

    text = generate_env_file_text(production=production)
    key_id, token = new_token()
    text += "# The first admin API key, as id:hash (the key was shown once by init).\n"
    text += f"APPLIANCE_ADMIN_KEY_HASH={key_id}:{hash_token(token)}\n"
    return text, token
