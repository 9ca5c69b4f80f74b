"""Run the gateway: `python -m services.gateway`."""

from libs.main import run_service
from services.gateway.app import build
from services.gateway.settings import Settings

if __name__ == "__main__":
    run_service("gateway", Settings.from_env, build)
