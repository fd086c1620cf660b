"""The MLflow server image's entrypoint: refuse to start a server without authentication, then exec it.

`mlflow server` alone serves every experiment and model to anyone who can reach the port. This wrapper runs the
given command only when it enables MLflow's basic-auth app (`--app-name basic-auth`), or when the deployer says
in so many words that something in front of the server authenticates (MLFLOW_SERVER_ALLOW_NO_AUTH=true; the
Helm chart sets it only with `mlflow.auth.enabled: false`). The admin password itself comes from a Secret
(MLFLOW_AUTH_ADMIN_PASSWORD); MLflow refuses to create the admin user without one.
"""

from __future__ import annotations

import os
import sys


def auth_enabled(argv: list[str]) -> bool:
    for i, arg in enumerate(argv):
        if arg == "--app-name=basic-auth" or (arg == "--app-name" and argv[i + 1 : i + 2] == ["basic-auth"]):
            return True
    return False


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("mlflow-server: error: no command given")
    is_server = argv[:2] == ["mlflow", "server"]
    if is_server and not auth_enabled(argv) and os.environ.get("MLFLOW_SERVER_ALLOW_NO_AUTH") != "true":
        sys.exit(
            "mlflow-server: error: refusing to start without authentication: add --app-name basic-auth "
            "(admin password from $MLFLOW_AUTH_ADMIN_PASSWORD), or set MLFLOW_SERVER_ALLOW_NO_AUTH=true when "
            "a proxy in front authenticates"
        )
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
