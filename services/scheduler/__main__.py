"""Run the scheduler: `python -m services.scheduler`."""

from libs.main import run_service
from services.scheduler.app import build
from services.scheduler.settings import Settings

if __name__ == "__main__":
    run_service("scheduler", Settings.from_env, build)
