"""Run the queueing service: `python -m services.queueing`."""

from libs.main import run_service
from services.queueing.app import build
from services.queueing.settings import Settings

if __name__ == "__main__":
    run_service("queueing", Settings.from_env, build)
