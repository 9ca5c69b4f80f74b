"""Run the cost service: `python -m services.cost`."""

from libs.main import run_service
from services.cost.app import build
from services.cost.settings import Settings

if __name__ == "__main__":
    run_service("cost", Settings.from_env, build)
