"""Print the OpenAPI document of the app as YAML (``make openapi`` writes ``openapi.yaml``).

The document is built from the routes alone: no database, no keys, no lifespan.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from service.app import create_app
from service.settings import Settings


def document() -> dict[str, Any]:
    spec: dict[str, Any] = create_app(Settings()).openapi()
    return spec


def render() -> str:
    text: str = yaml.safe_dump(document(), sort_keys=False, allow_unicode=True, width=100)
    return text


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
