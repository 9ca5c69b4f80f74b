"""Run a pool-manager replica: `python -m services.poolmanager`."""

from libs.main import run_service
from services.poolmanager.app import run

if __name__ == "__main__":
    run_service("poolmanager", 50055, run)
