"""Run a pool-manager replica: `python -m services.poolmanager`."""

from libs.main import run_service
from services.poolmanager.app import build
from services.poolmanager.settings import Settings

if __name__ == "__main__":
    run_service("poolmanager", Settings.from_env, build)
